"""Several seeds of one configuration: their runs, and their mean ± std. Written once, used by
`fastres train --seeds`, `fastres sweep --preset P --seeds` and a sweep file's trials.

    cfgs = seed_configs(cfg, [0, 1, 2], base)        # base/seed0, base/seed1, base/seed2
    results = train_each(cfgs, pack=3)               # records (or the error a run ended with)
    s = seed_summary(records)                        # mean ± std of final accuracy and epoch time
"""
from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

from .config import Config, from_dict
from .errors import BadInput, FastresError, Interrupted
from .rundir import RECORD, RUN_FILES, atomic_write

SUMMARY = "summary.json"  # BASE/summary.json: the seeds' summary


def seed_configs(cfg: Config, seeds: list[int], base: Path) -> list[Config]:
    if len(set(seeds)) != len(seeds):
        raise BadInput(f"--seeds: each seed once; got {seeds}")
    return [dataclasses.replace(cfg, seed=s, out=str(base / f"seed{s}")) for s in seeds]


def finished_record(cfg: Config) -> dict | None:
    """The record of a run of exactly cfg that finished (read, not trained again), else None."""
    try:
        rec = json.loads((Path(cfg.out) / RECORD).read_text())
        return rec if rec.get("status") == "finished" and from_dict(rec["config"]) == cfg else None
    except (OSError, ValueError, KeyError, BadInput, TypeError):
        return None


def holds_a_run(cfg: Config) -> bool:
    """Whether cfg's folder holds a run (to be resumed rather than started)."""
    return any((Path(cfg.out) / f).exists() for f in RUN_FILES)


def train_each(cfgs: list[Config], pack: int = 1, resume: list[bool] | None = None, log=print) -> list:
    """Train every config, `pack` at a time (fastres.packed) or one after another, each exactly the
    run `fastres train` makes; resume: per config, whether to resume its folder's run. A run that diverges or cannot write its output ends with its error
    in the list and the others go on; a stop request or bad input stops them all."""
    from .packed import train_packed
    from .train import train

    if pack < 1:
        raise BadInput(f"--pack: at least 1; got {pack}")
    resume = resume or [False] * len(cfgs)
    if pack > 1 and len(cfgs) > 1:
        return train_packed(cfgs, any(resume), log, names=[f"seed{c.seed}" for c in cfgs], slots=pack)
    results = []
    for c, again in zip(cfgs, resume):
        try:
            results.append(train(c, resume=again, log=log))
        except FastresError as e:
            if isinstance(e, (Interrupted, BadInput)):
                raise
            results.append(e)
    return results


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0  # sample std; one seed has none


def seed_summary(records: list[dict]) -> dict:
    """The seeds' figures from their runs' records: each final accuracy, their mean and sample std,
    the mean best accuracy, the epoch time's mean and std, the training seconds of all, the device."""
    acc = [r["final_test_acc"] for r in records]
    epoch_s = [r["mean_epoch_train_s"] for r in records]
    env = records[0]["environment"]
    return {"seeds": [r["config"]["seed"] for r in records], "final_test_acc": acc,
            "acc_mean": statistics.fmean(acc), "acc_std": _std(acc),
            "best_acc_mean": statistics.fmean(r["best_test_acc"] for r in records),
            "epoch_train_s_mean": statistics.fmean(epoch_s), "epoch_train_s_std": _std(epoch_s),
            "train_s": round(sum(r["train_s_total"] for r in records), 3),
            "device": env["device_name"], "torch": env["torch"]}


def summary_line(s: dict) -> str:
    return (f"test accuracy {s['acc_mean']:.2%} ± {s['acc_std']:.2%} over seeds {s['seeds']}; "
            f"epoch {s['epoch_train_s_mean']:.2f} ± {s['epoch_train_s_std']:.2f} s ({s['device']})")


def report(cfgs: list[Config], results: list, base: Path, log=print, **extra) -> dict | None:
    """A line per seed, then (with any finished) their summary: printed and saved to
    base/summary.json with `extra`. None when no run finished."""
    for c, r in zip(cfgs, results):
        what = f"{r['final_test_acc']:.2%}" if isinstance(r, dict) and "final_test_acc" in r else f"{r}"
        log(f"seed {c.seed}: {what} ({c.out})")
    done = [r for r in results if isinstance(r, dict) and r.get("final_test_acc") is not None]
    if not done:
        return None
    s = {**extra, **seed_summary(done)}
    atomic_write(base / SUMMARY, lambda p: p.write_text(json.dumps(s, indent=2)))
    log(summary_line(s))
    return s
