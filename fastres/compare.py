"""`fastres compare RUN_DIR...`: runs side by side, speed next to accuracy.

Prints one table (preset, the switches that change speed, device, mean epoch seconds, total
training seconds, final and best test accuracy), then each run's test accuracy per class, and draws test accuracy against cumulative
training seconds, one line per run, into a PNG: what a switch bought and what it cost.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import BadInput
from .rundir import atomic_write
from .record import RECORD

COLUMNS = ("run", "preset", "switches", "device", "epochs", "epoch_s", "train_s", "final_acc", "best_acc")


def read_record(run_dir) -> dict:
    path = Path(run_dir)
    path = path / RECORD if path.is_dir() else path
    try:
        rec = json.loads(path.read_text())
        rec["epochs"][0]["train_s"], rec["config"]["preset"]  # noqa: B018 - the fields compare needs
    except FileNotFoundError:
        raise BadInput(f"{path}: no run record (give run folders written by 'fastres train')") from None
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise BadInput(f"{path}: not a run record with at least one finished epoch ({type(e).__name__})") from None
    rec["_path"] = str(path.parent)
    return rec


def row(rec: dict) -> dict:
    sw = rec.get("switches", {})
    switches = ", ".join(f"{k}={str(sw[k]).split(':')[0]}" for k in ("amp", "compile", "fused_bn_relu", "channels_last")
                         if k in sw)
    ep = rec["epochs"]
    return {"run": rec["_path"], "preset": rec["config"]["preset"], "switches": switches,
            "device": rec.get("environment", {}).get("device_name", "?"), "epochs": len(ep),
            "epoch_s": sum(e["train_s"] for e in ep) / len(ep), "train_s": sum(e["train_s"] for e in ep),
            "final_acc": ep[-1]["test_acc"], "best_acc": max(e["test_acc"] for e in ep)}


def table(rows: list[dict]) -> str:
    fmt = {"epoch_s": "{:.2f}", "train_s": "{:.1f}", "final_acc": "{:.2%}", "best_acc": "{:.2%}"}
    cells = [[fmt.get(c, "{}").format(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(COLUMNS)]
    line = lambda xs: "  ".join(x.ljust(w) if i < 4 else x.rjust(w) for i, (x, w) in enumerate(zip(xs, widths)))
    return "\n".join([line(COLUMNS), *map(line, cells)])


def plot(records: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 5))
    for rec in records:
        ep = rec["epochs"]
        t = np.cumsum([e["train_s"] for e in ep])
        ax.plot(t, [100 * e["test_acc"] for e in ep], "o-", ms=3, label=f"{rec['_path']} ({rec['config']['preset']})")
    ax.set(xlabel="cumulative training time (s, evaluation excluded)", ylabel="test accuracy (%)",
           title="Test accuracy against training time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


def per_class_table(records: list[dict]) -> str | None:
    """Each finished run's test accuracy per class (record.json's per_class_acc), a row per run;
    None when no run has it (runs of earlier versions, unfinished runs)."""
    have = [r for r in records if r.get("per_class_acc")]
    if not have:
        return None
    names = list(have[0]["per_class_acc"])
    width = max(len(r["_path"]) for r in have)
    lines = ["per-class test accuracy:", "run".ljust(width) + "".join(f"  {n[:10]:>10}" for n in names)]
    for r in have:
        lines.append(r["_path"].ljust(width) + "".join(f"  {r['per_class_acc'].get(n, float('nan')):>10.1%}"
                                                       for n in names))
    return "\n".join(lines)


def compare(run_dirs: list[str], png: str = "compare.png", log=print) -> list[dict]:
    records = [read_record(d) for d in run_dirs]
    rows = [row(r) for r in records]
    log(table(rows))
    classes = per_class_table(records)
    if classes:
        log(classes)
    plot(records, Path(png))
    log(f"plot: {png}")
    return rows
