"""Shared helpers of the benchmark suite (`pytest bench/`; see README, 'Tracking speed').

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
