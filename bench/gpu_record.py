"""The full GPU measurement, in one command:  python -m bench.gpu_record

1. the `paper` preset for 50 epochs (wall time including evaluation, per-epoch time, accuracy)
2. the 'step' and 'kernels' benchmark groups (pytest-benchmark, JSON)
3. writes bench/results/<date>-<gpu>.json and a short .md summary next to it

`python -m bench.gpu_record --table` prints the Markdown table of all committed records, as
shown in the README. Needs CUDA (`--allow-cpu` exists to test this script itself on a CPU).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def run_benchmarks(selection: list[str], env: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "b.json"
        r = subprocess.run([sys.executable, "-m", "pytest", *selection, "-q", "-p", "no:cacheprovider",
                            f"--benchmark-json={out}"], cwd=REPO, env={**os.environ, **env},
                           stdout=sys.stderr)
        if not out.exists():
            raise SystemExit(f"benchmarks failed (exit {r.returncode})")
        data = json.loads(out.read_text())
    return [{"group": b["group"], "name": b["name"], "median_s": b["stats"]["median"],
             "min_s": b["stats"]["min"], "rounds": b["stats"]["rounds"], **b["extra_info"]}
            for b in data["benchmarks"]]


def table(records: list[dict]) -> str:
    rows = ["| date | GPU | torch | preset | epoch time (s) | 50-epoch wall (s) | test acc |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(records, key=lambda r: r["date"]):
        t = r["train"]
        rows.append(f"| {r['date']} | {r['gpu']} | {r['torch']} | {t['preset']} | {t['mean_epoch_train_s']:.2f} | "
                    f"{t['wall_s']:.0f} | {100 * t['final_test_acc']:.2f}% |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_record", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="paper")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's epochs (for a quick check)")
    p.add_argument("--data", default=str(REPO / "data"))
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--table", action="store_true", help="print the table of committed records and exit")
    p.add_argument("--allow-cpu", action="store_true", help="run without CUDA (only to test this script)")
    p.add_argument("--minimal-bench", action="store_true", help="tiny benchmark rounds (only to test this script)")
    p.epilog = "Other --key value settings override the preset's, as for `fastres train`."
    a, rest = p.parse_known_args(argv)
    if a.table:
        print(table([json.loads(f.read_text()) for f in sorted(Path(a.out).glob("*.json"))]))
        return 0
    if not torch.cuda.is_available() and not a.allow_cpu:
        print("bench.gpu_record: error: no CUDA device; this records GPU results", file=sys.stderr)
        return 2

    from fastres.config import make_config, parse_overrides
    from fastres.train import train

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    over = {**parse_overrides(rest), "data": a.data, "out": str(REPO / "runs" / f"gpu-record-{a.preset}")}
    if a.epochs:
        over["epochs"] = a.epochs
    cfg = make_config(a.preset, over)
    t0 = time.perf_counter()
    rec = train(cfg)
    wall = time.perf_counter() - t0
    env = {"FASTRES_BENCH_DATA": a.data, **({"FASTRES_BENCH_MINIMAL": "1"} if a.minimal_bench else {})}
    bench = run_benchmarks(["bench/test_step.py", "bench/test_kernels.py"], env)

    date = datetime.date.today().isoformat()
    result = {
        "date": date, "gpu": gpu, "torch": torch.__version__, "environment": rec["environment"],
        "train": {"preset": a.preset, "config": rec["config"], "switches": rec["switches"], "wall_s": wall,
                  "warmup_s": rec["warmup_s"], "mean_epoch_train_s": rec["mean_epoch_train_s"],
                  "epoch_train_s": [e["train_s"] for e in rec["epochs"]],
                  "test_acc_per_epoch": [e["test_acc"] for e in rec["epochs"]],
                  "final_test_acc": rec["final_test_acc"], "train_s_total": rec["train_s_total"],
                  "eval_s_total": rec["eval_s_total"]},
        "benchmarks": bench,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{date}-{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-').lower()}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str))
    lines = [f"# {gpu}, {date}", "", f"torch {torch.__version__}; preset `{a.preset}`", "", table([result]), "",
             "| group | benchmark | images/s or GB/s | median |", "| --- | --- | --- | --- |"]
    for b in bench:
        rate = (f"{b['images_per_s']:.0f} img/s" if "images_per_s" in b else
                f"{b.get('gb_per_s', 0):.0f} GB/s ({100 * b.get('fraction_of_dram', 0):.0f}% of DRAM)")
        lines.append(f"| {b['group']} | {b['name']} | {rate} | {1000 * b['median_s']:.3f} ms |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
