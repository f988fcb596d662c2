"""The full GPU measurement:  python -m bench.gpu_record [PHASE]

Phases (default `all` = train, bench, write, in one go):
  train   the preset's full run (default `paper`, 50 epochs) in runs/gpu-record/train-<preset>/
          (train-<name> with --name, for a variant: --name paper-fp16 --amp fp16);
          run it again after an interruption and it resumes from the last finished epoch (so a
          machine whose jobs have a time limit can train in several jobs). --seeds S1 S2 ...: one
          run per seed in train-<preset>/seed<S>, --pack K of them at a time (fastres.packed);
          the record gives each seed, their mean and std, and the group's wall time
  bench   the benchmark groups (default loader, step, kernels, kernel_host, baseline) with
          pytest-benchmark; each case's result is appended to runs/gpu-record/bench.jsonl as it
          finishes (a case run again replaces its earlier result)
  write   bench/results/<date>-<gpu>-<preset>.json (-<preset>-<N>seeds.json for --seeds; GPU,
          torch, per-epoch times, accuracy, benchmarks) and a short .md beside it, from the
          finished training run and the benchmarks (--bench-only: the benchmarks alone, as
          <date>-<gpu>-bench.json)
  table   print the Markdown table of all committed records (docs/gpu-records.md's)
  readme  rewrite the README's results table and docs/gpu-records.md from the committed records

Needs CUDA (`--allow-cpu` exists to test this script itself on a CPU).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
WORK = REPO / "runs" / "gpu-record"
GROUPS = {"loader": "bench/test_loader.py", "step": "bench/test_step.py", "kernels": "bench/test_kernels.py",
          "kernel_host": "bench/test_kernel_host.py", "epoch": "bench/test_epoch.py",
          "baseline": "bench/test_baseline.py", "pack": "bench/test_pack.py",
          "startup": "bench/test_startup.py", "rerun": "bench/test_rerun.py"}


def run_benchmarks(groups: list[str], env: dict, jsonl: Path, select: str | None = None) -> int:
    """Run the groups' benchmarks; each case appends its row to `jsonl` as soon as it finished.

    pytest runs in a process group of its own, and a SIGTERM or SIGINT sent to this script (a job's
    time limit, `timeout`, Ctrl-C) ends that whole group: pytest and the DataLoader workers it
    started. Otherwise they would run on after this script was stopped, holding the GPU and the
    output pipe of whatever waits for this job."""
    cmd = [sys.executable, "-m", "pytest", *(GROUPS[g] for g in groups), "-q", "-p", "no:cacheprovider",
           "--benchmark-disable-gc", "--benchmark-columns=min,median,rounds"] + (["-k", select] if select else [])
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env, "FASTRES_BENCH_JSONL": str(jsonl)},
                            stdout=sys.stderr, start_new_session=True)

    stopped = []

    def stop(signum, frame):  # a second signal does not wait any more
        stopped.append(signum)
        try:
            os.killpg(proc.pid, signal.SIGTERM if len(stopped) == 1 else signal.SIGKILL)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # workers that outlived pytest
        except ProcessLookupError:
            pass
        print(f"bench.gpu_record: stopped by signal {stopped[0]}; the cases that finished are kept", file=sys.stderr)
        raise SystemExit(128 + stopped[0])
    return code


def read_bench(work: Path) -> list[dict]:
    """The benchmark rows of all bench phases so far; a case run again replaces its earlier row."""
    path = work / "bench.jsonl"
    rows = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        rows[(r["group"], r["name"])] = r
    return list(rows.values())


def read_json(path: Path, missing):
    return json.loads(path.read_text()) if path.exists() else missing


def is_record(r) -> bool:
    """A record written by `write` (profiles and other JSON files beside the records are not)."""
    return isinstance(r, dict) and {"date", "gpu", "train", "benchmarks"} <= r.keys()


def run_switches(run: dict) -> dict:
    """What a run's switches resolved to (`run`: its record.json, or a record's `train`); runs
    recorded before the switches named the data placement give it in their config."""
    return {"data_placement": run["config"].get("data_placement", "stream"), **run["switches"]}


def step_mode(t: dict) -> str:
    """The compile mode, plus the whole step and device-resident data where the run used them."""
    sw = run_switches(t)
    parts = [sw["compile"]]
    if sw.get("whole_step", "off").startswith("one CUDA graph"):
        parts.append("whole step")
    if sw["data_placement"] == "device":
        parts.append("resident data")
    return " + ".join(parts)


def accuracy_cell(t: dict) -> str:
    """A training run's final test accuracy; for a group of seeds, their mean ± std."""
    if t.get("seeds"):
        return f"{100 * t['final_test_acc']:.2f} ± {100 * t['final_test_acc_std']:.2f}%"
    return f"{100 * t['final_test_acc']:.2f}%"


