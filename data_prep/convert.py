"""Write CIFAR-10 splits to FFCV .beton files plus a JSON manifest, atomically; verify them.

Layout of --out:
    cifar10_train.beton   raw (lossless) 32x32 RGB + integer label, in source order
    cifar10_test.beton
    cifar10_manifest.json counts, per-class counts, train mean/std, source, content hash, and the
                          size and SHA-256 of each .beton file (what `verify` checks them against)
Files are written under temporary names and renamed only when complete, so an interrupted or
failed conversion leaves the previous state (or nothing) behind, never a half-written file. The
writer processes die with the conversion, and temporary files that a killed conversion left are
removed by the next fastres-prep into that folder (data_prep.cli.prepare), whether it converts or
finds the folder up to date.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import multiprocessing
import os
import queue
import signal
import time
from pathlib import Path

import numpy as np

from fastres.errors import BadInput
from fastres.progress import Progress
from .ffcv_import import import_ffcv
from .sources import NUM_CLASSES, Split, balanced_indices

TRAIN_FILE = "cifar10_train.beton"
TEST_FILE = "cifar10_test.beton"
MANIFEST_FILE = "cifar10_manifest.json"
FORMAT_VERSION = 2  # 2: the manifest records each .beton's size and SHA-256


class DataError(BadInput):
    """A data folder whose .beton files or manifest are missing, damaged or do not match (exit 2)."""

    def __init__(self, path, problem: str, folder=None, source=None):
        src = f"--source {source} " if source and source != "torchvision" else ""
        fix = f"; rebuild it with: fastres-prep {src}--out {folder} --force" if folder is not None else ""
        super().__init__(f"{path}: {problem}{fix}")


class _Indexable:
    """What FFCV's DatasetWriter.from_indexed_dataset iterates: (HWC uint8 image, int label)."""

    def __init__(self, split: Split):
        self.split = split

    def __len__(self):
        return len(self.split.labels)

    def __getitem__(self, i):
        return self.split.images[i], int(self.split.labels[i])


def subset(split: Split, limit: int | None) -> Split:
    if limit is None:
        return split
    idx = balanced_indices(split.labels, limit)
    return Split(split.images[idx], split.labels[idx])


