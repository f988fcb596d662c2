"""`fastres predict CHECKPOINT... --images PATH --out CSV`: labels for images without labels (a
hidden test set), from one checkpoint or the mean softmax of several, with flip TTA if asked.

Inputs (read whole, checked before any model runs): a pickle in the course format (a dict with
`data`, N x 3072 in CIFAR's channel-major layout or N x 32 x 32 x 3, and `ids`; keys as str or
bytes), an .npz (`images`, optional `ids`), a folder of PNG/JPEG files (ids: the file names
without extension), or a converted .beton (ids: 0..N-1). The CSV (and --probs) are written under
a temporary name and renamed, so a failed run leaves none.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import torch

from data_prep import MANIFEST_FILE
from data_prep.sources import CLASSES

from .errors import BadInput
from .evaluate import build_members
from .progress import Progress
from .results import log_probabilities
from .rundir import atomic_write

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


class BadImages(BadInput):
    """Images or ids that cannot be labelled as given (exit status 2)."""


def _key(d: dict, name: str):
    """d[name] whether the pickle's keys are str or bytes (CIFAR's own pickles use bytes)."""
    for k in (name, name.encode()):
        if k in d:
            return d[k]
    return None


def as_images(data, where: str) -> np.ndarray:
    """uint8 (N, 32, 32, 3) from N x 3072 (CIFAR's channel-major rows: 1024 R, 1024 G, 1024 B) or
    N x 32 x 32 x 3; anything else is refused."""
    a = np.asarray(data)
    if a.dtype != np.uint8:
        raise BadImages(f"{where}: images must be uint8 (0-255); got {a.dtype}")
    if a.ndim == 2 and a.shape[1] == 3072:
        return np.ascontiguousarray(a.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    if a.ndim == 4 and a.shape[1:] == (32, 32, 3):
        return a
    raise BadImages(f"{where}: expected 32x32 RGB images as N x 3072 (channel-major) or N x 32 x 32 x 3; got "
                    f"shape {a.shape}")


def read_folder(folder: Path) -> tuple[np.ndarray, list]:
    from PIL import Image

    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise BadImages(f"{folder}: no PNG or JPEG files")
    images = []
    for f in files:
        with Image.open(f) as im:
            if im.mode != "RGB" or im.size != (32, 32):
                raise BadImages(f"{f}: a {im.size[0]}x{im.size[1]} {im.mode} image; expected 32x32 RGB")
            images.append(np.asarray(im, dtype=np.uint8))
    return np.stack(images), [f.stem for f in files]


def read_images(path) -> tuple[np.ndarray, list]:
    """(uint8 (N, 32, 32, 3), ids) from any of the inputs above; BadImages with one line if not."""
    path = Path(path)
    if path.is_dir():
        return read_folder(path)
    if not path.is_file():
        raise BadImages(f"{path}: no such file or folder")
    try:
        if path.suffix == ".beton":
            from .data import read_all
            images, _ = read_all(path, torch.device("cpu"))
            return images.numpy(), list(range(len(images)))
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "images" not in z:
                    raise BadImages(f"{path}: no 'images' array (it holds {', '.join(z.files) or 'nothing'})")
                images = as_images(z["images"], str(path))
                return images, (z["ids"].tolist() if "ids" in z else list(range(len(images))))
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except BadImages:
        raise
    except Exception as e:  # unreadable: not a pickle, truncated, not an npz, a damaged .beton
        raise BadImages(f"{path}: cannot be read as images ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(d, dict) or _key(d, "data") is None:
        raise BadImages(f"{path}: expected a dict with 'data' (and 'ids'), as the course's pickles hold")
    if _key(d, "ids") is None:
        raise BadImages(f"{path}: the pickle has no 'ids' for its images")
    ids = [i.decode() if isinstance(i, bytes) else i for i in np.asarray(_key(d, "ids")).tolist()]
    return as_images(_key(d, "data"), str(path)), ids


def check_ids(ids: list, n: int, where) -> None:
    if len(ids) != n:
        raise BadImages(f"{where}: {len(ids)} ids for {n} images")
    seen = set()
    for i in ids:
        if i in seen:
            raise BadImages(f"{where}: the id {i!r} appears more than once")
        seen.add(i)


def normalization(ck: dict, cfg, data) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel mean and std the run trained with: kept in its checkpoint, else read from
    the manifest of its data folder (checkpoints of earlier versions)."""
    norm = ck.get("normalization")
    if norm is None:
        manifest = Path(data or cfg.data) / MANIFEST_FILE
        try:
            norm = json.loads(manifest.read_text())
        except (OSError, ValueError):
            raise BadInput(f"the checkpoint does not keep its normalization and {manifest} cannot be read; "
                           "give --data with the run's .beton folder") from None
    return (torch.tensor(norm[k], dtype=torch.float32) for k in ("mean", "std"))


def write_csv(path: Path, ids: list, labels: list, header: str) -> None:
    lines = [header] + [f"{i},{lab}" for i, lab in zip(ids, labels)]
    atomic_write(path, lambda p: p.write_text("\n".join(lines) + "\n"))


def write_probs(path: Path, ids: list, probs: np.ndarray, names) -> None:
    if path.suffix == ".npy":
        def save(p):  # through a file object: np.save would add ".npy" to the temporary name
            with open(p, "wb") as f:
                np.save(f, probs)
        atomic_write(path, save)
        return
    lines = ["ID," + ",".join(names)] + [f"{i}," + ",".join(f"{v:.6f}" for v in row) for i, row in zip(ids, probs)]
    atomic_write(path, lambda p: p.write_text("\n".join(lines) + "\n"))


def predict(checkpoints, images_path, out, tta=False, probs_out=None, names=False, header="ID,Labels",
            device="auto", data=None, log=print) -> dict:
    images, ids = read_images(images_path)
    check_ids(ids, len(images), images_path)
    out = Path(out)
    if len(header.split(",")) != 2:
        raise BadInput(f"--header: two column names separated by a comma; got {header!r}")
    if probs_out is not None and Path(probs_out).suffix not in (".npy", ".csv"):
        raise BadInput(f"--probs: a .npy or .csv file; got {probs_out}")
    rt, models, cfgs, cks = build_members(checkpoints, device, data)
    if models[0].fc.out_features != len(CLASSES) and names:
        raise BadInput(f"--names: the models predict {models[0].fc.out_features} classes, not CIFAR-10's")
    mean, std = normalization(cks[0], cfgs[0], data)
    batch = cfgs[0].eval_batch_size
    what = f"{len(models)} checkpoint{'s' if len(models) > 1 else ''}" + (" with flip TTA" if tta else "")
    log(f"predict: {len(images):,} images ({images_path}) with {what} on {rt.device}")
    wrap = lambda starts: Progress(starts, len(starts), "predict", log=log)
    logp = log_probabilities(models, torch.from_numpy(images), mean, std, rt, tta, batch, wrap)
    predicted = logp.argmax(1).tolist()
    labels = [CLASSES[p] for p in predicted] if names else predicted
    if probs_out is not None:
        write_probs(Path(probs_out), ids, logp.exp().numpy(), CLASSES[:logp.shape[1]])
    write_csv(out, ids, labels, header)
    counts = np.bincount(predicted, minlength=logp.shape[1])
    log(f"wrote {out} ({len(ids):,} rows)" + (f" and {probs_out}" if probs_out else "") + "; predicted per class: "
        + ", ".join(f"{CLASSES[c] if c < len(CLASSES) else c} {n}" for c, n in enumerate(counts)))
    return {"ids": ids, "labels": predicted, "log_probs": logp}
