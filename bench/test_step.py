"""Group 'step': images/s of one ResNet-68 training step (forward, backward, SGD) at batch 64 and 512,
and of a few other points of the design space at batch 64 and 128.

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
from fastres.design import describe_model
from fastres.model import count_params
from fastres.runtime import cpu_has_bf16

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
    if variant == "channels_last" and not CUDA and batch != 64:
        return "CPU: at batch 512 fastres_default is this variant (channels_last alone is the CPU default)"
    if variant == "compile" and not CUDA and batch != 64:
        return "CPU: compile is measured at batch 64 only (its ~1 min compile keeps the CPU run short)"
    if MINIMAL and (batch != 64 or variant in ("compile", "fused_bn_relu", "default_with_fused_bn_relu")):
        return "minimal run: batch 64, eager variants only"
    if variant == "amp_bf16" and batch != 64 and not CUDA and not cpu_has_bf16():
        return ("this CPU has no bf16 units: bf16 is emulated (about 10x slower than fp32, which is why --amp "
                "auto is off here); measured at batch 64 only, one short round")
    return None


# Design points a sweep explores (docs/design-space.md), with the switches' defaults: their
# step rates are what a sweep's time estimate needs besides ResNet-68's.
DESIGNS = {
    "resnet68_kernel5": {"kernel": "5"},
    "four_stages_4.8M": {"blocks": "2,2,2,2", "widths": "64,128,192,256", "shortcut_kernel": "3", "pool": "2"},
    "resnet68_wide_32_64_128": {"widths": "32,64,128"},
}
DESIGN_BATCHES = [64, 128]


def emulated_bf16(rt) -> bool:
    """bf16 autocast on a CPU without bf16 units: emulated, ~10x slower than fp32 there."""
    return rt.amp and rt.device.type == "cpu" and not cpu_has_bf16()


def measure_step(benchmark, cfg, name: str, cpu_rounds: int = 5, **info):
    """Time fastres's training step for cfg on a fixed batch, as benchmark rounds; extra_info gets
    images/s and what the switches resolved to. Where bf16 is emulated (a CPU without bf16 units)
    one short round is enough to show it: the case is labelled `emulated` in the summary."""
    benchmark.group = "step"
    rt, model, step, x, y = step_under_test(cfg)  # compiles afresh: no recompile limits, no dynamic batch
    emulated = emulated_bf16(rt)
    # The same number of steps per round at every batch size, so that round times compare (one on
    # a CPU: a ResNet-68 step at batch 512 takes seconds there, and the run's time is kept short).
    steps_per_round = 1 if MINIMAL or emulated or not CUDA else 20

    def run():
        for _ in range(steps_per_round):
            loss, _ = step(x, y)
        sync()
        return loss

    _, warm = timed(lambda: [step(x, y) for _ in range(3 if rt.compile_mode else 1)])
    rounds = 1 if MINIMAL or emulated else 5 if CUDA else (2 if cfg.batch_size == 512 else cpu_rounds)
    loss = benchmark.pedantic(run, rounds=rounds, iterations=1)
    assert torch.isfinite(loss)
    benchmark.extra_info.update(
        name=name, batch_size=cfg.batch_size, steps_per_round=steps_per_round, warmup_s=warm,
        images_per_s=cfg.batch_size * steps_per_round / median_s(benchmark), switches=rt.summary,
        model=describe_model(cfg), parameters=count_params(model), device=str(DEVICE), emulated=emulated, **info)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_step(benchmark, variant, batch):
    reason = skip_reason(variant, batch)
    if reason:
        pytest.skip(reason)
    depth = 8 if MINIMAL else 68
    cfg = make_config("paper", {**VARIANTS[variant], "device": DEVICE.type, "batch_size": batch, "depth": depth})
    measure_step(benchmark, cfg, variant, variant=variant)


@pytest.mark.parametrize("batch", DESIGN_BATCHES)
@pytest.mark.parametrize("design", list(DESIGNS))
def test_design_step(benchmark, design, batch):
    """fastres's default step (the whole step on one CUDA GPU) for a few points of the design
    space; the minimal run times one small point."""
    if MINIMAL and (batch != 64 or design != "four_stages_4.8M"):
        pytest.skip("minimal run: one design point at batch 64")
    if not CUDA and batch != 64:
        pytest.skip("CPU: design points at batch 64 only (seconds a step; the CPU run is kept short)")
    over = {"widths": "8,16,24,32"} if MINIMAL else {}
    cfg = make_config("paper", {**DESIGNS[design], **over, "device": DEVICE.type, "batch_size": batch})
    measure_step(benchmark, cfg, f"design {design}", cpu_rounds=3, design=design)