def table(records: list[dict]) -> str:
    rows = ["| date | GPU | torch | preset | compile, step, data | epoch time (s) | training + eval (s) | test acc |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(filter(is_record, records), key=lambda r: r["date"]):
        t = r["train"]
        if t is None:
            groups = ", ".join(r["benchmark_groups"])
            rows.append(f"| {r['date']} | {r['gpu']} | {r['torch']} | no training run (benchmarks: {groups}) "
                        "| | | | |")
            continue
        done = "" if t.get("status", "finished") == "finished" else \
            f" ({t['status']} after {t['epochs_done']}/{t['epochs_planned']} epochs)"
        if t.get("seeds"):  # a group of seeds: their means, the accuracy's std, the group's wall time
            done += f", {len(t['seeds'])} seeds" + (f" packed {t['pack']} at a time" if t["pack"] > 1 else "") + \
                f", {t['wall_s']:.0f} s wall for all"
        rows.append(f"| {r['date']} | {r['gpu']} | {r['torch']} | {t['preset']}{done} | {step_mode(t)} | "
                    f"{t['mean_epoch_train_s']:.2f} | "
                    f"{t['train_s_total'] + t['eval_s_total']:.0f} | {accuracy_cell(t)} |")
    return "\n".join(rows)


def records_in(folder: Path) -> list[tuple[str, dict]]:
    """(file name, record) of every record in folder, oldest first (profiles beside them are not)."""
    found = ((f.name, json.loads(f.read_text())) for f in sorted(folder.glob("*.json")))
    return sorted(((n, r) for n, r in found if is_record(r)), key=lambda nr: nr[1]["date"])


def results_table(records: list[tuple[str, dict]], link: str) -> str:
    """The README's table: one row per recorded training run (card, preset, epoch time, accuracy),
    each linking the record's .md under link."""
    rows = ["| card | preset | compile, step, data | epoch (s) | training (s) | test acc | record |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in records:
        t = r["train"]
        if t is None:
            continue
        preset = t["preset"] + ("" if t.get("status", "finished") == "finished"
                                else f" ({t['epochs_done']}/{t['epochs_planned']} epochs)")
        if t.get("seeds"):
            preset += f", {len(t['seeds'])} seeds"
        md = name.removesuffix(".json") + ".md"
        rows.append(f"| {r['gpu']} | {preset} | {step_mode(t)} | {t['mean_epoch_train_s']:.2f} | "
                    f"{t['train_s_total']:.0f} | {accuracy_cell(t)} | [{r['date']}]({link}{md}) |")
    return "\n".join(rows)


README_START = "<!-- results: generated by `python -m bench.gpu_record readme` from bench/results/ -->"
README_END = "<!-- /results -->"


def gpu_records_page(records: list[tuple[str, dict]]) -> str:
    """docs/gpu-records.md, whole: the table of every record and each record's own summary."""
    lines = ["# GPU records", "",
             "Generated by `python -m bench.gpu_record readme` from the records in `bench/results/`; do not",
             "edit by hand. Each row's full record, with every benchmark, is the `.md` beside its `.json`.",
             "How to make one: [benchmarks.md](benchmarks.md); what each showed: [CHANGELOG.md](../CHANGELOG.md).",
             "", table([r for _, r in records]), "", "## The records", ""]
    for name, r in records:
        md = name.removesuffix(".json") + ".md"
        lines.append(f"- [{md}](../bench/results/{md}): {r['gpu']}, torch {r['torch']}"
                     + (f", {r['train']['preset']}" if r["train"] else ", benchmarks only")
                     + (f". {r['note']}" if r.get("note") else ""))
    return "\n".join(lines) + "\n"


def write_readme(results: Path, readme: Path, page: Path) -> None:
    """Replace the README's block between README_START and README_END and write page."""
    records = records_in(results)
    text = readme.read_text()
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    readme.write_text(text[:start] + "\n" + results_table(records, "bench/results/") + "\n" + text[end:])
    page.write_text(gpu_records_page(records))


def kernel_goals(bench: list[dict]) -> str:
    """Fused Triton BN+ReLU against torch.compile's fusion per case: the issue's goals are >= 1.2x
    and >= 80% of DRAM bandwidth."""
    by = {(tuple(b["shape"]), b["pass_"], b["timing"], b["impl"]): b for b in bench if b["group"] == "kernels"}
    rows = ["| shape | pass | timing | fused (us) | torch.compile (us) | eager (us) | fused vs compile | "
            "fused % of DRAM |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (shape, pass_, timing, impl), f in sorted(by.items()):
        c, e = by.get((shape, pass_, timing, "torch_compile")), by.get((shape, pass_, timing, "eager"))
        if impl != "fused_triton" or c is None or e is None:
            continue
        rows.append(f"| {'x'.join(map(str, shape))} | {pass_} | {timing} | {1e6 * f['per_call_s']:.1f} | "
                    f"{1e6 * c['per_call_s']:.1f} | {1e6 * e['per_call_s']:.1f} | "
                    f"{c['per_call_s'] / f['per_call_s']:.2f}x | {100 * f['fraction_of_dram']:.0f}% |")
    return "\n".join(rows)


def phase_train(a, rest, work: Path) -> None:
    import dataclasses

    from fastres.config import make_config, parse_overrides
    from fastres.packed import train_packed
    from fastres.train import train

    run = work / f"train-{a.name}"
    over = {**parse_overrides(rest), "data": a.data, "out": str(run)}
    if a.epochs:
        over["epochs"] = a.epochs
    cfg = make_config(a.preset, over)
    if a.seeds:  # the group is known before it trains: a run stopped by a time limit is written too
        run.mkdir(parents=True, exist_ok=True)
        (run / "group.json").write_text(json.dumps({"seeds": a.seeds, "pack": a.pack}))
    t0 = time.perf_counter()
    try:
        if not a.seeds:
            train(cfg, resume=True)
        else:  # one run per seed, `pack` at a time; each resumes what its folder holds
            cfgs = [dataclasses.replace(cfg, seed=s, out=str(run / f"seed{s}")) for s in a.seeds]
            if a.pack > 1:
                results = train_packed(cfgs, resume=True, names=[f"seed{c.seed}" for c in cfgs], slots=a.pack)
            else:
                results = [train(c, resume=True) for c in cfgs]
            failed = [r for r in results if not isinstance(r, dict)]
            if failed:
                raise failed[0]
    finally:  # this process's wall time counts in the record whether it finished or was stopped
        walls = read_json(run / "walls.json", [])
        if run.exists():
            (run / "walls.json").write_text(json.dumps(walls + [time.perf_counter() - t0]))


def phase_bench(a, work: Path) -> None:
    env = {"FASTRES_BENCH_DATA": a.data, **({"FASTRES_BENCH_MINIMAL": "1"} if a.minimal_bench else {})}
    code = run_benchmarks(a.groups, env, work / "bench.jsonl", a.select)
    if code:
        print(f"bench.gpu_record: pytest exited with {code}; the cases that finished are kept", file=sys.stderr)


def baseline_ratio(bench: list[dict], run_epoch_s: float | None) -> dict | None:
    """Epoch time of the plain-PyTorch baseline, and its ratio to fastres's (its default in the same
    benchmark group, and this record's training run), as far as those ran."""
    by = {b["name"]: b for b in bench if b["group"] == "baseline"}
    base, ours = by.get("test_torchvision_style"), by.get("test_fastres_default")
    if base is None:
        return None
    r = {"baseline_epoch_s": base["epoch_train_s"], "epochs": base["epochs"], "baseline_workers": base.get("workers")}
    if ours is not None:
        r.update(fastres_default_epoch_s=ours["epoch_train_s"], ratio_default=base["epoch_train_s"] / ours["epoch_train_s"])
    if run_epoch_s:
        r.update(record_run_epoch_s=run_epoch_s, ratio_record_run=base["epoch_train_s"] / run_epoch_s)
    return r


def baseline_line(b: dict) -> str:
    parts = [f"Plain PyTorch (bench/baseline.py) {b['baseline_epoch_s']:.2f} s per epoch"]
    if "ratio_default" in b:
        parts.append(f"fastres's default {b['fastres_default_epoch_s']:.2f} s ({b['ratio_default']:.1f}x faster)")
    else:
        parts.append("fastres's default did not finish in this record")
    if "ratio_record_run" in b:
        parts.append(f"this record's training run {b['record_run_epoch_s']:.2f} s ({b['ratio_record_run']:.1f}x faster)")
    return "; ".join(parts) + "."


def bench_environment(bench: list[dict], a) -> tuple[str, str]:
    """GPU and torch version of the machine that ran the benchmarks: from the rows (each row carries
    them), else from --gpu/--torch (rows written before they did)."""
    envs = [b["environment"] for b in bench if "environment" in b]
    if envs:
        kinds = {(e["gpu"], e["torch"]) for e in envs}
    else:
        kinds = {(b["switches"]["device_name"], a.torch) for b in bench if "device_name" in b.get("switches", {})}
    if len(kinds) > 1:
        raise SystemExit(f"bench.gpu_record: error: the benchmark rows come from different GPUs or torch versions "
                         f"({sorted(kinds)}); write each one's rows from a work folder of their own")
    gpu, torch_version = kinds.pop() if kinds else (None, a.torch)
    gpu = gpu or a.gpu
    if not gpu or not torch_version:
        raise SystemExit("bench.gpu_record: error: the benchmark rows do not say which GPU and torch ran them; "
                         "give --gpu NAME and --torch VERSION")
    return gpu, torch_version


def _finished_record(folder: Path, a, run: Path) -> dict:
    """The record.json of a training run of the train phase, refused if it has nothing to record
    (or is unfinished, without --allow-unfinished)."""
    if not (folder / "record.json").exists():
        raise SystemExit(f"bench.gpu_record: error: no training run in {folder}; run the `train` phase first "
                         "(or record the benchmarks alone with --bench-only)")
    rec = json.loads((folder / "record.json").read_text())
    done, planned = len(rec["epochs"]), rec["config"]["epochs"]
    if not rec["epochs"]:  # stopped (or diverged) before its first epoch ended: no figure to record
        raise SystemExit(f"bench.gpu_record: error: the training run in {folder} is {rec['status']} before its "
                         f"first epoch ended; nothing of it to record: run `train` again (or record the "
                         "benchmarks alone with --bench-only)")
    if rec["status"] != "finished" and not a.allow_unfinished:
        raise SystemExit(f"bench.gpu_record: error: the training run in {folder} is {rec['status']} after "
                         f"{done}/{planned} epochs; run `train` again to resume (or write it as it is with "
                         "--allow-unfinished)")
    return rec


def _train_block(rec: dict, preset: str) -> dict:
    """A training run's figures in a record."""
    return {"preset": preset, "status": rec["status"], "epochs_done": len(rec["epochs"]),
            "epochs_planned": rec["config"]["epochs"], "config": rec["config"], "switches": rec["switches"],
            "resumed_at_epoch": rec["resumed_at_epoch"], "warmup_s": rec["warmup_s"],
            "mean_epoch_train_s": rec["mean_epoch_train_s"], "epoch_train_s": [e["train_s"] for e in rec["epochs"]],
            "images_per_s": [e["images_per_s"] for e in rec["epochs"]],
            "test_acc_per_epoch": [e["test_acc"] for e in rec["epochs"]],
            "final_test_acc": rec["final_test_acc"], "best_test_acc": rec["best_test_acc"],
            "train_s_total": rec["train_s_total"], "eval_s_total": rec["eval_s_total"], "seed": rec["config"]["seed"],
            "train_loss_per_epoch": [e["train_loss"] for e in rec["epochs"]],
            "loss_scaling": rec.get("loss_scaling")}  # fp16: steps skipped, final scale


def phase_write(a, work: Path, gpu: str) -> Path:
    run = work / f"train-{a.name}"
    bench = read_bench(work)
    date = datetime.date.today().isoformat()
    if a.bench_only:
        if not bench:
            raise SystemExit(f"bench.gpu_record: error: no benchmark rows in {work / 'bench.jsonl'}; run `bench` first")
        gpu, torch_version = bench_environment(bench, a)
        env, train, rec = {"device_name": gpu, "torch": torch_version}, None, None
    else:
        group = read_json(run / "group.json", None)
        folders = [run / f"seed{s}" for s in group["seeds"]] if group else [run]
        recs = [_finished_record(f, a, run) for f in folders]
        rec, walls = recs[0], read_json(run / "walls.json", [])
        env = dict(rec["environment"])
        # GPU and torch of the machine that trained (write may run elsewhere, from copied results)
        gpu, torch_version = env.get("device_name") or gpu, env.get("torch") or torch.__version__
        blocks = [_train_block(r, a.preset) for r in recs]
        train = {**blocks[0], "wall_s": sum(walls), "processes": len(walls)}
        if group:  # the seeds' figures, and their means where one run's stood
            acc = [b["final_test_acc"] for b in blocks]
            train.update({k: statistics.fmean(b[k] for b in blocks) for k in (
                "final_test_acc", "best_test_acc", "mean_epoch_train_s", "train_s_total", "eval_s_total", "warmup_s")})
            train.update(seeds=group["seeds"], pack=group["pack"], per_seed=blocks,
                         final_test_acc_std=statistics.stdev(acc) if len(acc) > 1 else 0.0,
                         status=next((b["status"] for b in blocks if b["status"] != "finished"), "finished"),
                         epochs_done=min(b["epochs_done"] for b in blocks))
    if os.environ.get("FASTRES_GIT_COMMIT"):  # the tree's own commit, where its .git was stale or absent
        env["git_commit"] = os.environ["FASTRES_GIT_COMMIT"]
    result = {
        "date": date, "gpu": gpu, "torch": torch_version, "environment": env, "note": a.note, "train": train,
        "baseline": baseline_ratio(bench, train and train["mean_epoch_train_s"]),
        "benchmark_groups": sorted({b["group"] for b in bench}),
        "benchmarks": bench,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # one file per GPU, day and kind of record: the benchmarks alone, or a preset's run (its seeds)
    kind = "bench" if a.bench_only else a.name + (f"-{len(train['seeds'])}seeds" if train.get("seeds") else "")
    stem = f"{date}-{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-').lower()}-{kind}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str))
    if rec is None:
        lines = [f"# {gpu}, {date}: benchmarks only", "", f"torch {torch_version}; no training run in this record."]
    else:
        lines = [f"# {gpu}, {date}", "", f"torch {torch_version}; preset `{a.preset}`; switches: " +
                 ", ".join(f"{k} {v}" for k, v in run_switches(rec).items()
                           if k in ("compile", "amp", "fused_bn_relu", "channels_last", "whole_step", "data_placement"))]
    lines += ["", a.note] if a.note else []
    lines += ["", table([result]), "",
              "| group | benchmark | images/s or GB/s | median per step or call |", "| --- | --- | --- | --- |"]
    for b in bench:
        rate = (f"{b['images_per_s']:.0f} img/s" if "images_per_s" in b else
                f"{b['host_us_per_fwd_bwd']:.1f} us host per fwd+bwd" if "host_us_per_fwd_bwd" in b else
                f"{b['seconds_per_process']:.2f} s per process" if "seconds_per_process" in b else
                f"{b.get('gb_per_s', 0):.0f} GB/s ({100 * b.get('fraction_of_dram', 0):.0f}% of DRAM)")
        per = b.get("per_call_s", b["median_s"] / b.get("steps_per_round", 1))
        lines.append(f"| {b['group']} | {b['name']} | {rate} | {1000 * per:.3f} ms |")
    if result["baseline"]:
        lines += ["", baseline_line(result["baseline"])]
    lines += ["", kernel_goals(bench)] if any(b["group"] == "kernels" for b in bench) else []
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.json and .md")
    return out / f"{stem}.json"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_record", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", nargs="?", default="all", choices=["all", "train", "bench", "write", "table", "readme"])
    p.add_argument("--preset", default="paper")
    p.add_argument("--name", default=None, help="the run's folder (train-NAME) and the record's file name in place "
                                                "of the preset's, for a variant of it (paper-fp16 with --amp fp16)")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's epochs (for a quick check)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S",
                   help="train: one run per seed (train-<preset>/seed<S>); write: records each, their mean and std")
    p.add_argument("--pack", type=int, default=1, metavar="K", help="train --seeds: K runs at a time (fastres.packed)")
    p.add_argument("--groups", nargs="+", default=["loader", "step", "kernels", "kernel_host", "baseline"], choices=list(GROUPS),
                   help="benchmark groups of the bench phase")
    p.add_argument("--select", default=None, metavar="EXPR", help="only the cases pytest's -k EXPR selects")
    p.add_argument("--data", default=str(REPO / "data"), help=".beton folder (converted on demand)")
    p.add_argument("--work", default=str(WORK), help="where the phases keep the training run and benchmarks")
    p.add_argument("--out", default=str(RESULTS), help="where `write` puts the record")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="write: record a training run that stopped early (interrupted, out of time), marked so")
    p.add_argument("--bench-only", action="store_true",
                   help="write: a record of the benchmarks alone, without a training run (<date>-<gpu>-bench.json)")
    p.add_argument("--gpu", default=None, help="write --bench-only: the GPU, for rows that do not name it")
    p.add_argument("--torch", default=None, help="write --bench-only: the torch version, for rows that do not give it")
    p.add_argument("--note", default="", help="write: a line of context kept in the record and its summary")
    p.add_argument("--allow-cpu", action="store_true", help="run without CUDA (only to test this script)")
    p.add_argument("--minimal-bench", action="store_true", help="tiny benchmark rounds (only to test this script)")
    p.epilog = "Other --key value settings override the preset's in the train phase, as for `fastres train`."
    a, rest = p.parse_known_args(argv)
    a.name = a.name or a.preset
    if a.phase == "table":
        print(table([r for _, r in records_in(Path(a.out))]))
        return 0
    if a.phase == "readme":
        write_readme(Path(a.out), REPO / "README.md", REPO / "docs" / "gpu-records.md")
        return 0
    if not torch.cuda.is_available() and not a.allow_cpu and a.phase != "write":
        print("bench.gpu_record: error: no CUDA device; this records GPU results", file=sys.stderr)
        return 2
    if rest and a.phase not in ("all", "train"):
        p.error(f"settings {' '.join(rest)} apply to the train phase only")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.phase in ("all", "train"):
        phase_train(a, rest, work)
    if a.phase in ("all", "bench"):
        phase_bench(a, work)
    if a.phase in ("all", "write"):
        phase_write(a, work, torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    return 0


if __name__ == "__main__":
    from fastres.errors import cli_main

    sys.exit(cli_main("bench.gpu_record", main))  # a stopped or failed training run: one line, its exit status
