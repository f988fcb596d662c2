"""scripts/offline_pack.sh and scripts/offline_setup.sh: FFCV and CIFAR-10 packed for a GPU machine
without network, cut into pieces of a size asked for, joined, checked and converted there (run
here on a real slice)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO


def sh(script, **env):
    return subprocess.run(["bash", str(REPO / "scripts" / script)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **{k: str(v) for k, v in env.items()}})


@pytest.fixture
def packed(cifar, tmp_path):
    src, wheels = tmp_path / "src", tmp_path / "wheels"
    src.mkdir(), wheels.mkdir()
    for split, step in (("train", 25), ("test", 20)):  # every 25th / 20th image: 2,000 / 500, all classes
        images, labels = cifar[split]
        np.savez_compressed(src / f"{split}.npz", images=images[::step], labels=labels[::step])
    (wheels / "ffcv-1.0.2-cp311-abi3-manylinux_2_35_x86_64.whl").write_bytes(b"stand-in: ffcv is installed here")
    dev = tmp_path / "dev"
    r = sh("offline_pack.sh", PYTHON=sys.executable, FASTRES_CIFAR10=src, FFCV_WHEELS=wheels, PIECE_MB=1,
           OFFLINE_DIR=dev)
    assert r.returncode == 0, r.stderr
    return src, dev


def test_pack_cuts_pieces_under_the_size_asked(packed):
    src, dev = packed
    n = int((dev / "p0" / "PIECES").read_text())
    pieces = sorted(dev.glob("p*/cifar10.tar.*"))
    assert n == len(pieces) >= 2
    # each folder, the wheels in p0 included, within the 1 MiB asked for
    for folder in dev.glob("p*"):
        assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) <= 2 ** 20, folder
    # compressed: well under the raw pixels (and under numpy's own compressed .npz files)
    raw = sum(np.load(src / f"{s}.npz")["images"].nbytes for s in ("train", "test"))
    npz = sum((src / f"{s}.npz").stat().st_size for s in ("train", "test"))
    packed_bytes = sum(p.stat().st_size for p in pieces)
    assert packed_bytes < 0.7 * raw and packed_bytes < 0.8 * npz, (packed_bytes, raw, npz)
    assert [p.name for p in (dev / "p0" / "wheels").iterdir()] == ["ffcv-1.0.2-cp311-abi3-manylinux_2_35_x86_64.whl"]
    assert not dev.with_name("dev.partial").exists()


@pytest.mark.long
def test_setup_refuses_missing_or_damaged_pieces_then_converts(packed, tmp_path):
    src, dev = packed
    data = tmp_path / "data"
    n = int((dev / "p0" / "PIECES").read_text())
    last = dev / f"p{n - 1}" / f"cifar10.tar.{n - 1:02d}"
    held = last.read_bytes()
    last.unlink()
    r = sh("offline_setup.sh", PYTHON=sys.executable, OFFLINE_DIR=dev, DATA=data)
    assert r.returncode == 2 and "is not here yet" in r.stderr and not data.exists()
    last.write_bytes(held[:-1] + bytes([held[-1] ^ 0xFF]))
    r = sh("offline_setup.sh", PYTHON=sys.executable, OFFLINE_DIR=dev, DATA=data)
    assert r.returncode == 2 and "do not match the checksum" in r.stderr and not data.exists()
    last.write_bytes(held)
    r = sh("offline_setup.sh", PYTHON=sys.executable, OFFLINE_DIR=dev, DATA=data)
    assert r.returncode == 0, r.stderr
    assert "offline_setup: ready" in r.stdout and "fastres-prep: writing" in r.stdout + r.stderr
    # the joined pieces hold exactly the source: the same content hash as converting it directly
    from data_prep.cli import prepare
    prepare(str(src), str(tmp_path / "direct"), log=lambda *a: None)
    got = json.loads((data / "cifar10_manifest.json").read_text())
    want = json.loads((tmp_path / "direct" / "cifar10_manifest.json").read_text())
    assert got["counts"] == want["counts"] and got["content_sha256"] == want["content_sha256"]
    r = sh("offline_setup.sh", PYTHON=sys.executable, OFFLINE_DIR=dev, DATA=data)  # done: nothing to redo
    assert r.returncode == 0 and "fastres-prep" not in r.stdout + r.stderr
