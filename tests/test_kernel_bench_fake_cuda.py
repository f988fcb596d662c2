"""bench/test_kernels.py only runs on a GPU, where a failure costs GPU time: so its Python runs
here, on CPU tensors (Triton interpreter), against a stand-in for the torch.cuda calls it makes
(events, streams, graph capture, synchronize). The numbers mean nothing; what is checked is that
every case runs its warm-up, capture and timing path and reports what gpu_record reads."""
import contextlib
import time
import types

import pytest
import torch

import bench.test_kernels as kb
from bench.gpu_record import kernel_goals


class FakeCuda:
    """The torch.cuda calls bench/test_kernels.py makes, on the CPU; counts graph captures."""

    def __init__(self):
        self.captures, self.replays, self.in_capture = 0, 0, False

    def Event(self, enable_timing=False):
        ev = types.SimpleNamespace(t=None)
        ev.record = lambda: setattr(ev, "t", time.perf_counter())
        ev.elapsed_time = lambda end: 1e3 * (end.t - ev.t)  # ms, as CUDA events report
        return ev

    def Stream(self):
        return types.SimpleNamespace(wait_stream=lambda other: None)

    current_stream = Stream

    def stream(self, s):
        return contextlib.nullcontext()

    def CUDAGraph(self):
        return types.SimpleNamespace(replay=lambda: setattr(self, "replays", self.replays + 1))

    @contextlib.contextmanager
    def graph(self, g):
        self.captures += 1
        self.in_capture = True
        yield
        self.in_capture = False

    def synchronize(self):
        assert not self.in_capture, "synchronize inside a graph capture fails on a GPU"

    def get_device_name(self):
        return "fake"


class FakeBenchmark:
    """The part of pytest-benchmark's fixture that the bench uses."""

    def __init__(self):
        self.group, self.extra_info, self.times = None, {}, []

    def pedantic(self, fn, rounds, iterations=1, setup=None):
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            self.times.append(time.perf_counter() - t0)
        self.stats = types.SimpleNamespace(stats=types.SimpleNamespace(median=sorted(self.times)[len(self.times) // 2]))


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = FakeCuda()
    for name in ("Event", "Stream", "current_stream", "stream", "CUDAGraph", "graph", "synchronize",
                 "get_device_name"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(kb, "DEVICE", torch.device("cpu"))
    monkeypatch.setattr(kb, "CALLS", 2)
    monkeypatch.setattr(kb, "_BW", {})
    return fake


def test_dram_bandwidth_reports_bytes_per_second(fake_cuda):
    assert kb.dram_bandwidth(numel=2 ** 20) > 0 and "bw" in kb._BW


def test_every_case_runs_and_reports(fake_cuda):
    kb._BW["bw"] = 1e11
    rows = []
    for impl in ("fused_triton", "eager", "torch_compile"):
        for pass_ in ("fwd", "fwd_bwd"):
            for timing in ("launch", "graph"):
                b = FakeBenchmark()
                captures = fake_cuda.captures
                kb.test_bn_relu(b, (3, 16, 4, 4), impl, pass_, timing)
                assert b.group == "kernels" and len(b.times) == 20
                assert fake_cuda.captures == captures + (timing == "graph")
                info = b.extra_info
                assert (info["impl"], info["pass_"], info["timing"]) == (impl, pass_, timing)
                assert info["per_call_s"] == pytest.approx(b.stats.stats.median / 2)
                assert info["gb_per_s"] > 0 and info["fraction_of_dram"] == pytest.approx(info["gb_per_s"] / 100)
                rows.append({"group": "kernels", **info})
    assert fake_cuda.replays > 0
    table = kernel_goals(rows).splitlines()
    assert len(table) == 2 + 4  # one row per (pass, timing), fused against compile and eager
    assert all(line.startswith("| 3x16x4x4 | fwd") for line in table[2:])
