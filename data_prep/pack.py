"""A lossless, compact file of one CIFAR-10 split, for moving the data where transfers are small
(scripts/offline_pack.sh): about 56% of the raw pixels, against 91% for numpy's savez_compressed.

    python -m data_prep.pack pack SRC_DIR OUT_DIR     SRC_DIR/{train,test}.npz -> OUT_DIR/{train,test}.fpk
    python -m data_prep.pack unpack IN_DIR OUT_DIR    IN_DIR/{train,test}.fpk -> OUT_DIR/{train,test}.npz

`pack --limit-train N --limit-test M` packs a class-balanced slice instead (the images that
`fastres-prep --limit-train N --limit-test M` would keep): a few MiB that let the tests run on
real images where the whole set has not arrived yet.

Why it is smaller: neighbouring pixels are alike, so each pixel is replaced by its difference from
a prediction made from already-decoded neighbours (the median edge detector of LOCO-I / JPEG-LS:
left, up, or left + up - upleft), and the red and blue differences by their difference from the
green one (the three channels' errors move together). What is left is mostly small numbers,
which LZMA compresses well. Unpacking repeats the prediction pixel by pixel in scan order,
vectorized over all images and channels at once (1,024 numpy steps per split, about a second).

File: b"FPK1", a 4-byte little-endian header length, a JSON header (shape, chunk sizes, SHA-256 of
the images' and labels' bytes), then the LZMA chunks. Unpacking checks both hashes, so a file
that decodes to anything but the original arrays is an error, never silently different data.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import struct
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from fastres.errors import BadInput, cli_main

MAGIC = b"FPK1"
CHUNK = 10_000  # images per LZMA chunk: chunks compress and decompress in parallel
SPLITS = ("train", "test")


class PackError(BadInput):
    """A packed file that is truncated, foreign or does not decode to its recorded hashes."""


def _med(left: np.ndarray, up: np.ndarray, upleft: np.ndarray) -> np.ndarray:
    """LOCO-I's median edge detector on int16 arrays."""
    hi, lo = np.maximum(left, up), np.minimum(left, up)
    return np.where(upleft >= hi, lo, np.where(upleft <= lo, hi, left + up - upleft))


def residuals(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> uint8 (N, 3, H, W) prediction errors mod 256, red and blue relative
    to green."""
    a = images.transpose(0, 3, 1, 2).astype(np.int16)
    pred = np.zeros_like(a)
    pred[..., 0, 1:] = a[..., 0, :-1]           # first row: the left neighbour
    pred[..., 1:, 0] = a[..., :-1, 0]           # first column: the one above
    pred[..., 1:, 1:] = _med(a[..., 1:, :-1], a[..., :-1, 1:], a[..., :-1, :-1])
    r = (a - pred) & 0xFF
    r[:, 0] = (r[:, 0] - r[:, 1]) & 0xFF
    r[:, 2] = (r[:, 2] - r[:, 1]) & 0xFF
    return r.astype(np.uint8)


def reconstruct(r: np.ndarray) -> np.ndarray:
    """The inverse of residuals(): uint8 (N, 3, H, W) -> uint8 (N, H, W, 3)."""
    n, c, h, w = r.shape
    r = r.astype(np.int16)
    r[:, 0] = (r[:, 0] + r[:, 1]) & 0xFF
    r[:, 2] = (r[:, 2] + r[:, 1]) & 0xFF
    e = np.ascontiguousarray(r.transpose(2, 3, 0, 1).reshape(h, w, n * c))  # a pixel = one vector
    out = np.empty_like(e)
    for i in range(h):
        for j in range(w):
            if i == 0:
                pred = out[0, j - 1] if j else 0
            elif j == 0:
                pred = out[i - 1, 0]
            else:
                pred = _med(out[i, j - 1], out[i - 1, j], out[i - 1, j - 1])
            out[i, j] = (e[i, j] + pred) & 0xFF
    return out.reshape(h, w, n, c).transpose(2, 0, 1, 3).astype(np.uint8)


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def pack_split(images: np.ndarray, labels: np.ndarray, out: Path, workers: int = 2) -> None:
    r = residuals(images)
    blobs = [r[i:i + CHUNK].tobytes() for i in range(0, len(r), CHUNK)] + [labels.astype(np.uint8).tobytes()]
    with ProcessPoolExecutor(workers) as ex:
        chunks = list(ex.map(lzma.compress, blobs))
    header = json.dumps({"shape": list(images.shape), "chunk_images": CHUNK, "chunk_bytes": [len(c) for c in chunks],
                         "images_sha256": _sha(images), "labels_sha256": _sha(labels.astype(np.uint8))}).encode()
    tmp = out.with_name(out.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<I", len(header)) + header)
        for c in chunks:
            f.write(c)
    tmp.replace(out)


def unpack_split(path: Path, workers: int = 8) -> tuple[np.ndarray, np.ndarray]:
    raw = path.read_bytes()
    try:
        if raw[:4] != MAGIC:
            raise ValueError("not a packed CIFAR-10 split (wrong magic)")
        (hlen,) = struct.unpack("<I", raw[4:8])
        head = json.loads(raw[8:8 + hlen])
        pos, parts = 8 + hlen, []
        for size in head["chunk_bytes"]:
            parts.append(raw[pos:pos + size])
            pos += size
        if pos != len(raw):
            raise ValueError(f"{len(raw)} bytes, the header accounts for {pos}")
        with ProcessPoolExecutor(workers) as ex:
            blobs = list(ex.map(lzma.decompress, parts))
        n, h, w, c = head["shape"]
        r = np.frombuffer(b"".join(blobs[:-1]), np.uint8).reshape(n, c, h, w)
        labels = np.frombuffer(blobs[-1], np.uint8).copy()
    except (ValueError, KeyError, struct.error, lzma.LZMAError) as e:
        raise PackError(f"{path}: {e}") from None
    images = reconstruct(r)
    if _sha(images) != head["images_sha256"] or _sha(labels) != head["labels_sha256"]:
        raise PackError(f"{path}: decodes to data that does not match its recorded SHA-256")
    return images, labels


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.pack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["pack", "unpack"])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--limit-train", type=int, default=None, metavar="N",
                   help="pack: a class-balanced slice of N training images")
    p.add_argument("--limit-test", type=int, default=None, metavar="N",
                   help="pack: a class-balanced slice of N test images")
    a = p.parse_args(argv)
    limits = {"train": a.limit_train, "test": a.limit_test}
    if a.action == "unpack":
        if any(v is not None for v in limits.values()):
            p.error("--limit-train/--limit-test apply to pack only")
        a.dst.mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            images, labels = unpack_split(a.src / f"{split}.fpk")
            tmp = a.dst / f".{split}.partial.npz"
            np.savez(tmp, images=images, labels=labels)
            tmp.replace(a.dst / f"{split}.npz")
            print(f"unpack: {split} -> {a.dst}")
        return 0
    from .sources import _load_npz, balanced_indices

    splits = {}
    for split in SPLITS:  # every split read and sliced before any file is written
        s = _load_npz(a.src / f"{split}.npz")
        images, labels = s.images, s.labels
        if limits[split] is not None:
            try:
                keep = balanced_indices(labels, limits[split])
            except ValueError as e:
                raise BadInput(f"--limit-{split}: {e}") from None
            images, labels = images[keep], labels[keep]
        splits[split] = images, labels
    a.dst.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in splits.items():
        pack_split(images, labels, a.dst / f"{split}.fpk")
        print(f"pack: {split} -> {a.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main("python -m data_prep.pack", main))
