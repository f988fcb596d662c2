"""The run folder: where a run's folder is (runs/PRESET/DATE-TIME, runs/latest), a lock so that
one training writes it at a time, and atomic writes that fail with a clear message.

    with RunLock(out, log):            # refuses a folder another live training holds (exit 5)
        atomic_write(out / "last.pt", lambda p: torch.save(ck, p))   # OutputError on a full disk
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import re
import time
from pathlib import Path

from .errors import BadInput, OutputError, RunInUse, describe_os_error

LOCK = "run.lock"
RUNS = Path("runs")  # where runs go without --out: RUNS/PRESET/DATE-TIME, RUNS/latest the newest
# What a checkpoint written by `fastres train` holds; eval needs only the first three.


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
