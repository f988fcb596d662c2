"""`fastres sweep`: run a preset for several seeds, one after another, and summarize.

Each seed runs in OUT/seed<N>; a seed whose record.json says 'finished' is read, not rerun.
The summary (mean and sample std over seeds of final accuracy and epoch time) is printed and
saved to OUT/summary.json.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from .config import from_dict, make_config
from .rundir import CHECKPOINT, RECORD, RUN_FILES
from .train import train


def summarize(records: list[dict]) -> dict:
    acc = [r["final_test_acc"] for r in records]
    ep = [r["mean_epoch_train_s"] for r in records]
    sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
    return {"seeds": [r["config"]["seed"] for r in records], "final_test_acc": acc,
            "acc_mean": statistics.fmean(acc), "acc_std": sd(acc),
            "epoch_train_s_mean": statistics.fmean(ep), "epoch_train_s_std": sd(ep),
            "device_name": records[0]["environment"]["device_name"], "torch": records[0]["environment"]["torch"]}


def sweep(preset: str, seeds: list[int], overrides: dict, out: str | None = None, log=print) -> dict:
    out = Path(out or f"runs/sweep-{preset}")
    cfgs = [make_config(preset, {**overrides, "seed": s, "out": str(out / f"seed{s}")}) for s in seeds]
    records = []
    for cfg in cfgs:
        rec_path = Path(cfg.out) / RECORD
        rec = json.loads(rec_path.read_text()) if rec_path.is_file() else None
        if rec and rec.get("status") == "finished" and from_dict(rec["config"]) == cfg:
            log(f"seed {cfg.seed}: finished run found in {cfg.out}, reading it")
        else:
            # an unfinished run of this sweep continues (from scratch if it wrote no checkpoint yet)
            resume = any((Path(cfg.out) / f).exists() for f in RUN_FILES)
            log(f"seed {cfg.seed}: {'resuming' if (Path(cfg.out) / CHECKPOINT).is_file() else 'training'} in {cfg.out}")
            rec = train(cfg, resume=resume)
        records.append(rec)
    s = {"preset": preset, "overrides": overrides, **summarize(records)}
    (out / "summary.json").write_text(json.dumps(s, indent=2))
    log(f"{preset}: test accuracy {100 * s['acc_mean']:.2f} ± {100 * s['acc_std']:.2f} % over seeds {seeds}; "
        f"epoch {s['epoch_train_s_mean']:.2f} ± {s['epoch_train_s_std']:.2f} s ({s['device_name']})")
    return s
