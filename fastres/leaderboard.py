"""A sweep's result, read from its study: the ranked table, its CSV and two plots.

    board = leaderboard(study)                  # ranked trials, and the pruned/failed/over budget apart
    print(board_text(board))
    write_board(board, DIR)                     # leaderboard.csv, accuracy_vs_params.png, accuracy_vs_time.png

The ranking is by the trial's value: the mean final test accuracy over its seeds. The Pareto
front is the trials that no other trial beats on both accuracy (higher) and parameters (fewer).
"""
from __future__ import annotations

import csv
from pathlib import Path

from .progress import duration
from .rundir import atomic_write

CSV_NAME, PARAMS_PNG, TIME_PNG = "leaderboard.csv", "accuracy_vs_params.png", "accuracy_vs_time.png"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (parameters, accuracy) points that no other point dominates (no more
    parameters and no less accuracy, one of them strictly)."""
    front = []
    for i, (n, a) in enumerate(points):
        if not any((m <= n and b >= a) and (m < n or b > a) for j, (m, b) in enumerate(points) if j != i):
            front.append(i)
    return front


def leaderboard(study) -> dict:
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    names, ranked, pruned, failed, over, left = [], [], [], [], [], {"running": 0, "waiting": 0}
    every = study.get_trials(deepcopy=False)
    # attempts that a later trial continues (a stopped or dead worker's), and trials that were
    # no configuration (asked for when a grid had just run out)
    retried = {n for t in every for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}
    for t in every:
        a = t.user_attrs
        if t.number in retried or a.get("status") == "grid_done":
            continue
        for k in t.params:
            if k not in names:
                names.append(k)
        row = {"trial": int(a.get("folder", f"trials/{t.number}").split("/")[-1]), "number": t.number,
               "params": dict(t.params), **{k: a.get(k) for k in ("parameters", "macs", "acc_mean", "acc_std",
                                                                  "best_acc_mean", "best_epoch", "train_s",
                                                                  "device", "folder", "accs", "error",
                                                                  "pruned_at_epoch")}}
        if t.state == TrialState.COMPLETE:
            ranked.append(row)
        elif t.state == TrialState.PRUNED and a.get("status") == "over_budget":
            over.append(row)
        elif t.state == TrialState.PRUNED:
            row["last_acc"] = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
            pruned.append(row)
        elif t.state == TrialState.FAIL:
            row["status"] = a.get("status")
            failed.append(row)
        elif t.state in (TrialState.RUNNING, TrialState.WAITING):
            left[t.state.name.lower()] += 1
    ranked.sort(key=lambda r: -r["acc_mean"])
    for i, r in enumerate(ranked):
        r["rank"] = i + 1
    front = set(pareto_front([(r["parameters"], r["acc_mean"]) for r in ranked]))
    for i, r in enumerate(ranked):
        r["pareto"] = i in front
    return {"study": study.study_name, "names": names, "ranked": ranked, "pruned": pruned, "failed": failed,
            "over_budget": over, "left": left}


def _value(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def board_text(board: dict) -> str:
    names = board["names"]
    head = ["rank", "trial", *names, "params", "MMACs", "test acc (mean ± std)", "best epoch", "train", "pareto"]
    rows = [[str(r["rank"]), f"{r['trial']:04d}", *(_value(r["params"].get(k, "")) for k in names),
             f"{r['parameters']:,}", f"{r['macs'] / 1e6:,.1f}",
             f"{100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f} %", str(r["best_epoch"]),
             duration(r["train_s"]), "*" if r["pareto"] else ""] for r in board["ranked"]]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    lines = [f"study {board['study']!r}: {len(board['ranked'])} trials complete, ranked by mean final test "
             "accuracy over seeds (* = on the Pareto front of accuracy against parameters)", fmt(head)]
    lines += [fmt(r) for r in rows]
    what = lambda r: " ".join(f"{k}={_value(v)}" for k, v in r["params"].items())
    for r in board["pruned"]:
        last = f", test accuracy {r['last_acc']:.2%} then" if r.get("last_acc") is not None else ""
        lines.append(f"pruned       {r['trial']:04d} ({what(r)}): after epoch {r.get('pruned_at_epoch')}{last}")
    for r in board["over_budget"]:
        lines.append(f"over budget  {r['trial']:04d} ({what(r)}): {r['parameters']:,} parameters, not trained")
    for r in board["failed"]:
        lines.append(f"failed       {r['trial']:04d} ({what(r)}): {r.get('status') or 'error'}: {r.get('error') or ''}")
    left = board["left"]
    if left["running"] or left["waiting"]:
        lines.append(f"not finished: {left['running']} running, {left['waiting']} queued")
    return "\n".join(lines)


def write_board(board: dict, out: Path) -> list[Path]:
    """leaderboard.csv (every trial: ranked, then pruned, over budget and failed) and two PNGs."""
    out = Path(out)
    names = board["names"]
    cols = ["rank", "trial", "state", *names, "parameters", "macs", "acc_mean", "acc_std", "best_acc_mean",
            "best_epoch", "train_s", "pareto", "device", "folder", "accs", "error"]

    def write_csv(p: Path):
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for state, rows in (("complete", board["ranked"]), ("pruned", board["pruned"]),
                                ("over_budget", board["over_budget"]), ("failed", board["failed"])):
                for r in rows:
                    w.writerow({**r, **r["params"], "state": state,
                                "accs": " ".join(f"{a:.4f}" for a in r["accs"] or []) if r.get("accs") else ""})

    atomic_write(out / CSV_NAME, write_csv)
    _plot(board, out / PARAMS_PNG, "parameters", "trainable parameters", front=True)
    _plot(board, out / TIME_PNG, "train_s", "training seconds (all seeds)", front=False)
    return [out / CSV_NAME, out / PARAMS_PNG, out / TIME_PNG]


def _plot(board: dict, path: Path, key: str, xlabel: str, front: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = board["ranked"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    xs = [r[key] for r in rows]
    ys = [100 * r["acc_mean"] for r in rows]
    es = [100 * r["acc_std"] for r in rows]
    ax.errorbar(xs, ys, yerr=es, fmt="o", color="tab:blue", alpha=0.75, capsize=3, label="trial (mean ± std over seeds)")
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(f"{r['trial']:04d}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if front and rows:
        pts = sorted((r[key], 100 * r["acc_mean"]) for r in rows if r["pareto"])
        ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color="tab:red", lw=1.5)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", mfc="none", mec="tab:red", ms=11, label="Pareto front")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title(f"sweep {board['study']}: {len(rows)} trials")
    if rows and min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
