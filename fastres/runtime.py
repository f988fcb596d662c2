"""Performance switches, resolved once at start into objects that do nothing when off.

The training loop never branches on a switch: it calls `rt.autocast()` (a real bf16 autocast or
a disabled one), runs `rt.compile(model)` (torch.compile or the identity), feeds inputs in
`rt.memory_format`, and builds the model with `rt.norm` (PyTorch or Triton BN modules).
`rt.summary` says what each switch resolved to and why; it goes into the run record.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from .config import Config
from .model import SyncNorm, TorchNorm


@dataclass
class Runtime:
    device: torch.device
    amp: bool                     # bf16 autocast on
    compile_mode: str | None      # None = eager
    channels_last: bool
    fused_bn_relu: bool
    whole_step: bool = False      # the whole step as one CUDA graph (fastres.step); uncaptured on CPU
    data_placement: str = "stream"  # stream | device (fastres.data.Batches)
    norm: object = TorchNorm
    summary: dict = field(default_factory=dict)

    @property
    def memory_format(self):
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def compile(self, model):
        return torch.compile(model, mode=self.compile_mode) if self.compile_mode else model

    def compile_in_graph(self, model):
        """torch.compile for a model that runs inside a CUDA graph of our own (--whole-step): the
        same mode without inductor's CUDA graphs, which cannot nest in a capture."""
        inner = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}
        mode = inner.get(self.compile_mode, self.compile_mode)
        return torch.compile(model, mode=mode) if mode else model

    @property
    def cuda_graphs(self) -> bool:
        """Inductor replays the compiled graphs as CUDA graphs (these modes, on CUDA only)."""
        return self.device.type == "cuda" and self.compile_mode in ("reduce-overhead", "max-autotune")

    @property
    def step_begin(self):
        """Called at the start of each training step: tells inductor's CUDA-graph trees that the
        previous step's outputs may be overwritten (without it they guess from the backward pass,
        and an evaluation between two steps can confuse the guess); a no-op without CUDA graphs."""
        return torch.compiler.cudagraph_mark_step_begin if self.cuda_graphs else (lambda: None)


def cpu_has_bf16() -> bool:
    """Native bf16 matrix units on this CPU. With them, bf16 autocast measured 1.7x (batch 64) and
    3.2x (batch 512) the images/s of fp32 per ResNet-68 step on the 2-core Xeon with AMX
    (bench/results/cpu/)."""
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def thin_strided_projection(cfg: Config) -> int | None:
    """Input channels of a 1x1 stride-2 projection shortcut with fewer than 8 of them, if the model
    has one (widths[i-1] < 8 where stage i > 0 starts with a 1x1 shortcut), else None. On an x86
    CPU without AVX-512 (AVX2 only), PyTorch's oneDNN backward of such a convolution in
    channels_last corrupts the heap (torch 2.14.1: a crash, or a hang, on the first backward);
    NCHW, or AVX-512, or 8+ input channels, or a 3x3 shortcut are fine."""
    n = len(cfg.blocks)
    shortcut = cfg.shortcut_kernel * n if len(cfg.shortcut_kernel) == 1 else cfg.shortcut_kernel
    thin = [cfg.widths[i - 1] for i in range(1, n) if shortcut[i] == 1 and cfg.widths[i - 1] < 8]
    return min(thin) if thin else None


