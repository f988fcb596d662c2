"""Group 'kernels': fused Triton BN+ReLU against eager PyTorch and torch.compile's own fusion.

CUDA only. Shapes are the ResNet-68's (batch 64 and 512; 16x32x32, 32x16x16, 64x8x8), bf16
channels_last as in training. Reported: time per call, effective GB/s (the minimum traffic:
forward reads x and writes y; forward+backward also reads dy, y, x and writes dx) and that as a
fraction of the DRAM bandwidth measured here by a large device-to-device copy.

Two timings per case, CALLS calls per round, one synchronization per round:
  launch  calls issued from Python as a training step issues them (launch overhead included:
          at these sizes a kernel runs for microseconds, so this is what eager training sees)
  graph   the same calls captured once in a CUDA graph and replayed: GPU time alone, the figure
          to hold against the DRAM bandwidth
"""
import pytest
import torch
import torch.nn.functional as F

from bench.common import CUDA, DEVICE, MINIMAL, median_s

pytestmark = pytest.mark.skipif(not CUDA, reason="Triton kernels need a CUDA GPU; the CPU path is PyTorch's")

SHAPES = [(64, 16, 32, 32), (64, 32, 16, 16), (64, 64, 8, 8), (512, 16, 32, 32), (512, 32, 16, 16),
          (512, 64, 8, 8)]
_BW = {}


def dram_bandwidth(numel: int = 2 ** 28) -> float:
    """Bytes/s of a device-to-device copy of numel float32s (1 GiB; read + write), best of 10."""
    if "bw" not in _BW:
        a = torch.empty(numel, device=DEVICE, dtype=torch.float32)
        b = torch.empty_like(a)
        best = float("inf")
        for _ in range(10):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            b.copy_(a)
            e.record()
            torch.cuda.synchronize()
            best = min(best, s.elapsed_time(e) / 1e3)
        _BW["bw"] = 2 * a.numel() * 4 / best
    return _BW["bw"]


def torch_bn_relu(x, bn):
    return F.relu(bn(x))


CALLS = 2 if MINIMAL else 20


def graphed(body):
    """body() CALLS times, captured in one CUDA graph (after warm-up on a side stream, as the
    CUDA-graph docs do it); returns the replay function."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            body()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(CALLS):
            body()
    return g.replay


@pytest.mark.parametrize("shape", SHAPES[:1] if MINIMAL else SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["fused_triton", "eager", "torch_compile"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("timing", ["launch", "graph"])
def test_bn_relu(benchmark, shape, impl, pass_, timing):
    from kernels import BatchNormReLU2d

    benchmark.group = "kernels"
    x = torch.randn(shape, device=DEVICE, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    bn = (BatchNormReLU2d if impl == "fused_triton" else torch.nn.BatchNorm2d)(shape[1]).to(DEVICE)
    fn = bn if impl == "fused_triton" else (lambda t: torch_bn_relu(t, bn))
    if impl == "torch_compile":
        fn = torch.compile(fn)
    x.requires_grad_(pass_ == "fwd_bwd")
    dy = torch.randn_like(x)

    def body():
        y = fn(x)
        if pass_ == "fwd_bwd":
            y.backward(dy)

    for _ in range(5):  # warm-up: compile, autotune
        body()
    torch.cuda.synchronize()
    if timing == "graph":
        replay = graphed(body)

        def run():
            replay()
            torch.cuda.synchronize()
    else:
        def run():
            for _ in range(CALLS):
                body()
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=20 if not MINIMAL else 2, iterations=1)
    per_call = median_s(benchmark) / CALLS
    traffic = x.numel() * x.element_size() * (2 if pass_ == "fwd" else 6)
    gbps = traffic / per_call / 1e9
    benchmark.extra_info.update(shape=list(shape), impl=impl, pass_=pass_, timing=timing, calls_per_round=CALLS,
                                per_call_s=per_call, dtype="bf16", layout="channels_last", gb_per_s=gbps,
                                dram_gb_per_s=dram_bandwidth() / 1e9, fraction_of_dram=gbps * 1e9 / dram_bandwidth(),
                                device=torch.cuda.get_device_name())
