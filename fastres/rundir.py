"""The run folder: a lock so that one training writes it at a time, atomic writes that fail with
a clear message, checkpoints verified before they are trusted, and a clean stop on Ctrl-C.

    with RunLock(out, log):            # refuses a folder another live training holds (exit 5)
        atomic_write(out / "last.pt", lambda p: torch.save(ck, p))   # OutputError on a full disk
        ck = load_checkpoint(out / "last.pt", model)                 # BadInput if damaged/foreign
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import random
import re
import signal
import time
from pathlib import Path

import numpy as np
import torch

from .errors import BadInput, OutputError, RunInUse, describe_os_error

LOCK = "run.lock"
RUNS = Path("runs")  # where runs go without --out: RUNS/PRESET/DATE-TIME, RUNS/latest the newest
# What a checkpoint written by `fastres train` holds; eval needs only the first three.
CHECKPOINT_KEYS = ("model", "config", "epoch", "optimizer", "scheduler", "ema", "history", "rng")


def new_run_dir(preset: str, root: Path = RUNS) -> Path:
    """A folder name no earlier run has: root/PRESET/YYYYmmdd-HHMMSS, with -2, -3, ... if taken."""
    base = root / preset / time.strftime("%Y%m%d-%H%M%S")
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def link_latest(out: Path, root: Path = RUNS) -> None:
    """Point root/latest at `out` (a relative symlink, replaced atomically), when out is under root."""
    try:
        target = Path(os.path.relpath(out.resolve(), root.resolve()))
    except ValueError:
        return
    if target.parts[:1] == ("..",) or not root.is_dir():
        return
    link = root / "latest"
    if link.exists() and not link.is_symlink():
        return  # a real folder of that name (an older fastres's default): leave it
    tmp = root / f".latest.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def latest_run(root: Path = RUNS) -> Path:
    """The run root/latest points at, for --resume without --out."""
    link = root / "latest"
    if not link.exists():
        raise BadInput(f"--resume without --out: there is no {link} to resume; name the run with --out RUN_DIR")
    return link.resolve()


_TMP = re.compile(r"^\.(.+)\.tmp-(\d+)$")  # what atomic_write writes before its rename


def remove_stale_temporaries(folder: Path, log=print, prog: str = "fastres") -> None:
    """Delete temporary files that a process killed mid-write left in `folder` (its pid is gone)."""
    for p in folder.iterdir() if folder.is_dir() else ():
        hit = _TMP.match(p.name)
        if hit and not _pid_alive(int(hit.group(2))):
            p.unlink(missing_ok=True)
            log(f"{prog}: removed {p}, left by a process (pid {hit.group(2)}) that did not finish writing it")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


# What a run leaves in its folder (besides run.lock): a folder with any of them holds a run
CHECKPOINT, RECORD, CURVES, METRICS_CSV = "last.pt", "record.json", "curves.png", "metrics.csv"
RUN_FILES = (RECORD, CHECKPOINT, METRICS_CSV, CURVES)


def prepare_out(out: Path, resume: bool = False) -> None:
    """Create the run folder, or say in one line why it cannot be (before any heavy work). A
    folder that holds another run is only continued (resume), never written over: a new run
    there would leave a folder describing two runs."""
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out}: is a file, not a folder; name a folder for the run")
    held = [f for f in RUN_FILES if (out / f).exists()] if out.is_dir() and not resume else []
    if held:
        raise BadInput(f"--out {out} holds another run ({', '.join(held)}); continue it with --resume, or "
                       "choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the run folder {out}: {describe_os_error(e)}; "
                          "choose another --out") from None


class RunLock:
    """An advisory lock on RUN_DIR/run.lock (flock, released by the kernel when the process dies),
    holding the owner's pid. A second training into the same folder is refused; a lock file left
    by a dead process is taken over with a message. Creating it also proves the folder writable."""

    def __init__(self, out: Path, log=print):
        self.path = Path(out) / LOCK
        while True:
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise _unwritable(out, e) from None
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = self._read()
                os.close(self.fd)
                raise RunInUse(f"{out} is in use by another training (pid {owner or '?'}); wait for it to "
                               "end, stop it, or choose another --out") from None
            try:  # the file we locked may have been removed by its owner's exit meanwhile
                if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(self.fd)
        stale = self._read()
        if stale and stale != str(os.getpid()):
            log(f"{self.path}: taking over the lock of pid {stale}, which is no longer running")
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            self.release()
            raise _unwritable(out, e) from None

    def _read(self) -> str:
        try:
            return os.pread(self.fd, 32, 0).decode(errors="replace").strip()
        except OSError:
            return ""

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # still ours: removed before the lock is let go
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _unwritable(out: Path, e: OSError) -> OutputError:
    return OutputError(f"cannot write in the run folder {out}: {describe_os_error(e)}; choose another --out")


def atomic_write(path: Path, write) -> None:
    """write(tmp_path), then rename over `path`: readers never see a half-written file, and a
    failed write (disk full, read-only, quota) leaves the previous file as it was."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports write failures as RuntimeError
        why = describe_os_error(e) if isinstance(e, OSError) else str(e).splitlines()[0]
        kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
        e = OutputError(f"could not write {path}: {why}; {kept}. Free some space (or choose another --out), "
                        "then continue")
        e.continuable = True  # work under way: the command line says which command continues it
        raise e from None
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path, model: torch.nn.Module | None = None, keys=CHECKPOINT_KEYS,
                    map_location="cpu") -> dict:
    """A checkpoint, checked before anything is taken from it: it loads, has `keys`, and (given
    a model) its weights have exactly the model's names and shapes. Raises BadInput otherwise."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: checkpoint not found")
    try:
        # weights_only=False: the checkpoint holds NumPy and Python RNG states. Load only
        # checkpoints you wrote (pickle runs code).
        ck = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip, not a torch file, unpickling errors
        reason = (str(e).splitlines() or [""])[0].split(". ")[0][:160]  # the first sentence
        raise BadInput(f"{path}: not a readable checkpoint, perhaps truncated or not written by fastres "
                       f"({type(e).__name__}: {reason}); delete it to start over, or name another") from None
    missing = [k for k in keys if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise BadInput(f"{path}: not a fastres checkpoint (missing {', '.join(missing)})")
    if model is not None:
        check_weights(path, ck["model"], model)
    return ck


def check_weights(path: Path, state_dict, model: torch.nn.Module) -> None:
    """BadInput unless `state_dict` has exactly the model's tensor names and shapes."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        got = {k: tuple(v.shape) for k, v in state_dict.items()}
    except (AttributeError, TypeError):
        raise BadInput(f"{path}: its weights are not a state dict") from None
    if got != want:
        diff = sorted(set(got) ^ set(want)) or [k for k in want if got[k] != want[k]]
        raise BadInput(f"{path}: its weights do not fit this model ({len(diff)} tensors differ, e.g. "
                       f"{diff[0]}); it was written for another model (--blocks, --widths, --kernel, ...), or is damaged")


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks the training to stop at the next safe point (between two
    steps, never inside a checkpoint write); a second Ctrl-C stops at once. `signum` is the
    signal that asked, or 0."""

    def __init__(self, log=print):
        self.signum, self.log, self._old = 0, log, {}

    def _handler(self, signum, frame):
        if self.signum:  # asked twice: stop now
            raise KeyboardInterrupt
        self.signum = signum
        self.log(f"\n{signal.Signals(signum).name}: stopping after this step "
                 "(the last checkpoint is kept; Ctrl-C again to stop at once)")

    def __enter__(self):
        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            self._old = {}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def rng_state() -> dict:
    """Every RNG a run draws from (torch, numpy, Python, CUDA), for its checkpoint."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"].cpu())
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in s["cuda"]])


def open_run_dir(cfg, resume: bool, dist, held: contextlib.ExitStack, log) -> tuple:
    """The run's folder, checked and locked before any heavy work (the lock is held until `held`
    closes): a new runs/PRESET/DATE-TIME without --out (resuming: the latest run), the same on
    every rank; a folder that holds another run is refused and left as it is."""
    if not cfg.out:
        out = latest_run() if resume else new_run_dir(cfg.preset)
        cfg = dataclasses.replace(cfg, out=dist.broadcast_str(str(out)))
    out = Path(cfg.out)
    if dist.main:
        prepare_out(out, resume)
        held.enter_context(RunLock(out, log))
        remove_stale_temporaries(out, log)
        link_latest(out)
    return cfg, out
