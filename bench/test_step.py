"""Group 'step': images/s of one ResNet-68 training step (forward, backward, SGD) at batch 64 and 512.

eager_baseline is fp32, NCHW, no compile. On CPU, fastres_default is what the switches resolve to
by default and each other variant turns on one switch alone over the baseline. On CUDA the step
modes are measured instead: eager, torch.compile's default, reduce-overhead (CUDA graphs) and
max-autotune-no-cudagraphs and the whole step as one CUDA graph (--whole-step), each in bf16 +
channels_last, with and without the fused BN-ReLU. Inputs
are a fixed batch already on the device, so only the step is timed. Warm-up steps (compilation,
autotuning) are timed apart and reported as warmup_s.
"""
import pytest
import torch

from bench.common import CUDA, DEVICE, MINIMAL, median_s, step_under_test, sync, timed
from fastres.config import make_config
from fastres.model import count_params

# whole_step off except in its own variants: on CUDA its auto is on
BASE = {"channels_last": False, "amp": "off", "compile": "off", "fused_bn_relu": False, "whole_step": "off"}
FAST = {"channels_last": True, "amp": "on", "whole_step": "off"}  # bf16 + channels_last, as every compiled mode
VARIANTS = {
    "eager_baseline": BASE,
    "fastres_default": {},
    "channels_last": {**BASE, "channels_last": True},
    "amp_bf16": {**BASE, "amp": "on"},
    "compile": {**BASE, "compile": "default"},
    # CUDA only: the step modes side by side, each with and without the fused BN-ReLU kernels
    "eager_bf16_cl": {**BASE, **FAST},
    "compile_default": {**FAST, "compile": "default"},
    "reduce_overhead": {**FAST, "compile": "reduce-overhead"},
    "max_autotune_no_cudagraphs": {**FAST, "compile": "max-autotune-no-cudagraphs"},
    "fused_bn_relu": {**BASE, "fused_bn_relu": True},
    "default_with_fused_bn_relu": {"fused_bn_relu": True},  # the kernels inside the compiled default
    "eager_bf16_cl_fused": {**BASE, **FAST, "fused_bn_relu": True},
    "compile_default_fused": {**FAST, "compile": "default", "fused_bn_relu": True},
    "reduce_overhead_fused": {**FAST, "compile": "reduce-overhead", "fused_bn_relu": True},
    "max_autotune_no_cudagraphs_fused": {**FAST, "compile": "max-autotune-no-cudagraphs", "fused_bn_relu": True},
    # the whole step (forward, backward, SGD, EMA) as one CUDA graph, the model compiled inside it
    "whole_step": {**FAST, "compile": "default", "whole_step": "on"},
    "whole_step_fused": {**FAST, "compile": "default", "whole_step": "on", "fused_bn_relu": True},
}
CUDA_ONLY = {k for k in VARIANTS if k.startswith(("eager_bf16", "compile_", "reduce", "max_autotune", "whole"))}
# On CUDA the single-switch variants over fp32 NCHW are left out: the step modes above cover the
# combinations a run uses, and each compiled variant costs a compilation.
CPU_ONLY = {"channels_last", "amp_bf16", "compile", "fastres_default", "default_with_fused_bn_relu"}
BATCHES = [64, 512]


def skip_reason(variant, batch):
    if variant in CUDA_ONLY and not CUDA:
        return "step modes with CUDA graphs, autotuning or Triton kernels are measured on CUDA only"
    if variant in CPU_ONLY and CUDA:
        return "on CUDA the step modes (whole_step = fastres's default there) replace this variant"
    if "fused_bn_relu" in variant and not CUDA:
        return "fused BN-ReLU runs its Triton kernels on CUDA only (the CPU path is the PyTorch fallback)"
    if variant == "compile" and not CUDA and batch != 64:
        return "CPU: compile is measured at batch 64 only (its ~1 min compile keeps the CPU run short)"
    if MINIMAL and (batch != 64 or variant in ("compile", "fused_bn_relu", "default_with_fused_bn_relu")):
        return "minimal run: batch 64, eager variants only"
    return None


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_step(benchmark, variant, batch):
    reason = skip_reason(variant, batch)
    if reason:
        pytest.skip(reason)
    benchmark.group = "step"
    depth = 8 if MINIMAL else 68
    cfg = make_config("paper", {**VARIANTS[variant], "device": DEVICE.type, "batch_size": batch, "depth": depth})
    rt, model, step, x, y = step_under_test(cfg)  # compiles afresh: no recompile limits, no dynamic batch
    # The same number of steps per round at every batch size, so that round times compare.
    steps_per_round = 1 if MINIMAL else (2 if not CUDA else 20)

    def run():
        for _ in range(steps_per_round):
            loss, _ = step(x, y)
        sync()
        return loss

    _, warm = timed(lambda: [step(x, y) for _ in range(3 if rt.compile_mode else 1)])
    rounds = 1 if MINIMAL else (3 if not CUDA and batch == 512 else 5)
    loss = benchmark.pedantic(run, rounds=rounds, iterations=1)
    assert torch.isfinite(loss)
    benchmark.extra_info.update(
        variant=variant, batch_size=batch, steps_per_round=steps_per_round, warmup_s=warm,
        images_per_s=batch * steps_per_round / median_s(benchmark), switches=rt.summary,
        model=f"resnet{depth}", parameters=count_params(model), device=str(DEVICE))
