"""Group 'kernel_host': host (CPU) time of one fused BN+ReLU forward + backward, kernels not launched.

At the ResNet's sizes a fused kernel runs for microseconds on a GPU, so the Python work around its
launches decides what an eager training step pays. The kernels are stubbed out (kernels.aot), so
this measures only that work, on any machine: the launchers called directly (what eager autograd
does now) against the same launchers behind the registered custom ops (what torch.compile's graph
calls, and what eager used to call). Runs on CPU and GPU alike; bf16 channels_last, C=16.
"""
import pytest
import torch

from bench.common import MINIMAL, median_s

CALLS = 50 if MINIMAL else 2000


@pytest.mark.parametrize("path", ["launcher_direct", "custom_op"])
def test_fused_bn_relu_host_time(benchmark, path):
    from kernels import bn_relu
    from kernels.aot import stubbed_kernels

    benchmark.group = "kernel_host"
    C = 16
    # small tensors: CPU allocation of large ones (page faults) would swamp the host work, which
    # does not depend on size (a GPU's caching allocator makes allocation cheap)
    x = torch.randn(4, C, 8, 8, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    w, b, rm, rv = torch.ones(C), torch.zeros(C), torch.zeros(C), torch.ones(C)
    fwd, bwd = (bn_relu._fwd, bn_relu._bwd) if path == "launcher_direct" else (bn_relu.bn_act_fwd, bn_relu.bn_act_bwd)

    with stubbed_kernels() as launches:
        def run():
            for _ in range(CALLS):
                y, mean, invstd = fwd(x, None, w, b, rm, rv, True, 0.1, 1e-5)
                bwd(dy, y, x, w, mean, invstd, True, False)

        run()  # warm-up
        # the record holds its tensors: emptied before each round, outside the timing
        benchmark.pedantic(run, setup=launches.clear, rounds=3 if MINIMAL else 7, iterations=1)
        assert len(launches) == 5 * CALLS  # stats, finalize, apply; reduce, dx
    benchmark.extra_info.update(path=path, calls_per_round=CALLS, host_us_per_fwd_bwd=1e6 * median_s(benchmark) / CALLS)
