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
import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .config import Config
from .design import check_budget
from .distributed import Dist
from .errors import BadInput, FastresError, Interrupted
from .rundir import open_run_dir
from .signals import StopRequest
from .runtime import check_before_work, resolve_device
from .train import run


@dataclasses.dataclass
class Member:
    """One run of a packed group: its config, how the group's lines name it, its own log function
    (default: the group's, each line prefixed with the name), train()'s on_epoch, and on_end(result),
    called once when the run ends with its record or the FastresError that ended it."""
    cfg: Config
    name: str = ""
    log: Callable | None = None
    on_epoch: Callable | None = None
    on_end: Callable | None = None


class Pack:
    """`slots` runs at a time in this process on one device, advanced in turn, one step each per
    round (on CUDA each slot has its own stream). Members join with add() (their folder is checked
    and locked at once) and, when no member added is waiting as a slot frees, from train()'s
    next_member(), so that a sweep worker can hand a freed slot to its next trial."""

    def __init__(self, slots: int, resume: bool, log, held: contextlib.ExitStack, stop: StopRequest):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise BadInput("--pack runs several runs in one process: not under torchrun")
        self.slots, self.resume, self.log, self.held, self.stop = slots, resume, log, held, stop
        self.dist = Dist()
        self.device: torch.device | None = None
        self.members: list[Member] = []
        self.runs: list = []          # fastres.train.run's generators, one per member
        self.results: list = []       # per member: its record, its FastresError, or None while it trains
        self.waiting: list[int] = []  # added, not yet given a slot
        self.shared: dict = {}        # resident data: one copy for the group
        self.locks: list = []         # per member: what holds its folder's lock
        self.t_start = time.perf_counter()

    def add(self, m: Member) -> int:
        """Check m (its budget, its device: the group's) and open its run folder; it waits for a slot."""
        device = resolve_device(m.cfg.device)
        if self.device is None:
            self.device = device
            self.streams = [torch.cuda.Stream(device) for _ in range(self.slots)] if device.type == "cuda" \
                else [None] * self.slots
        elif str(device) != str(self.device):
            raise BadInput(f"--pack: the packed runs must share one device; got {self.device} and {device}")
        check_budget(m.cfg)  # an over-budget member is refused before its folder is touched
        own = self.held.enter_context(contextlib.ExitStack())  # its lock: released as soon as it ends
        cfg, out = open_run_dir(m.cfg, self.resume, self.dist, own, self.log)
        self.locks.append(own)
        m.cfg, m.name = cfg, m.name or out.name
        m.log = m.log or _prefixed(self.log, m.name)
        i = len(self.members)
        self.members.append(m)
        self.runs.append(run(cfg, self.resume, m.log, self.dist, out, self.stop, self.t_start, m.on_epoch,
                             progress=False, shared_data=self.shared))  # a generator: nothing runs yet
        self.results.append(None)
        self.waiting.append(i)
        return i

    def train(self, next_member=lambda: None) -> list:
        """Train until no member is left: per member its record or the FastresError that ended it.
        Raises Interrupted once every started run has stopped if Ctrl-C (or SIGTERM) asked."""
        slot_of: dict[int, int] = {}
        active: list[int] = []

        def take(slot: int) -> int | None:
            """The next member for this slot: one added and waiting, else next_member()'s."""
            if not self.waiting and not self.stop.signum:
                m = next_member()
                if m is not None:
                    self.add(m)
            if not self.waiting or self.stop.signum:
                return None
            i = self.waiting.pop(0)
            slot_of[i] = slot
            active.append(i)
            return i

        def advance(i):
            stream = self.streams[slot_of[i]]
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                next(self.runs[i])

        def ready(i):
            """Run i set up and warmed up (its first turn), before any epoch of it is timed."""
            try:
                advance(i)
            except torch.OutOfMemoryError:
                raise BadInput(f"--pack {self.slots}: the device ran out of memory setting up "
                               f"{self.members[i].name}; --pack {max(1, len(active) - 1)} may fit") from None

        def end(i, result):
            self.results[i] = result
            active.remove(i)
            self.locks[i].close()
            if isinstance(result, FastresError) and not isinstance(result, Interrupted):
                self.members[i].log(f"ended: {result}")
            if self.members[i].on_end is not None:
                self.members[i].on_end(result)

        first = [i for i in (take(s) for s in range(self.slots)) if i is not None]
        if not first:
            return self.results
        cuda = self.device.type == "cuda"
        self.log(f"packed {len(first) + len(self.waiting)} runs on {self.device}, {self.slots} at a time" +
                 (" (one CUDA stream each)" if cuda else " (advanced in turn)") + ": " +
                 ", ".join(self.members[i].name for i in first) + (" and more as slots free" if self.waiting else ""))
        for i in first:  # every run of the first round set up before any epoch is timed
            ready(i)
        if cuda:
            torch.cuda.synchronize()  # every run's set-up (the shared data among it) done on its stream
            _check_memory(len(first), self.device)
        last = time.monotonic()
        while active:
            for i in list(active):
                try:
                    advance(i)
                    continue
                except StopIteration as done:
                    end(i, done.value)
                except KeyboardInterrupt:  # asked twice: every run stops now, each keeping its last checkpoint
                    for j in list(active):
                        end(j, _stop_now(self.runs[j]))
                    self.waiting = []
                    break
                except FastresError as e:  # this run ends with its status; the others go on
                    end(i, e)
                j = take(slot_of[i])  # its slot goes to the next run, if any
                if j is not None:
                    ready(j)
            if time.monotonic() - last >= self.members[0].cfg.progress_s > 0:
                last = time.monotonic()
                ended = sum(r is not None for r in self.results)
                self.log(f"packed: {ended} run(s) ended, {len(active)} training, {len(self.waiting)} waiting")
        stopped = [r for r in self.results if isinstance(r, Interrupted)]
        if stopped:
            raise Interrupted(f"stopped {len(stopped)} packed run(s) at a safe point; each resumes, packed or alone",
                              stopped[0].exit_status - 128)
        return self.results


