"""Read CIFAR-10 from one of three sources and validate it before anything is written.

Every loader returns a `Split` per split: `images` uint8 (N, 32, 32, 3) RGB in HWC order and
`labels` uint8 (N,) in 0..9. Every problem is raised as `SourceError(path, problem)`, which the
CLI prints as one line and turns into exit status 2.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastres.errors import BadInput

NUM_CLASSES = 10
CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"


class SourceError(BadInput):
    """A source file that is missing, malformed or holds out-of-range values (exit status 2)."""

    def __init__(self, path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 (N, 32, 32, 3), RGB, HWC
    labels: np.ndarray  # uint8 (N,), 0..9


def validate(images, labels, path) -> Split:
    """Check shapes, dtypes and label range; return the arrays as a Split."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise SourceError(path, f"images must be uint8, got {getattr(images, 'dtype', type(images))}")
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise SourceError(path, f"images must have shape (N, 32, 32, 3), got {images.shape}")
    if images.shape[0] == 0:
        raise SourceError(path, "holds no images")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise SourceError(path, f"labels must have shape ({images.shape[0]},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise SourceError(path, f"labels must be integers, got {labels.dtype}")
    bad = (labels < 0) | (labels >= NUM_CLASSES)
    if bad.any():
        i = int(np.argmax(bad))
        raise SourceError(path, f"label {int(labels[i])} at index {i} is outside 0-9")
    return Split(np.ascontiguousarray(images), labels.astype(np.uint8))


def _load_npz(path: Path) -> Split:
    if not path.is_file():
        raise SourceError(path, "file not found")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = {"images", "labels"} - set(f.files)
            if missing:
                raise SourceError(path, f"missing array(s) {sorted(missing)}; expected 'images' and 'labels'")
            images, labels = f["images"], f["labels"]
    except SourceError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
        raise SourceError(path, f"truncated or corrupt .npz ({type(e).__name__}: {e})") from None
    if labels.dtype != np.uint8:
        raise SourceError(path, f"labels must be uint8, got {labels.dtype}")
    return validate(images, labels, path)


def _load_batches(folder: Path, names) -> Split:
    images, labels = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise SourceError(path, "file not found")
        try:
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            data, lab = d[b"data"], d[b"labels"]
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise SourceError(path, f"truncated or corrupt CIFAR-10 batch ({type(e).__name__}: {e})") from None
        data = np.asarray(data)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise SourceError(path, f"'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
        # The batches store each image as 1024 R, then 1024 G, then 1024 B values (CHW).
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(lab, dtype=np.int64))
    return validate(np.concatenate(images), np.concatenate(labels), folder)


def detect(source: str | os.PathLike) -> str:
    """'npz', 'batches' or 'torchvision' for a --source value."""
    if str(source) == "torchvision":
        return "torchvision"
    p = Path(source)
    if not p.exists():
        raise SourceError(p, "source folder not found")
    if not p.is_dir():
        raise SourceError(p, "source must be a folder (with train.npz/test.npz or cifar-10-batches-py)")
    if (p / "train.npz").exists() or (p / "test.npz").exists():
        return "npz"
    if (p / BATCHES_DIR).is_dir() or (p / TRAIN_BATCHES[0]).exists() or (p / TEST_BATCH).exists():
        return "batches"
    raise SourceError(p, "holds neither train.npz/test.npz nor the cifar-10-batches-py pickles")


def load(source: str | os.PathLike, download_dir: str | os.PathLike = "./downloads") -> tuple[Split, Split]:
    """(train, test) splits from `source`; raises SourceError on any problem."""
    kind = detect(source)
    if kind == "npz":
        p = Path(source)
        return _load_npz(p / "train.npz"), _load_npz(p / "test.npz")
    if kind == "batches":
        p = Path(source)
        if (p / BATCHES_DIR).is_dir():
            p = p / BATCHES_DIR
        return _load_batches(p, TRAIN_BATCHES), _load_batches(p, [TEST_BATCH])
    import torchvision  # only needed for the download path

    splits = []
    for train in (True, False):
        try:
            ds = torchvision.datasets.CIFAR10(str(download_dir), train=train, download=True)
        except Exception as e:  # network errors, checksum failures, ...
            raise SourceError(download_dir, f"torchvision CIFAR-10 download failed ({type(e).__name__}: {e}). "
                                            "Without internet, use a CIFAR-10 copy you have: --source DIR, or set "
                                            "FASTRES_CIFAR10=DIR (DIR holding cifar-10-batches-py or "
                                            "train.npz/test.npz)") from None
        splits.append(validate(ds.data, np.asarray(ds.targets), download_dir))
    return splits[0], splits[1]


def balanced_indices(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of a class-balanced subset of size n, in source order.

    Each class gets n // 10 images (the first ones in source order); the remainder goes one each
    to the lowest classes. Raises ValueError if a class has too few images.
    """
    if n <= 0:
        raise ValueError(f"subset size must be positive, got {n}")
    if n > len(labels):
        raise ValueError(f"subset of {n} asked from {len(labels)} images")
    picked = []
    for c in range(NUM_CLASSES):
        quota = n // NUM_CLASSES + (1 if c < n % NUM_CLASSES else 0)
        idx = np.flatnonzero(labels == c)[:quota]
        if len(idx) < quota:
            raise ValueError(f"class {c} has {len(idx)} images, {quota} needed for a balanced subset of {n}")
        picked.append(idx)
    return np.sort(np.concatenate(picked))
