"""Write CIFAR-10 splits to FFCV .beton files plus a JSON manifest, atomically.

Layout of --out:
    cifar10_train.beton   raw (lossless) 32x32 RGB + integer label, in source order
    cifar10_test.beton
    cifar10_manifest.json counts, per-class counts, train mean/std, source, content hash
Files are written under temporary names and renamed only when complete, so an interrupted or
failed conversion leaves the previous state (or nothing) behind, never a half-written file.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .sources import NUM_CLASSES, Split, balanced_indices

TRAIN_FILE = "cifar10_train.beton"
TEST_FILE = "cifar10_test.beton"
MANIFEST_FILE = "cifar10_manifest.json"
FORMAT_VERSION = 1


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
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def is_up_to_date(out: str | os.PathLike, digest: str) -> bool:
    out = Path(out)
    m = read_manifest(out)
    return (m is not None and m.get("content_sha256") == digest and m.get("format_version") == FORMAT_VERSION
            and (out / TRAIN_FILE).is_file() and (out / TEST_FILE).is_file())


def write_beton(split: Split, path: Path, num_workers: int) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    writer = DatasetWriter(str(path), {
        "image": RGBImageField(write_mode="raw", max_resolution=32),  # raw = lossless
        "label": IntField(),
    }, num_workers=num_workers)
    writer.from_indexed_dataset(_Indexable(split), chunksize=500)  # shows a tqdm progress bar


def convert(train: Split, test: Split, out: str | os.PathLike, source_desc: str,
            num_workers: int = -1, extra: dict | None = None) -> dict:
    """Write both .beton files and the manifest into `out`; returns the manifest."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if num_workers < 1:
        num_workers = max(1, min(os.cpu_count() or 1, 8))
    tmp = {name: out / f".{name}.tmp-{os.getpid()}" for name in (TRAIN_FILE, TEST_FILE, MANIFEST_FILE)}
    try:
        write_beton(train, tmp[TRAIN_FILE], num_workers)
        write_beton(test, tmp[TEST_FILE], num_workers)
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
