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

# Under pytest-xdist (the README's `pytest -n 2`) the workers share the cores: each worker's torch,
# and each process a test starts (inheriting OMP_NUM_THREADS), gets its share of them. On a 2-core AMD EPYC,
# one run each: serial 21.6 min; 2 workers with 2 threads each 17.3 min (2 threads spinning per
# core: 1.4x the CPU time of the serial run); 1 thread each 16.5 min.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# Processes the tests start are not xdist workers: a pytest among them (the bench suite) that
# found xdist's variables would take itself for one, and pytest-benchmark turns itself off there.
# (xdist itself keeps what it needs in config.workerinput.)
for _k in [k for k in os.environ if k.startswith("PYTEST_XDIST")]:
    del os.environ[_k]


def pytest_collection_modifyitems(config, items):
    """Tests marked `long` run first (a stable sort: otherwise in collection order). Under
    `-n 2 --dist worksteal` each worker starts on its half of this list and, once done, takes
    queued tests from the other; a minute-long test started last leaves the other worker idle
    meanwhile, short ones at the end let both finish together."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


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


# Whole networks in fp32 are compared gradient tensor by gradient tensor, by norm: two correct
# fp32 implementations of the same ResNet (PyTorch's own, in NCHW and in channels_last, on this
# CPU) differ in the last bits of a BN output, which flips a ReLU now and then where its input is
# within ~1e-7 of zero, and each flip moves gradients upstream by that element's full gradient.
# Measured over 20 seeds (ResNet-20, batch 32): median 0.8%, worst 1.7% (norm of the difference
# over norm of the gradient, worst tensor); ResNet-8, batch 6: worst 0.5%. Element by element at
# rtol 1e-3 the same two implementations fail in 9-37 of 65 tensors. A real error in a layer
# (a wrong factor, a dropped term) moves its tensors by tens of percent; the per-layer tests
# compare element by element, where no ReLU sits between the two results.
WHOLE_NET_GRAD_RTOL = {8: 2e-2, 20: 5e-2}  # by depth: about 3x the worst measured above


def grad_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Norm of the difference over the norm of `want`."""
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def assert_grads_close(got: dict, want: dict, rtol: float):
    bad = {n: grad_rel(got[n], want[n]) for n in want}
    bad = {n: f"{e:.2e}" for n, e in bad.items() if e > rtol}
    assert not bad, f"gradients off by more than {rtol:.0e} (norm-relative): {bad}"


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


def run_here(command: str, *args) -> subprocess.CompletedProcess:
    """`python -m fastres ARGS` (command "fastres") or `fastres-prep ARGS` ("data_prep") through
    its main() in this process, with the exit status and output run_cli gives: a process start
    less (torch's, dynamo's and FFCV's imports, paid once per test worker instead). For commands
    whose test needs no process of their own: no signals, environment, pid or working folder, no
    warnings read from stderr (pytest records those)."""
    import contextlib
    import importlib
    import io

    main = importlib.import_module({"fastres": "fastres.cli", "data_prep": "data_prep.cli"}[command]).main
    out, err = (io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True) for _ in range(2))
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main([str(a) for a in args])
        except SystemExit as e:  # argparse's usage errors
            status = e.code
    return subprocess.CompletedProcess([command, *args], status, out.buffer.getvalue().decode(),
                                       err.buffer.getvalue().decode())


# GPUs users train on, as torch.cuda describes them: (name, capability, memory in GiB).
GPUS = {
    "P100": ("Tesla P100-PCIE-16GB", (6, 0), 16),
    "V100": ("Tesla V100-SXM2-16GB", (7, 0), 16),
    "T4": ("Tesla T4", (7, 5), 15),
    "RTX8000": ("Quadro RTX 8000", (7, 5), 48),
    "A100": ("NVIDIA A100-SXM4-40GB", (8, 0), 40),
    "RTX3070": ("NVIDIA GeForce RTX 3070", (8, 6), 8),
    "L4": ("NVIDIA L4", (8, 9), 22),
    "H100": ("NVIDIA H100 80GB HBM3", (9, 0), 80),
}


@pytest.fixture
def fake_gpu(monkeypatch):
    """fake_gpu(name, capability, memory_gib): torch.cuda answers as if that GPU were here, for
    testing what fastres resolves to (nothing runs on it). is_bf16_supported says True, as torch's
    does on a T4 (it counts emulation), so a resolution that asks it instead of the capability is
    caught. cuDNN/TF32 flags that resolve() sets are put back afterwards."""
    b = torch.backends
    saved = b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32, b.cudnn.benchmark

    def install(name: str, capability: tuple[int, int], memory_gib: float):
        from types import SimpleNamespace
        props = SimpleNamespace(name=name, major=capability[0], minor=capability[1],
                                total_memory=int(memory_gib * 2**30))
        for attr, value in {"is_available": lambda: True, "device_count": lambda: 1,
                            "get_device_name": lambda dev=None: name,
                            "get_device_capability": lambda dev=None: capability,
                            "get_device_properties": lambda dev=None: props,
                            "is_bf16_supported": lambda including_emulation=True: True,
                            "get_arch_list": lambda: [f"sm_{capability[0]}{capability[1]}"]}.items():
            monkeypatch.setattr(torch.cuda, attr, value)

    yield install
    b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32, b.cudnn.benchmark = saved