def train_packed(cfgs: list[Config], resume: bool = False, log=print, names: list[str] | None = None,
                 logs: list | None = None, on_epochs: list | None = None, slots: int | None = None) -> list:
    """Train cfgs, `slots` at a time (default: all at once); per run its record, or the
    FastresError that ended it (diverged, output). A run that ends leaves its slot to the next
    one waiting. Raises Interrupted once every started run has stopped if Ctrl-C (or SIGTERM)
    asked. names: how the group's lines name each run (default: its folder's name); logs: a log
    function per run (default: `log`, each line prefixed with the run's name); on_epochs:
    train()'s on_epoch per run."""
    devices = {str(resolve_device(c.device)) for c in cfgs}
    if len(devices) > 1:
        raise BadInput(f"--pack: the packed runs must share one device; got {', '.join(sorted(devices))}")
    for c in cfgs:
        check_budget(c)  # an over-budget member is refused before any folder is touched
        check_before_work(c)  # so is what this torch or device cannot run
    with contextlib.ExitStack() as held:
        group = Pack(min(slots or len(cfgs), len(cfgs)), resume, log, held, held.enter_context(StopRequest(log)))
        for i, c in enumerate(cfgs):  # every folder checked and locked before any run starts
            group.add(Member(c, (names or [""] * len(cfgs))[i], (logs or [None] * len(cfgs))[i],
                             (on_epochs or [None] * len(cfgs))[i]))
        return group.train()


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
    K at a time; each seed's final accuracy, then their mean ± std (also RUN_DIR/summary.json).
    The exit status is 0, or that of the first run that failed (3 diverged, 4 output) once the
    others are done."""
    from .rundir import latest_run, new_run_dir
    from .seeds import report, seed_configs, train_each

    if cfg.out:
        base = Path(cfg.out)
    elif resume:  # runs/latest points at the last seed folder of the group
        last = latest_run()
        if not last.name.startswith("seed"):
            raise BadInput(f"--resume --seeds: runs/latest ({last}) is not a run of --seeds; name the group with --out")
        base = last.parent
    else:
        base = new_run_dir(cfg.preset)
    cfgs = seed_configs(cfg, seeds, base)
    try:
        results = train_each(cfgs, pack, [resume] * len(cfgs), log)
    except Interrupted as e:
        e.run_dir = base
        raise
    report(cfgs, results, base, log)
    failed = [r for r in results if isinstance(r, FastresError)]
    return failed[0].exit_status if failed else 0