def cpu_has_avx512() -> bool:
    return "AVX512" in torch.backends.cpu.get_cpu_capability()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: no CUDA device is available (use --device cpu or auto)")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve(cfg: Config, local_rank: int = 0, world: int = 1) -> Runtime:
    dev = resolve_device(cfg.device, local_rank)
    cuda = dev.type == "cuda"
    one_gpu = cuda and world == 1  # where the auto defaults below were measured
    if not torch.cuda.is_available():
        # inductor imports torch.utils.cpp_extension, which warns "No CUDA runtime is found" on
        # every CPU-only machine; nothing here needs the CUDA toolkit, so the warning is noise.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    s = {"device": str(dev)}
    if cuda:
        s["device_name"] = torch.cuda.get_device_name(dev)
        # TF32 for any fp32 matmul/conv left outside autocast: ~10 mantissa bits are plenty here.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    has_bf16 = cpu_has_bf16()
    amp = cfg.amp == "on" or (cfg.amp == "auto" and (cuda or has_bf16))
    s["amp"] = "bf16" if amp else "off"
    s["amp_why"] = f"--amp {cfg.amp}" + (" (on for CUDA, and on CPUs with native bf16 (AMX or AVX512-BF16), "
                                         f"which this one {'has' if has_bf16 else 'lacks'})"
                                         if cfg.amp == "auto" else "")

    # The whole step first: compile's auto follows it. Records for the CUDA defaults below:
    # bench/results/2026-11-26-nvidia-h100-80gb-hbm3.md (the paper run, whole step + resident data,
    # 3.11 s per epoch, 90.07%) and -bench.md (step images/s), 2026-11-26-nvidia-h200.md.
    if cfg.whole_step == "on" and world > 1:
        whole = False
        s["whole_step"] = "off: requested, but DDP's gradient all-reduce is not captured; the step runs as usual"
    elif cfg.whole_step == "on" or (cfg.whole_step == "auto" and one_gpu):
        whole = True
        s["whole_step"] = ("one CUDA graph per step" if cuda else
                           "uncaptured: no CUDA, so the same arithmetic runs op by op (for checking it)")
    else:
        whole = False
        s["whole_step"] = "off"
    if cfg.whole_step == "auto" and cuda:
        s["whole_step_why"] = ("--whole-step auto: " + ("on" if whole else "off under torchrun (DDP's all-reduce is "
                               "not captured)") + "; on one CUDA GPU the step as one graph measured 1.27x "
                               "reduce-overhead's images/s at batch 64 and about the same at 512 (H100s), and the paper run with it "
                               "took 3.11 s per epoch and reached 90.07% (H100; reduce-overhead: 7.59 s, 90.09% at 48/50 "
                               "epochs on an H200), bench/results/2026-11-26-nvidia-h100-80gb-hbm3.md")

    if cfg.compile == "auto":
        # CUDA, whole step: default (the model inside the step's own graph; this is the measured
        # paper run). CUDA, one process, whole step off: reduce-overhead. At batch 64 the step is
        # bound by the host launching ~1,000 small kernels; replaying them as CUDA graphs measured
        # 2.9x the images/s of torch.compile's default on an H200 (27 vs 1,033 launches per step;
        # GPU busy 3.9 ms of a 7.8 ms vs 33.6 ms step; bench/results/2026-11-26-nvidia-h200*.md).
        # Several processes: default (CUDA graphs around DDP's all-reduce are not measured yet).
        # CPU: eager measured faster than compiled per step on the 2-core reference machine once
        # compile time is counted (bench/ 'step' group); so auto = off there.
        mode = ("default" if whole or world > 1 else "reduce-overhead") if cuda else None
        s["compile_why"] = ("--compile auto: on CUDA default inside the whole step's graph (the measured paper run), "
                            "reduce-overhead without it (CUDA graphs: 2.9x torch.compile default's images/s at batch "
                            "64, NVIDIA H200, bench/results/2026-11-26-nvidia-h200.md), default under torchrun; off on "
                            "CPU (eager measured faster there)")
    else:
        mode = None if cfg.compile == "off" else cfg.compile
        s["compile_why"] = f"--compile {cfg.compile}"
    if mode in ("reduce-overhead", "max-autotune") and not cuda:
        s["compile_why"] += "; CUDA graphs need CUDA, so inductor skips them on CPU"
    s["compile"] = mode or "off"

    placement = cfg.data_placement if cfg.data_placement != "auto" else "device" if one_gpu else "stream"
    s["data_placement"] = placement
    if cfg.data_placement == "auto":
        s["data_placement_why"] = ("--data-placement auto: device on one CUDA GPU (no per-batch host work; the measured "
                                   "paper run, H100, bench/results/2026-11-26-nvidia-h100-80gb-hbm3.md), stream on CPU "
                                   "and under torchrun (not measured there yet)")

    fused = cfg.fused_bn_relu
    norm = TorchNorm
    if fused:
        interp = os.environ.get("TRITON_INTERPRET") == "1"
        if cuda or interp:
            from kernels import FusedNorm
            norm = FusedNorm
            s["fused_bn_relu"] = "triton" + (" (interpreter)" if not cuda else "")
        else:
            fused = False
            s["fused_bn_relu"] = ("off: requested, but Triton kernels need CUDA; falling back to the PyTorch "
                                  "BN+ReLU path (TRITON_INTERPRET=1 runs them in the interpreter, for tests)")
    else:
        s["fused_bn_relu"] = "off"
        if cuda:
            s["fused_bn_relu_why"] = ("off by default: with CUDA graphs it measured 1.29x the images/s at batch 64 "
                                      "(H200, bench/results/2026-11-26-nvidia-h200.md) but slower without them, and "
                                      "no full training run with it has been recorded yet")
    if cfg.sync_bn:
        if not cuda:
            raise RuntimeError("--sync-bn: PyTorch's SyncBatchNorm runs on CUDA only; drop it on CPU")
        if world > 1:
            if fused:
                s["fused_bn_relu"] = "off: --sync-bn takes precedence (the Triton kernels are per-process)"
                fused = False
            norm = SyncNorm
        s["sync_bn"] = "on" if world > 1 else "off (single process)"
    channels_last = cfg.channels_last
    thin = thin_strided_projection(cfg) if channels_last and not cuda and not cpu_has_avx512() else None
    if thin is not None:
        channels_last = False
        s["channels_last_why"] = (f"off: this model has a 1x1 stride-2 shortcut with {thin} input channels, whose "
                                  "channels_last backward corrupts memory in PyTorch's CPU kernels without AVX-512 "
                                  "(this CPU: " + torch.backends.cpu.get_cpu_capability() + "); NCHW instead")
    s["channels_last"] = channels_last
    s["compile_augment"] = cfg.compile_augment
    if cuda:
        s["eval_batch_size_why"] = (f"--eval-batch-size {cfg.eval_batch_size}: at 1000, evaluation took 3.1 s of the "
                                    "H100 paper run's 158 s of training and evaluation (2%), so it is left there; "
                                    "--loader-workers matters only for the one read of resident data")
    return Runtime(dev, amp, mode, channels_last, fused, whole, placement, norm, s)
