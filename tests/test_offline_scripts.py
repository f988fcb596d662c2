"""scripts/offline_pack.sh and scripts/offline_setup.sh: the wheels and CIFAR-10 packed for a GPU
machine without network, cut into pieces of a size asked for, joined, checked and converted there
(run here on a real slice); the slice for the tests unpacked from p0 alone; only the wheels of
packages that Python lacks installed."""
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import numpy as np
import pytest

from conftest import REPO


def sh(script, *args, **env):
    return subprocess.run(["bash", str(REPO / "scripts" / script), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **{k: str(v) for k, v in env.items()}})


def make_wheel(folder, name, version):
    """A real (tiny) pure-Python wheel: one module that holds its version."""
    files = {f"{name}.py": f"VERSION = {version!r}\n".encode(),
             f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},{len(d)}\n"
                     for n, d in files.items()) + f"{name}-{version}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr(f"{name}-{version}.dist-info/RECORD", record)


def python_beside(tmp_path):
    """A Python of its own (a venv) that also sees this environment's packages (through a .pth
    file), so that what setup installs lands in the venv, not in the environment the tests run in.
    That environment's own .pth files apply too: from Python 3.12 on, FFCV's `import distutils`
    is served by the one setuptools installs."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "beside.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    return venv / "bin" / "python"


@pytest.fixture(scope="module")
def packed_once(cifar, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("offline")
    src, wheels = tmp_path / "src", tmp_path / "wheels"
    src.mkdir(), wheels.mkdir()
    for split, step in (("train", 25), ("test", 20)):  # every 25th / 20th image: 2,000 / 500, all classes
        images, labels = cifar[split]
        np.savez_compressed(src / f"{split}.npz", images=images[::step], labels=labels[::step])
    # ffcv is installed here: setup must leave it alone (pip would refuse this file as a wheel)
    (wheels / "ffcv-1.0.2-cp311-abi3-manylinux_2_35_x86_64.whl").write_bytes(b"stand-in: ffcv is installed here")
    make_wheel(wheels, "fastres_offline_probe", "0.1")  # a package nothing here has: setup installs it
    dev = tmp_path / "dev"
    r = sh("offline_pack.sh", PYTHON=sys.executable, FASTRES_CIFAR10=src, WHEELS=wheels, PIECE_MB=1,
           SLICE="100,20", OFFLINE_DIR=dev)
    assert r.returncode == 0, r.stderr
    return src, dev


@pytest.fixture
def packed(packed_once, tmp_path):
    """The packed folder, a copy of its own for each test (they remove and damage pieces)."""
    src, dev = packed_once
    shutil.copytree(dev, tmp_path / "dev")
    return src, tmp_path / "dev"


def test_pack_cuts_pieces_under_the_size_asked(packed, packed_once):
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
    assert sorted(p.name for p in (dev / "p0" / "wheels").iterdir()) == [
        "fastres_offline_probe-0.1-py3-none-any.whl", "ffcv-1.0.2-cp311-abi3-manylinux_2_35_x86_64.whl"]
    assert sorted(p.name for p in (dev / "p0" / "slice").iterdir()) == ["test.fpk", "train.fpk"]
    assert not (packed_once[1].parent / "dev.partial").exists()


def test_setup_with_p0_alone_installs_missing_wheels_and_unpacks_the_slice(packed, tmp_path):
    src, dev = packed
    for piece in dev.glob("p[1-9]*"):
        piece.rename(tmp_path / piece.name)  # only p0 has arrived
    py = python_beside(tmp_path)
    r = sh("offline_setup.sh", "--slice", PYTHON=py, OFFLINE_DIR=dev, DATA=tmp_path / "data")
    assert r.returncode == 0, r.stderr
    assert "installed fastres_offline_probe-0.1" in r.stdout and "ffcv" not in r.stdout.split("ready")[0]
    probe = subprocess.run([str(py), "-c", "import fastres_offline_probe as p; print(p.VERSION)"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "0.1", probe.stderr
    assert not (tmp_path / "data").exists()  # --slice converts nothing
    # the slice: class c's first images in source order (100 train, 20 test), built here
    assert f"FASTRES_CIFAR10={dev}/slice" in r.stdout
    for split, n in (("train", 100), ("test", 20)):
        with np.load(src / f"{split}.npz") as f:
            images, labels = f["images"], f["labels"]
        want = sorted(i for c in range(10) for i in np.flatnonzero(labels == c)[:n // 10])
        with np.load(dev / "slice" / f"{split}.npz") as f:
            assert np.array_equal(f["images"], images[want]) and np.array_equal(f["labels"], labels[want])
    # the whole set needs the other pieces: named, and nothing converted
    r = sh("offline_setup.sh", PYTHON=py, OFFLINE_DIR=dev, DATA=tmp_path / "data")
    assert r.returncode == 2 and "is not here yet" in r.stderr and not (tmp_path / "data").exists()
    assert "installed" not in r.stdout  # the probe is there now


@pytest.mark.long
def test_setup_refuses_missing_or_damaged_pieces_then_converts(packed, tmp_path):
    src, dev = packed
    data, py = tmp_path / "data", python_beside(tmp_path)
    n = int((dev / "p0" / "PIECES").read_text())
    last = dev / f"p{n - 1}" / f"cifar10.tar.{n - 1:02d}"
    held = last.read_bytes()
    last.unlink()
    r = sh("offline_setup.sh", PYTHON=py, OFFLINE_DIR=dev, DATA=data)
    assert r.returncode == 2 and "is not here yet" in r.stderr and not data.exists()
    last.write_bytes(held[:-1] + bytes([held[-1] ^ 0xFF]))
    r = sh("offline_setup.sh", PYTHON=py, OFFLINE_DIR=dev, DATA=data)
    assert r.returncode == 2 and "do not match the checksum" in r.stderr and not data.exists()
    last.write_bytes(held)
    r = sh("offline_setup.sh", PYTHON=py, OFFLINE_DIR=dev, DATA=data)
    assert r.returncode == 0, r.stderr
    assert "offline_setup: ready" in r.stdout and "fastres-prep: writing" in r.stdout + r.stderr
    # the joined pieces hold exactly the source: the same content hash as converting it directly
    from data_prep.cli import prepare
    prepare(str(src), str(tmp_path / "direct"), log=lambda *a: None)
    got = json.loads((data / "cifar10_manifest.json").read_text())
    want = json.loads((tmp_path / "direct" / "cifar10_manifest.json").read_text())
    assert got["counts"] == want["counts"] and got["content_sha256"] == want["content_sha256"]
    r = sh("offline_setup.sh", PYTHON=py, OFFLINE_DIR=dev, DATA=data)  # done: nothing to redo
    assert r.returncode == 0 and "fastres-prep" not in r.stdout + r.stderr


def test_wheels_script_refuses_bad_arguments_before_downloading(tmp_path):
    r = sh("offline_wheels.sh")
    assert r.returncode == 2 and "usage: scripts/offline_wheels.sh DIR" in r.stderr
    r = sh("offline_wheels.sh", str(tmp_path / "w"), TARGET_PYTHON="312")
    assert r.returncode == 2 and "TARGET_PYTHON=312: give MAJOR.MINOR" in r.stderr and not (tmp_path / "w").exists()
