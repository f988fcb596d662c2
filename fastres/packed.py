"""Several runs at once in one process on one device, advanced in turn (`--pack K`).

    records = train_packed([cfg_seed0, cfg_seed1, cfg_seed2])   # a record, or the error, per run

At the paper's batch of 64 one ResNet-68 step leaves most of a GPU idle: its ~1,000 small kernels
each occupy a fraction of the multiprocessors. Runs advanced in turn, each on its own CUDA stream
with its own whole-step graph, let the host launch one replay per run per round and their kernels
overlap. Separate processes on one GPU take turns instead (without MPS), so this happens here.

Each run is the generator `fastres.train.run`, exactly as `fastres train` runs it: its own folder,
lock, checkpoint, record and metrics, its own seed (its data order and augmentation are functions
of (seed, epoch) only, so turns taken by other runs change nothing in it: on a CPU a packed run
ends with the records of the same run trained alone, to the bit). Packed runs with resident data
share one copy of it on the device. A run that diverges or fails ends with its status and the
others go on; Ctrl-C stops every run at its next step, each resumable packed or alone.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch

from .config import Config
from .design import check_budget
from .distributed import Dist
from .errors import BadInput, FastresError, Interrupted
from .rundir import StopRequest
from .runtime import resolve_device
from .train import open_run_dir, run


def train_packed(cfgs: list[Config], resume: bool = False, log=print, names: list[str] | None = None,
                 logs: list | None = None, on_epochs: list | None = None, slots: int | None = None) -> list:
    """Train cfgs, `slots` at a time (default: all at once); per run its record, or the
    FastresError that ended it (diverged, output). A run that ends leaves its slot to the next
    one waiting. Raises Interrupted once every started run has stopped if Ctrl-C (or SIGTERM)
    asked. names: how the group's lines name each run (default: its folder's name); logs: a log
    function per run (default: `log`, each line prefixed with the run's name); on_epochs:
    train()'s on_epoch per run."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise BadInput("--pack runs several runs in one process: not under torchrun")
    devices = {str(resolve_device(c.device)) for c in cfgs}
    if len(devices) > 1:
        raise BadInput(f"--pack: the packed runs must share one device; got {', '.join(sorted(devices))}")
    for c in cfgs:
        check_budget(c)  # an over-budget member is refused before any folder is touched
    t_start = time.perf_counter()
    dist = Dist()
    device = resolve_device(cfgs[0].device)
    cuda = device.type == "cuda"
    slots = min(slots or len(cfgs), len(cfgs))
    with contextlib.ExitStack() as held:
        opened = [open_run_dir(c, resume, dist, held, log) for c in cfgs]  # every folder checked and locked first
        names = names or [out.name for _, out in opened]
        stop = held.enter_context(StopRequest(log))
        shared = {}  # resident data: one copy for the group
        logs = logs or [_prefixed(log, n) for n in names]
        on_epochs = on_epochs or [None] * len(cfgs)
        runs = [run(c, resume, logs[i], dist, out, stop, t_start, on_epochs[i], progress=False, shared_data=shared)
                for i, (c, out) in enumerate(opened)]  # generators: nothing runs before their first turn
        streams = [torch.cuda.Stream(device) for _ in range(slots)] if cuda else [None] * slots
        results: list = [None] * len(runs)
        active, waiting = list(range(slots)), list(range(slots, len(runs)))
        slot_of = {i: i for i in active}
        log(f"packed {len(runs)} runs on {device}, {slots} at a time: {', '.join(names)}" +
            (" (one CUDA stream each)" if cuda else " (advanced in turn)"))
        last = time.monotonic()

        def advance(i):
            with torch.cuda.stream(streams[slot_of[i]]) if cuda else contextlib.nullcontext():
                next(runs[i])

        def ready(i):
            """Run i set up and warmed up (its first turn), before any epoch of the group is timed."""
            try:
                advance(i)
            except torch.OutOfMemoryError:
                raise BadInput(f"--pack {slots}: the device ran out of memory setting up run {i + 1} "
                               f"({names[i]}); --pack {max(1, len(active) - 1)} may fit") from None

        for i in active:
            ready(i)
        if cuda:
            torch.cuda.synchronize()  # every run's set-up (the shared data among it) done on its stream
            _check_memory(slots, device)
        while active:
            for i in list(active):
                try:
                    advance(i)
                    continue
                except StopIteration as done:
                    results[i] = done.value
                except KeyboardInterrupt:  # asked twice: every run stops now, each keeping its last checkpoint
                    for j in active:
                        results[j] = _stop_now(runs[j])
                    active, waiting = [], []
                    break
                except FastresError as e:  # this run ends with its status; the others go on
                    results[i] = e
                    if not isinstance(e, Interrupted):
                        logs[i](f"ended: {e}")
                active.remove(i)
                if waiting and not stop.signum:  # its slot goes to the next run waiting
                    j = waiting.pop(0)
                    slot_of[j] = slot_of.pop(i)
                    active.append(j)
                    ready(j)
            if time.monotonic() - last >= cfgs[0].progress_s > 0:
                last = time.monotonic()
                log(f"packed: {sum(r is not None for r in results)} of {len(runs)} runs ended, {len(active)} training")
        stopped = [r for r in results if isinstance(r, Interrupted)]
        if stopped:
            raise Interrupted(f"stopped {len(stopped)} packed run(s) at a safe point; each resumes, packed or alone",
                              stopped[0].exit_status - 128)
    return results


def _stop_now(gen):
    try:
        gen.throw(KeyboardInterrupt())
    except FastresError as e:
        return e
    except (KeyboardInterrupt, StopIteration):
        return Interrupted("stopped at once")
    return Interrupted("stopped at once")


def _check_memory(k: int, device: torch.device) -> None:
    """After every run's warm-up: the device memory the group holds at its peak, against the
    device's. Refused (exit 2) with the K that would fit, before the first epoch is written."""
    peak = torch.cuda.max_memory_allocated(device)
    total = torch.cuda.get_device_properties(device).total_memory
    if peak > 0.95 * total:
        fit = max(1, int(k * 0.95 * total / peak))
        raise BadInput(f"--pack {k}: the runs need about {peak / 2**30:.1f} GiB of the device's "
                       f"{total / 2**30:.1f} GiB; --pack {fit} fits")


def _prefixed(log, name: str):
    def out(*a, **k):
        text = " ".join(map(str, a))
        log("\n".join(f"[{name}] {line}" for line in text.splitlines()) or f"[{name}]", **k)
    return out


def train_seeds(cfg: Config, seeds: list[int], pack: int = 1, resume: bool = False, log=print) -> int:
    """`fastres train --seeds S1 S2 ... [--pack K]`: one run of cfg per seed, in RUN_DIR/seed<S>,
    K at a time. Prints each seed's final accuracy and their mean and std; the exit status is 0,
    or that of the first run that failed (3 diverged, 4 output) once the others are done."""
    import dataclasses
    import statistics

    from .rundir import latest_run, new_run_dir
    from .train import train

    if pack < 1:
        raise BadInput(f"--pack: at least 1; got {pack}")
    if len(set(seeds)) != len(seeds):
        raise BadInput(f"--seeds: each seed once; got {seeds}")
    if cfg.out:
        base = Path(cfg.out)
    elif resume:  # runs/latest points at the last seed folder of the group
        last = latest_run()
        if not last.name.startswith("seed"):
            raise BadInput(f"--resume --seeds: runs/latest ({last}) is not a run of --seeds; name the group with --out")
        base = last.parent
    else:
        base = new_run_dir(cfg.preset)
    cfgs = [dataclasses.replace(cfg, seed=s, out=str(base / f"seed{s}")) for s in seeds]
    try:
        if pack == 1:
            results = []
            for c in cfgs:  # one after another, each exactly `fastres train`
                try:
                    results.append(train(c, resume=resume, log=log))
                except FastresError as e:
                    if isinstance(e, (Interrupted, BadInput)):
                        raise
                    results.append(e)
        else:
            results = train_packed(cfgs, resume, log, names=[f"seed{c.seed}" for c in cfgs], slots=pack)
    except Interrupted as e:
        e.run_dir = base
        raise
    done = [r for r in results if isinstance(r, dict) and r.get("final_test_acc") is not None]
    for c, r in zip(cfgs, results):
        what = f"{r['final_test_acc']:.2%}" if isinstance(r, dict) and "final_test_acc" in r else f"{r}"
        log(f"seed {c.seed}: {what} ({c.out})")
    if len(done) > 1:
        acc = [r["final_test_acc"] for r in done]
        log(f"test accuracy {statistics.fmean(acc):.2%} ± {statistics.stdev(acc):.2%} over {len(done)} seeds")
    failed = [r for r in results if isinstance(r, FastresError)]
    return failed[0].exit_status if failed else 0

