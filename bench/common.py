"""Shared helpers of the benchmark suite (`pytest bench/`; see docs/benchmarks.md).

FASTRES_BENCH_DATA: folder of .beton files (default ./data, converted on demand from
  $FASTRES_CIFAR10 or the torchvision download).
FASTRES_BENCH_MINIMAL=1: one tiny round of everything; the test suite uses it to check that each
  group runs. Its numbers mean nothing.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MINIMAL = os.environ.get("FASTRES_BENCH_MINIMAL") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"


def environment() -> dict:
    """What ran the benchmarks, kept in each result row (a record may be written elsewhere later)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name() if CUDA else "cpu"
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton_version}


def sync():
    if CUDA:
        torch.cuda.synchronize()


def timed(fn, *args):
    """(result, seconds) of fn(*args), device-synchronized."""
    sync()
    t0 = time.perf_counter()
    out = fn(*args)
    sync()
    return out, time.perf_counter() - t0


def median_s(benchmark) -> float:
    return benchmark.stats.stats.median


def step_under_test(cfg):
    """(rt, model, step, x, y): what the step benchmarks and the profiler time: the ResNet of
    `cfg`, SGD at a constant lr, the training step fastres builds for `cfg` (compiled, CUDA
    graphs, --whole-step, as the switches say) and a fixed random batch on the device. Dynamo's
    caches are reset first, so each call compiles afresh."""
    from fastres import runtime
    from fastres.design import build_model
    from fastres.optim import EMA, make_criterion, peak_lr
    from fastres.step import build_step

    torch._dynamo.reset()
    rt = runtime.resolve(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, rt)
    opt = torch.optim.SGD(model.parameters(), lr=peak_lr(cfg), momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    step = build_step(cfg, rt, model, rt.compile(model), opt, sched, EMA(model, 0), make_criterion(cfg), 1000)
    x = torch.randn(cfg.batch_size, 3, 32, 32, device=rt.device).to(memory_format=rt.memory_format)
    y = torch.randint(0, 10, (cfg.batch_size,), device=rt.device)
    return rt, model, step, x, y
