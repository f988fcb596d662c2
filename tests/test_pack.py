"""data_prep/pack.py: the compact lossless form CIFAR-10 travels in to a machine without network."""
import json
import lzma
import struct

import numpy as np
import pytest

from data_prep.pack import PackError, pack_split, reconstruct, residuals, unpack_split


@pytest.fixture(scope="module")
def slice_(cifar):
    images, labels = cifar["train"]
    return images[::20], labels[::20]  # 2,500 real images


def test_round_trip_is_exact_and_smaller(slice_, tmp_path):
    images, labels = slice_
    pack_split(images, labels, tmp_path / "t.fpk")
    size = (tmp_path / "t.fpk").stat().st_size
    assert size < 0.65 * images.nbytes  # the raw pixels compress to about 56% on all of CIFAR-10
    got_images, got_labels = unpack_split(tmp_path / "t.fpk", workers=2)
    assert got_images.dtype == np.uint8 and got_images.shape == images.shape
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)
    assert not list(tmp_path.glob("*.partial"))


def test_residuals_are_small_and_invert_on_extremes():
    rng = np.random.default_rng(0)
    flat = np.full((3, 32, 32, 3), 77, np.uint8)  # a flat image predicts itself: all zeros after the corner
    r = residuals(flat)
    assert (r[:, :, 1:, :] == 0).all() and (r[:, :, 0, 1:] == 0).all()
    edges = rng.choice(np.array([0, 255], np.uint8), size=(5, 32, 32, 3))  # wrap-around at both ends
    noise = rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    for x in (flat, edges, noise):
        assert np.array_equal(reconstruct(residuals(x)), x)


def test_damaged_files_are_refused(slice_, tmp_path):
    images, labels = slice_
    good = tmp_path / "t.fpk"
    pack_split(images[:300], labels[:300], good)
    raw = good.read_bytes()
    cases = {"truncated": raw[:-100], "foreign": b"PK\x03\x04" + raw[4:]}
    for name, data in cases.items():
        p = tmp_path / f"{name}.fpk"
        p.write_bytes(data)
        with pytest.raises(PackError):
            unpack_split(p, workers=1)
    # a well-formed file whose pixels differ from the recorded hashes by one bit
    (hlen,) = struct.unpack("<I", raw[4:8])
    head = json.loads(raw[8:8 + hlen])
    labels_chunk = raw[len(raw) - head["chunk_bytes"][-1]:]
    other = images[:300].copy()
    other[0, 0, 0, 0] ^= 1
    chunk = lzma.compress(residuals(other).tobytes())
    head["chunk_bytes"] = [len(chunk), len(labels_chunk)]
    h = json.dumps(head).encode()
    p = tmp_path / "other.fpk"
    p.write_bytes(raw[:4] + struct.pack("<I", len(h)) + h + chunk + labels_chunk)
    with pytest.raises(PackError, match="does not match its recorded SHA-256"):
        unpack_split(p, workers=1)


def test_pack_limits_keep_the_first_images_of_each_class_in_source_order(cifar, tmp_path):
    from data_prep.pack import main as run

    src = tmp_path / "src"
    src.mkdir()
    for split, step in (("train", 10), ("test", 5)):  # 5,000 / 2,000 real images, every class
        images, labels = cifar[split]
        np.savez(src / f"{split}.npz", images=images[::step], labels=labels[::step])
    assert run(["pack", str(src), str(tmp_path / "slice"), "--limit-train", "205", "--limit-test", "50"]) == 0
    for split, n in (("train", 205), ("test", 50)):
        with np.load(src / f"{split}.npz") as f:
            images, labels = f["images"], f["labels"]
        # expected, built here: class c keeps its first 20 (train: 21 for classes 0-4) images
        want = sorted(i for c in range(10) for i in np.flatnonzero(labels == c)[:n // 10 + (c < n % 10)])
        got_images, got_labels = unpack_split(tmp_path / "slice" / f"{split}.fpk", workers=1)
        assert len(got_labels) == n
        assert np.array_equal(got_images, images[want]) and np.array_equal(got_labels, labels[want])
    # a slice larger than a split holds: refused before anything is written
    from fastres.errors import BadInput
    with pytest.raises(BadInput, match="--limit-test: subset of 5000 asked from 2000 images"):
        run(["pack", str(src), str(tmp_path / "big"), "--limit-train", "10", "--limit-test", "5000"])
    assert not (tmp_path / "big").exists()