def content_hash(train: Split, test: Split) -> str:
    h = hashlib.sha256()
    for s in (train, test):
        h.update(np.asarray(s.images.shape, dtype=np.int64).tobytes())
        h.update(s.images.tobytes())
        h.update(s.labels.tobytes())
    return h.hexdigest()


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of pixel/255 over all images (population std), in float64."""
    x = images.reshape(-1, 3).astype(np.float64) / 255.0
    return x.mean(0).tolist(), x.std(0).tolist()


def read_manifest(out: str | os.PathLike) -> dict | None:
    p = Path(out) / MANIFEST_FILE
    try:
        with open(p) as f:
            m = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return m if isinstance(m, dict) else None


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (about 0.2 s for the 230 MB of both full CIFAR-10 .beton files)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify(out: str | os.PathLike, check_hash: bool = True) -> dict:
    """The manifest of `out`, after checking it against the .beton files it describes.

    Checks, cheapest first: the manifest is there and whole; each .beton has the recorded size,
    opens as an FFCV file, holds the recorded number of images with the recorded per-class label
    counts; and (check_hash) its bytes have the recorded SHA-256. Raises DataError naming the file
    and the mismatch.
    """
    out = Path(out)
    mpath = out / MANIFEST_FILE
    m = read_manifest(out)
    if m is None:
        if mpath.exists():
            raise DataError(mpath, "unreadable manifest (not JSON)", out)
        if any((out / f).exists() for f in (TRAIN_FILE, TEST_FILE)):
            raise DataError(mpath, "manifest missing, so the .beton files beside it cannot be verified", out)
        raise DataError(out, f"no converted CIFAR-10 here ({TRAIN_FILE}, {TEST_FILE}, {MANIFEST_FILE}); "
                             f"convert it with: fastres-prep --out {out}")

    def bad(path, problem):  # the fix names the source the files were made from
        return DataError(path, problem, out, m.get("source"))

    if m.get("format_version") != FORMAT_VERSION:
        raise bad(mpath, f"written by another fastres-prep version (format {m.get('format_version')}, "
                         f"this one reads {FORMAT_VERSION})")
    try:
        stats = [[float(v) for v in m[k]] for k in ("mean", "std")]
        counts = {s: int(m["counts"][s]) for s in ("train", "test")}
        per_class = {s: [int(v) for v in m["per_class"][s]] for s in ("train", "test")}
        sizes = {s: int(m["file_bytes"][s]) for s in ("train", "test")}
        digests = {s: str(m["file_sha256"][s]) for s in ("train", "test")}
    except (KeyError, TypeError, ValueError) as e:
        raise bad(mpath, f"incomplete manifest ({type(e).__name__}: {e})") from None
    if any(len(v) != 3 for v in stats) or min(stats[1]) <= 0:
        raise bad(mpath, "mean and std must be 3 numbers per channel, std > 0")
    for split, name in (("train", TRAIN_FILE), ("test", TEST_FILE)):
        path = out / name
        if not path.is_file():
            raise bad(path, "file not found")
        size = path.stat().st_size
        if size != sizes[split]:
            raise bad(path, f"{size:,} bytes, the manifest says {sizes[split]:,} (truncated or replaced?)")
        try:
            labels = beton_labels(path)
        except Exception as e:  # FFCV raises whatever numpy raises on a damaged header
            raise bad(path, f"not a readable FFCV file ({type(e).__name__}: {e})") from None
        if len(labels) != counts[split]:
            raise bad(path, f"holds {len(labels):,} images, the manifest says {counts[split]:,}")
        found = np.bincount(labels, minlength=NUM_CLASSES).tolist()
        if found != per_class[split]:
            raise bad(path, f"per-class counts {found}, the manifest says {per_class[split]}")
        if check_hash and file_sha256(path) != digests[split]:
            raise bad(path, "content differs from the manifest's SHA-256 (damaged or replaced)")
    return m


def beton_labels(path: Path) -> np.ndarray:
    """All labels of a .beton file without decoding images (FFCV keeps IntFields in its metadata)."""
    import_ffcv()
    from ffcv.reader import Reader

    r = Reader(str(path))
    return np.asarray(r.metadata["f" + str(list(r.handlers).index("label"))])


def is_up_to_date(out: str | os.PathLike, digest: str) -> bool:
    """The output holds exactly this content, verified (a damaged output is rebuilt)."""
    m = read_manifest(out)
    if m is None or m.get("content_sha256") != digest:
        return False
    try:
        verify(out)
    except DataError:
        return False
    return True


_PR_SET_PDEATHSIG = 1
_forking_writers_of = 0  # the pid of the process whose forks are FFCV writers, while it writes; else 0


def _die_with_parent() -> None:
    """In a forked writer process: the kernel sends SIGKILL when the converting process dies, so a
    killed conversion never leaves workers running (holding a deleted file and shared memory)."""
    if not _forking_writers_of:
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: nothing to arrange
        return
    # The converting process may have died between the fork and the prctl above; the kernel then
    # sends nothing, and this writer would run on as an orphan.
    if os.getppid() != _forking_writers_of:
        os._exit(1)


if hasattr(os, "register_at_fork"):
    # FFCV's DatasetWriter forks its workers with multiprocessing; this runs in each of them.
    os.register_at_fork(after_in_child=_die_with_parent)


@contextlib.contextmanager
def forks_die_with_this_process():
    """Processes forked inside this block are killed when this process dies (on Linux)."""
    global _forking_writers_of
    _forking_writers_of = os.getpid()
    try:
        yield
    finally:
        _forking_writers_of = 0


def write_beton(split: Split, path: Path, num_workers: int, name: str = "", log=print) -> None:
    import_ffcv()
    import ffcv.writer
    from ffcv.fields import IntField, RGBImageField

    writer = ffcv.writer.DatasetWriter(str(path), {
        "image": RGBImageField(write_mode="raw", max_resolution=32),  # raw = lossless
        "label": IntField(),
    }, num_workers=num_workers)
    # FFCV draws a tqdm bar, which in a log is one carriage-return redraw per update; Progress is
    # the same bar on a terminal and a plain line every 5 s elsewhere. And FFCV waits for its
    # writer processes forever (sleep-polling a counter, then a blocking queue read): a writer
    # that dies (disk full, file too large) would hang the conversion, so both waits also watch
    # the writers and stop the conversion when one failed.
    patched = {"tqdm": lambda total: Progress(total=total, desc=f"fastres-prep: writing {name or path.name}",
                                              every_s=5.0, log=log, done_line=True),
               "sleep": _watching(time.sleep, path), "Queue": lambda: _WatchedQueue(path)}
    saved = {k: getattr(ffcv.writer, k) for k in patched}
    for k, v in patched.items():
        setattr(ffcv.writer, k, v)
    try:
        with forks_die_with_this_process():
            writer.from_indexed_dataset(_Indexable(split), chunksize=500)
    except BaseException:
        for p in multiprocessing.active_children():
            p.kill()
        with contextlib.suppress(Exception):  # FFCV frees its shared memory only on success
            writer.metadata_sm.close()
            writer.metadata_sm.unlink()
        raise
    finally:
        for k, v in saved.items():
            setattr(ffcv.writer, k, v)


def _check_writers(path: Path) -> None:
    """OSError if a writer process (a child of this one) has exited with an error."""
    failed = [p.exitcode for p in list(multiprocessing.process._children) if p.exitcode not in (None, 0)]
    if failed:
        raise OSError(errno.EIO, f"a writer process stopped with exit status {failed[0]} (its error is "
                                 "printed above; a full disk or a file size limit are the usual causes)", str(path))


def _watching(sleep, path: Path):
    def watched_sleep(s):
        sleep(s)
        _check_writers(path)
    return watched_sleep


class _WatchedQueue:
    """A multiprocessing queue whose blocking get() gives up when a writer process failed."""

    def __init__(self, path: Path):
        self.q, self.path = multiprocessing.Queue(), path

    def __getattr__(self, name):  # put, etc.: the queue's own
        return getattr(self.q, name)

    def get(self, block=True, timeout=None):
        while True:
            try:
                return self.q.get(True, 0.5)
            except queue.Empty:
                _check_writers(self.path)


def convert(train: Split, test: Split, out: str | os.PathLike, source_desc: str,
            num_workers: int = -1, extra: dict | None = None, log=print) -> dict:
    """Write both .beton files and the manifest into `out`; returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if num_workers < 1:
        num_workers = max(1, min(os.cpu_count() or 1, 8))
    tmp = {name: out / f".{name}.tmp-{os.getpid()}" for name in (TRAIN_FILE, TEST_FILE, MANIFEST_FILE)}
    try:
        write_beton(train, tmp[TRAIN_FILE], num_workers, TRAIN_FILE, log)
        write_beton(test, tmp[TEST_FILE], num_workers, TEST_FILE, log)
        mean, std = channel_stats(train.images)
        manifest = {
            "format_version": FORMAT_VERSION,
            "source": source_desc,
            "files": {"train": TRAIN_FILE, "test": TEST_FILE},
            "counts": {"train": int(len(train.labels)), "test": int(len(test.labels))},
            "per_class": {
                "train": np.bincount(train.labels, minlength=NUM_CLASSES).tolist(),
                "test": np.bincount(test.labels, minlength=NUM_CLASSES).tolist(),
            },
            "mean": mean,  # per channel (R, G, B), pixel / 255, training images
            "std": std,
            "content_sha256": content_hash(train, test),
            "file_bytes": {s: tmp[f].stat().st_size for s, f in (("train", TRAIN_FILE), ("test", TEST_FILE))},
            "file_sha256": {s: file_sha256(tmp[f]) for s, f in (("train", TRAIN_FILE), ("test", TEST_FILE))},
            **(extra or {}),
        }
        with open(tmp[MANIFEST_FILE], "w") as f:
            json.dump(manifest, f, indent=2)
        # The manifest goes first and comes back last: .beton files without a manifest are
        # never trusted, so a crash between the renames forces a rebuild rather than a mismatch.
        (out / MANIFEST_FILE).unlink(missing_ok=True)
        os.replace(tmp[TRAIN_FILE], out / TRAIN_FILE)
        os.replace(tmp[TEST_FILE], out / TEST_FILE)
        os.replace(tmp[MANIFEST_FILE], out / MANIFEST_FILE)
        return manifest
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)
