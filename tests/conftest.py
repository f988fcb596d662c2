"""Shared fixtures: the real CIFAR-10 (from $FASTRES_CIFAR10) and small converted slices of it.

Without the data, tests that need it fail under CI (CI=true) and skip elsewhere, with the reason.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Triton kernels run in Triton's interpreter when there is no GPU. It must be chosen before the
# kernels are defined, so it is set here, before any test module imports `kernels`.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]


def _find_cifar() -> Path | None:
    """$FASTRES_CIFAR10, else what `fastres train` downloaded into ./data/downloads."""
    from data_prep.sources import SourceError, detect

    env = os.environ.get("FASTRES_CIFAR10")
    for c in ([Path(env)] if env else []) + [REPO / "data" / "downloads"]:
        try:
            detect(c)
            return c
        except SourceError:
            pass
    return None


def need_cifar() -> Path:
    path = _find_cifar()
    if path is None:
        msg = ("real CIFAR-10 not found: set FASTRES_CIFAR10 to a folder with train.npz/test.npz or "
               "cifar-10-batches-py "
               f"(looked at ${{FASTRES_CIFAR10}}={os.environ.get('FASTRES_CIFAR10')!r} and ./data/downloads)")
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture
def exact_convs():
    """fp32 convolutions without TF32 and with fixed cuDNN algorithms, for tests that compare two
    networks (or CPU and GPU) to fp32 tolerances: on a GPU, runtime.resolve() turns on TF32
    (~10 mantissa bits) and cudnn.benchmark (which may pick Winograd or FFT algorithms per run),
    and either alone moves a ResNet's gradients by more than 1e-3 (seen on an H200)."""
    b = torch.backends
    saved = (b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32, b.cudnn.benchmark, b.cudnn.deterministic)
    b.cudnn.allow_tf32 = b.cuda.matmul.allow_tf32 = b.cudnn.benchmark = False
    b.cudnn.deterministic = True
    yield
    b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32, b.cudnn.benchmark, b.cudnn.deterministic = saved


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    return need_cifar()


@pytest.fixture(scope="session")
def cifar(cifar_dir):
    """The real arrays: {'train': (images, labels), 'test': (images, labels)}."""
    from data_prep.sources import load

    train, test = load(cifar_dir)
    return {"train": (train.images, train.labels), "test": (test.images, test.labels)}


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, cifar_dir) -> Path:
    """A converted class-balanced slice: 2,000 train and 500 test images."""
    from data_prep.cli import prepare

    out = tmp_path_factory.mktemp("small_data")
    prepare(str(cifar_dir), str(out), limit_train=2000, limit_test=500, log=lambda *a: None)
    return out


@pytest.fixture(scope="session")
def full_data(tmp_path_factory, cifar_dir) -> Path:
    """All 50,000 + 10,000 images, converted."""
    from data_prep.cli import prepare

    out = tmp_path_factory.mktemp("full_data")
    prepare(str(cifar_dir), str(out), log=lambda *a: None)
    return out


def run_cli(*args, env=None, timeout=600, **kw) -> subprocess.CompletedProcess:
    """Run `python -m <args>` from the repo root and capture its output."""
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=kw.pop("cwd", REPO), env=e,
                          capture_output=True, text=True, timeout=timeout, **kw)
