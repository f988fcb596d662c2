"""Performance switches, resolved once at start into objects that do nothing when off.

The training loop never branches on a switch: it calls `rt.autocast()` (a real bf16 or fp16
autocast, or a disabled one), scales the loss with `rt.grad_scaler()` (torch.amp's GradScaler,
disabled unless fp16), runs `rt.compile(model)` (torch.compile or the identity), feeds inputs in
`rt.memory_format`, and builds the model with `rt.norm` (PyTorch or Triton BN modules).
`rt.summary` says what each switch resolved to and why; it goes into the run record.

What a switch resolves to depends on the device: its CUDA capability decides the precision (bf16
needs 8.0) and whether Triton can compile for it (7.0); its memory decides where the data lives.
`check(cfg)` refuses, before any work, a setting the device cannot run.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from .config import EXPANSION, IMAGE_SIZE, Config, ConfigError
from .errors import BadInput
from .machine import torch_cuda_problem
from .model import SyncNorm, TorchNorm

BF16_CAPABILITY = (8, 0)    # CUDA: native bf16 (Ampere); below it bf16 fails in Triton's PTX step
TRITON_CAPABILITY = (7, 0)  # CUDA: the oldest device Triton (torch.compile, kernels/) compiles for
CIFAR10_BYTES = 3 * 32 * 32  # one uint8 image, as the resident data holds it


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast's dtype (bfloat16 or float16); None = fp32
    compile_mode: str | None      # None = eager
    channels_last: bool
    fused_bn_relu: bool
    whole_step: bool = False      # the whole step as one CUDA graph (fastres.step); uncaptured on CPU
    data_placement: str = "stream"  # stream | device (fastres.data.Batches)
    norm: object = TorchNorm
    compile_augment: bool = False  # the batched augmentation compiled into one kernel
    summary: dict = field(default_factory=dict)

    @property
    def amp(self) -> bool:
        return self.amp_dtype is not None

    @property
    def loss_scaling(self) -> bool:
        """fp16's narrow range needs the loss scaled up before the backward pass (bf16's does not)."""
        return self.amp_dtype == torch.float16

    @property
    def memory_format(self):
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                              enabled=self.amp)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """torch.amp's dynamic loss scaler (its default scale, growth and back-off), a no-op
        unless fp16. The whole step drives the same object inside its graph."""
        return torch.amp.GradScaler(self.device.type, enabled=self.loss_scaling)

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


@dataclass(frozen=True)
class Gpu:
    """What the resolution needs to know of a CUDA device (torch.cuda's answers; tests fake them)."""
    name: str
    capability: tuple[int, int]
    memory_bytes: int

    @classmethod
    def of(cls, dev) -> "Gpu":
        return cls(torch.cuda.get_device_name(dev), tuple(torch.cuda.get_device_capability(dev)),
                   torch.cuda.get_device_properties(dev).total_memory)

    def __str__(self):
        return f"{self.name} (capability {self.capability[0]}.{self.capability[1]})"


def cpu_has_bf16() -> bool:
    """Native bf16 matrix units on this CPU (bench/results/cpu/ measured bf16 autocast against fp32
    on a CPU with AMX)."""
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def cpu_has_avx512() -> bool:
    return "AVX512" in torch.backends.cpu.get_cpu_capability()


def cpu_name() -> str:
    return f"CPU ({torch.backends.cpu.get_cpu_capability()}, {'with' if cpu_has_bf16() else 'without'} bf16 units)"


def thin_strided_projection(cfg: Config) -> int | None:
    """Input channels of a 1x1 stride-2 projection shortcut with fewer than 8 of them, if the model
    has one (widths[i-1] < 8 where stage i > 0 starts with a 1x1 shortcut), else None. On an x86
    CPU without AVX-512 (AVX2 only), PyTorch's oneDNN backward of such a convolution in
    channels_last corrupts the heap (torch 2.14.1: a crash, or a hang, on the first backward);
    NCHW, or AVX-512, or 8+ input channels, or a 3x3 shortcut are fine."""
    n, exp = len(cfg.blocks), EXPANSION[cfg.block]  # a stage's input: the previous stage's output
    shortcut = cfg.shortcut_kernel * n if len(cfg.shortcut_kernel) == 1 else cfg.shortcut_kernel
    thin = [cfg.widths[i - 1] * exp for i in range(1, n) if shortcut[i] == 1 and cfg.widths[i - 1] * exp < 8]
    return min(thin) if thin else None


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: no CUDA device is available (use --device cpu or auto)")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def check(cfg: Config, gpu: Gpu | None) -> None:
    """Refuse what the device cannot run, in one line naming what does (ConfigError: exit 2). Runs
    before a run folder is made (fastres.train) and again in resolve()."""
    if gpu is None:
        return
    if cfg.amp in ("bf16", "on") and gpu.capability < BF16_CAPABILITY:
        raise ConfigError(f"--amp {cfg.amp}: the {gpu} has no native bf16 (it needs capability 8.0); "
                          "use --amp fp16 (float16 with loss scaling) or --amp auto, which picks it")
    if gpu.capability < TRITON_CAPABILITY:
        why = f"Triton compiles only for CUDA capability 7.0 and newer, and the {gpu} is older"
        if cfg.compile not in ("auto", "off"):
            raise ConfigError(f"--compile {cfg.compile}: {why}; use --compile auto or off (the whole step's "
                              "CUDA graph needs no Triton)")
        if cfg.fused_bn_relu:
            raise ConfigError(f"--fused-bn-relu: its kernels are Triton's; {why}. Drop --fused-bn-relu")


def check_before_work(cfg: Config, local_rank: int = 0) -> None:
    """What a run checks before it makes a folder or reads data: that this torch can use the GPU
    the machine has (unless --device cpu), and that the device can run the settings (check())."""
    if cfg.device != "cpu":
        problem = torch_cuda_problem()
        if problem:
            raise BadInput(problem)
    dev = resolve_device(cfg.device, local_rank)
    check(cfg, Gpu.of(dev) if dev.type == "cuda" else None)


# What `auto` resolves to, in words, for --help: each beside the function that implements it.
AUTO: dict[str, str] = {}

AUTO["amp"] = ("bf16 on CUDA capability >= 8.0 and on CPUs with native bf16 (AMX, AVX512-BF16), fp16 with "
               "dynamic loss scaling on older CUDA GPUs (T4, V100, P100), off on other CPUs")


def resolve_amp(cfg: Config, gpu: Gpu | None) -> tuple[torch.dtype | None, dict]:
    """--amp: bf16 where the device computes it natively, fp16 with loss scaling on older CUDA."""
    fixed = {"bf16": torch.bfloat16, "on": torch.bfloat16, "fp16": torch.float16, "off": None}
    if cfg.amp in fixed:
        dtype, why = fixed[cfg.amp], f"--amp {cfg.amp}"
    elif gpu is not None and gpu.capability >= BF16_CAPABILITY:
        dtype, why = torch.bfloat16, f"--amp auto: bf16, native on the {gpu}"
    elif gpu is not None:
        dtype, why = torch.float16, (f"--amp auto: fp16 with loss scaling, since the {gpu} has no native bf16 "
                                     "(capability 8.0)")
    else:
        has = cpu_has_bf16()
        dtype = torch.bfloat16 if has else None
        why = f"--amp auto: {'bf16' if has else 'off'} on this {cpu_name()}"
    names = {torch.bfloat16: "bf16", torch.float16: "fp16 (loss scaling)", None: "off"}
    return dtype, {"amp": names[dtype], "amp_why": why}


AUTO["whole_step"] = "on for one CUDA GPU in one process, off otherwise (CPU, torchrun)"


def resolve_whole_step(cfg: Config, gpu: Gpu | None, one_gpu: bool, world: int) -> tuple[bool, dict]:
    if cfg.whole_step == "on" and world > 1:
        return False, {"whole_step": "off: requested, but DDP's gradient all-reduce is not captured; "
                                     "the step runs as usual"}
    if cfg.whole_step == "on" or (cfg.whole_step == "auto" and one_gpu):
        s = {"whole_step": "one CUDA graph per step" if gpu else
             "uncaptured: no CUDA, so the same arithmetic runs op by op (for checking it)"}
        if cfg.whole_step == "auto":
            s["whole_step_why"] = (f"--whole-step auto: on for one CUDA GPU, here the {gpu} (CUDA graphs need no "
                                   "Triton); bench/results/2026-11-26-nvidia-h100-80gb-hbm3.md")
        return True, s
    s = {"whole_step": "off"}
    if cfg.whole_step == "auto" and gpu:
        s["whole_step_why"] = f"--whole-step auto: off under torchrun on the {gpu} (DDP's all-reduce is not captured)"
    return False, s


AUTO["compile"] = ("on CUDA default inside the whole step and under torchrun, reduce-overhead without the "
                   "whole step; off on CPU and below CUDA capability 7.0, where Triton cannot compile")


def resolve_compile(cfg: Config, gpu: Gpu | None, whole: bool, world: int) -> tuple[str | None, bool, dict]:
    """(torch.compile mode or None, compile the augmentation?, summary). auto: on CUDA, default
    inside the whole step's graph, reduce-overhead without it (the host's kernel launches bound a
    batch-64 step; CUDA graphs replay them), default under torchrun; off where Triton cannot
    compile for the device and on CPU (eager measured faster there once compile time counts)."""
    triton_ok = gpu is not None and gpu.capability >= TRITON_CAPABILITY
    if cfg.compile != "auto":
        mode, why = (None if cfg.compile == "off" else cfg.compile), f"--compile {cfg.compile}"
    elif triton_ok:
        mode = "default" if whole or world > 1 else "reduce-overhead"
        why = (f"--compile auto: {mode} on the {gpu} ("
               + ("inside the whole step's graph" if whole else "torchrun" if world > 1 else "CUDA graphs")
               + "); bench/results/2026-11-26-nvidia-h200.md")
    elif gpu is not None:
        mode, why = None, (f"--compile auto: off, since Triton compiles only for capability 7.0 and newer and "
                           f"the {gpu} is older")
    else:
        mode, why = None, "--compile auto: off on CPU (eager measured faster once compile time counts; bench/ 'step')"
    if mode in ("reduce-overhead", "max-autotune") and gpu is None:
        why += "; CUDA graphs need CUDA, so inductor skips them on CPU"
    s = {"compile": mode or "off", "compile_why": why}
    augment = cfg.compile_augment and (gpu is None or triton_ok)
    s["compile_augment"] = augment
    if cfg.compile_augment and not augment:
        s["compile_augment_why"] = f"off: Triton cannot compile for the {gpu}; the augmentation runs eagerly"
    return mode, augment, s


def resident_bytes(cfg: Config) -> int:
    """Bytes the device needs for resident data and training cfg's model on it: the uint8 images of
    both splits; the activations kept for backward at the batch size (torchinfo's float32 figure,
    which counts their gradients); an evaluation batch's largest activations (no backward: input,
    output and a residual of the widest map, with room for a copy); weights, gradients, optimizer
    state and EMA (5 copies of the parameters)."""
    from .design import summarize

    s = summarize(cfg, depth=1)
    images = (cfg.train_limit or 50_000) + (cfg.test_limit or 10_000)
    widest_map = max(w * (IMAGE_SIZE >> i) ** 2 for i, w in enumerate(cfg.widths)) * 4  # bytes per image, fp32
    return int(images * CIFAR10_BYTES + s["forward_backward_mb"] * 1e6 * cfg.batch_size
               + 4 * widest_map * cfg.eval_batch_size + 5 * s["params_mb"] * 1e6)


RESIDENT_SHARE = 0.8  # of a GPU's memory that resident data and training may take: the rest is left
                      # for cuDNN's workspaces, the allocator and the CUDA context
AUTO["data_placement"] = (f"device on one CUDA GPU where images and training fit in {RESIDENT_SHARE:.0%} of its "
                          "memory, else stream")


def resolve_placement(cfg: Config, gpu: Gpu | None, one_gpu: bool) -> tuple[str, dict]:
    if cfg.data_placement != "auto":
        return cfg.data_placement, {"data_placement": cfg.data_placement}
    if not one_gpu:
        where = f"under torchrun on the {gpu}" if gpu else f"on this {cpu_name()}"
        return "stream", {"data_placement": "stream", "data_placement_why": f"--data-placement auto: stream {where}"}
    need, have = resident_bytes(cfg), gpu.memory_bytes
    if need > RESIDENT_SHARE * have:
        return "stream", {"data_placement": "stream", "data_placement_why": (
            f"--data-placement auto: stream, since resident data and training need about {need / 2**30:.1f} GiB "
            f"and the {gpu} has {have / 2**30:.1f} GiB")}
    return "device", {"data_placement": "device", "data_placement_why": (
        f"--data-placement auto: device (about {need / 2**30:.1f} GiB of the {gpu}'s {have / 2**30:.1f} GiB); "
        "bench/results/2026-11-26-nvidia-h100-80gb-hbm3.md")}


def resolve_norm(cfg: Config, gpu: Gpu | None, world: int) -> tuple[object, bool, dict]:
    """(norm module class, fused kernels on?, summary): Triton's fused BN+ReLU, PyTorch's BN, or
    SyncBatchNorm across processes."""
    fused, norm, s = cfg.fused_bn_relu, TorchNorm, {}
    if fused:
        interp = os.environ.get("TRITON_INTERPRET") == "1"
        if gpu is not None or interp:
            from kernels import FusedNorm
            norm = FusedNorm
            s["fused_bn_relu"] = "triton" + (" (interpreter)" if gpu is None else "")
        else:
            fused = False
            s["fused_bn_relu"] = ("off: requested, but Triton kernels need CUDA; falling back to the PyTorch "
                                  "BN+ReLU path (TRITON_INTERPRET=1 runs them in the interpreter, for tests)")
    else:
        s["fused_bn_relu"] = "off"
        if gpu is not None:
            s["fused_bn_relu_why"] = (f"off by default on the {gpu}: no full training run with it is recorded yet; "
                                      "bench/results/2026-11-26-nvidia-h200.md")
    if cfg.sync_bn:
        if gpu is None:
            raise RuntimeError("--sync-bn: PyTorch's SyncBatchNorm runs on CUDA only; drop it on CPU")
        if world > 1:
            if fused:
                s["fused_bn_relu"] = "off: --sync-bn takes precedence (the Triton kernels are per-process)"
                fused = False
            norm = SyncNorm
        s["sync_bn"] = "on" if world > 1 else "off (single process)"
    return norm, fused, s


def resolve_channels_last(cfg: Config, cuda: bool) -> tuple[bool, dict]:
    thin = thin_strided_projection(cfg) if cfg.channels_last and not cuda and not cpu_has_avx512() else None
    if thin is None:
        return cfg.channels_last, {"channels_last": cfg.channels_last}
    return False, {"channels_last": False, "channels_last_why": (
        f"off: this model has a 1x1 stride-2 shortcut with {thin} input channels, whose channels_last backward "
        f"corrupts memory in PyTorch's CPU kernels without AVX-512 (this {cpu_name()}); NCHW instead")}


def resolve(cfg: Config, local_rank: int = 0, world: int = 1) -> Runtime:
    dev = resolve_device(cfg.device, local_rank)
    cuda = dev.type == "cuda"
    gpu = Gpu.of(dev) if cuda else None
    check(cfg, gpu)
    one_gpu = cuda and world == 1  # where the auto defaults below were measured
    if not torch.cuda.is_available():
        # inductor imports torch.utils.cpp_extension, which warns "No CUDA runtime is found" on
        # every CPU-only machine; nothing here needs the CUDA toolkit, so the warning is noise.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    s = {"device": str(dev)}
    if cuda:
        s.update(device_name=gpu.name, capability=f"{gpu.capability[0]}.{gpu.capability[1]}",
                 memory_gib=round(gpu.memory_bytes / 2**30, 1))
        # TF32 for any fp32 matmul/conv left outside autocast: ~10 mantissa bits are plenty here
        # (Ampere and newer; ignored by older devices).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    amp_dtype, s_amp = resolve_amp(cfg, gpu)
    whole, s_whole = resolve_whole_step(cfg, gpu, one_gpu, world)
    mode, augment, s_compile = resolve_compile(cfg, gpu, whole, world)
    placement, s_place = resolve_placement(cfg, gpu, one_gpu)
    norm, fused, s_norm = resolve_norm(cfg, gpu, world)
    channels_last, s_cl = resolve_channels_last(cfg, cuda)
    for part in (s_amp, s_whole, s_compile, s_place, s_norm, s_cl):
        s.update(part)
    if cuda:
        s["eval_batch_size_why"] = (f"--eval-batch-size {cfg.eval_batch_size} on the {gpu}: evaluation is a small "
                                    "share of a run's time; bench/results/2026-11-26-nvidia-h100-80gb-hbm3.md")
    return Runtime(dev, amp_dtype, mode, channels_last, fused, whole, placement, norm, augment, s)
