"""One frozen dataclass holds every setting of a run; presets are named sets of overrides.

    cfg = make_config("smoke", {"lr": "0.05"})   # preset, then typed overrides (strings allowed)

Units are in the comments. Validation happens here, before any heavy work, and raises
ConfigError with one clear message (the CLI prints it and exits with status 2).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, fields

from .errors import BadInput


class ConfigError(BadInput):
    """A bad setting: unknown key, wrong type or value out of range (exit status 2)."""


DEFAULT_PRESET = "paper"  # what train, sweep --seeds, summary and env start from without --preset


@dataclass(frozen=True)
class Config:
    preset: str = DEFAULT_PRESET
    # --- model (the paper's names: N stages, B_i blocks, C_i channels, F_i, K_i, P) -----------
    depth: int = 68                       # weighted layers, 2 * sum(blocks) + 2 (3 * for bottlenecks);
                                          # given alone it is the shorthand for three equal stages,
                                          # 6n+2 (68 = 11,11,11), 9n+2 for bottlenecks
    blocks: tuple[int, ...] = (11, 11, 11)  # B_i: basic blocks per stage; N = its length, 1 to 5
                                          # stages (each after the first halves the feature map)
    widths: tuple[int, ...] = (16, 32, 64)  # C_i: channels per stage, one per stage
    kernel: tuple[int, ...] = (3,)        # F_i: conv size (px, odd) in each stage's blocks, one for
                                          # all stages or one per stage; "same" padding
    stem_kernel: int = 3                  # px, odd: the first convolution (3 -> widths[0] channels)
    shortcut_kernel: tuple[int, ...] = (1,)  # K_i: conv size (px, odd) of the projection shortcut
                                          # where a block changes shape, one for all or one per stage
    pool: int = 0                         # P: average-pool window (px, stride P) before the linear
                                          # layer; 0 = global average pool
    block: str = "basic"                  # basic | preact (He et al. 2016: BN-ReLU-conv twice, conv
                                          # shortcut without BN, BN-ReLU before the pool, stem a conv
                                          # alone) | bottleneck (1x1, FxF, 1x1; output 4x the width)
    se: int = 0                           # squeeze-and-excitation reduction R in every block (before
                                          # the addition; squeezed width = width // R); 0 = off
    stem_se: int = 0                      # the same after the stem; 0 = off
    se_bias: bool = True                  # SE's two layers with bias
    dropout: float = 0.0                  # probability: dropout before the classifier; 0 = off
    block_dropout: float = 0.0            # probability: dropout in each block after its first
                                          # activation (between the convolutions); 0 = off
    max_params: int = 0                   # trainable parameters allowed (5M, 1.05e6 and 1050202 are
                                          # read); a larger model is refused before any work; 0 = any
    # --- data ------------------------------------------------------------------------------
    data: str = "./data"                  # folder with the .beton files (converted on demand)
    train_limit: int = 0                  # images; 0 = all 50,000, else a class-balanced subset
    test_limit: int = 0                   # images; 0 = all 10,000
    augment: bool = True                  # random crop (pad 4 px) + horizontal flip
    cutout: int = 0                       # px: side of a square zeroed (after normalization) at a
                                          # random centre in each training image, clipped at the
                                          # borders; 0 = off
    mixup: float = 0.0                    # alpha of Beta(alpha, alpha): each batch blended with
                                          # itself rolled by one image, targets likewise; 0 = off
    cutmix: float = 0.0                   # alpha: a box of the rolled batch pasted in, targets mixed
                                          # by its area; 0 = off (mixup and cutmix: one of the two
                                          # per batch, at random)
    loader_workers: int = -1              # FFCV decode threads per process; -1 = the process's CPU
                                          # threads (OMP_NUM_THREADS, else torch's default); at
                                          # most the CPUs; torch computes on its own count
    data_placement: str = "auto"          # auto | stream = FFCV reads every epoch | device = both
                                          # splits read once into uint8 tensors on the training
                                          # device (240 MB for CIFAR-10's training set, held
                                          # zero-padded for the crop), epochs permuted there
    # --- optimization ----------------------------------------------------------------------
    epochs: int = 50                      # passes over the training set
    batch_size: int = 64                  # images per optimizer step, summed over all processes
    eval_batch_size: int = 1000           # images per evaluation forward pass
    lr: float = 0.01                      # peak learning rate at batch_size (see lr_ref_batch)
    lr_ref_batch: int = 0                 # images; >0: linear scaling, peak lr = lr * batch_size / lr_ref_batch
    optimizer: str = "sgd"                # sgd | adam | adamw (AdamW: weight decay decoupled from the
                                          # gradient, p *= 1 - lr * weight_decay)
    momentum: float = 0.9                 # SGD momentum (heavy ball, or Nesterov below)
    nesterov: bool = False                # Nesterov momentum (SGD)
    betas: tuple[float, ...] = (0.9, 0.999)  # Adam/AdamW: decay per step of the gradient's first and
                                          # second moment estimates
    eps: float = 1e-8                     # Adam/AdamW: added to the denominator sqrt(v_hat)
    weight_decay: float = 5e-4            # L2 coefficient (not stated by the paper; common template value)
    no_decay_bn_bias: bool = False        # exclude BN weights/biases and linear bias from weight decay
    schedule: str = "cosine_epoch"        # cosine_epoch = CosineAnnealingLR(T_max=epochs) stepped per epoch;
                                          # cosine_step = the same curve evaluated every step
    warmup_epochs: float = 0.0            # epochs of linear warm-up from 0 to the peak lr (per step)
    label_smoothing: float = 0.0          # probability mass spread uniformly over the 10 classes
    ema: float = 0.0                      # weight EMA decay per step (0 = off); evaluation uses the EMA
    tta: bool = False                     # evaluate on the mean logits of each image and its mirror
    # --- performance switches (resolved once, at start; see fastres.runtime) ---------------
    device: str = "auto"                  # auto | cpu | cuda
    channels_last: bool = True            # NHWC memory for activations and weights
    amp: str = "auto"                     # auto | bf16 | fp16 | off (on = bf16): autocast precision
    compile: str = "auto"                 # auto | off | default | reduce-overhead (CUDA graphs) | max-autotune
                                          # | max-autotune-no-cudagraphs
    fused_bn_relu: bool = False           # Triton BN+ReLU and BN+add+ReLU kernels (CUDA; see kernels/)
    compile_augment: bool = True          # torch.compile the batched crop+flip+normalize into one
                                          # fused kernel (compiled once, then cached)
    whole_step: str = "auto"              # auto | on | off: capture forward, backward, the optimizer (lr from a
                                          # device table of the schedule) and EMA as one CUDA graph,
                                          # replayed with one launch per step (fastres/step.py; CPU:
                                          # same arithmetic, uncaptured; single process only)
    sync_bn: bool = False                 # SyncBatchNorm across processes (distributed runs)
    # --- run -------------------------------------------------------------------------------
    seed: int = 0                         # model init, data order and augmentation
    out: str = ""                         # run folder: record.json, metrics.csv, curves.png, last.pt
                                          # ("" = a new runs/PRESET/DATE-TIME, linked as runs/latest;
                                          # with --resume, the run runs/latest points at)
    progress_s: float = 10.0              # seconds between progress lines when output is not a
                                          # terminal (a terminal gets a live bar); 0 = every step
    tensorboard: bool = False             # also write TensorBoard scalars to RUN_DIR/tensorboard
                                          # (needs the tensorboard package)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict] = {
    # "Optimizing ResNet Architecture for CIFAR-10 Classification" (Chen and Ge, NYU): ResNet-68,
    # SGD(0.9), lr 0.01, batch 64, cosine over 50 epochs; reported 90.14%.
    "paper": {},
    # Minutes on a 2-core CPU and still real learning.
    "smoke": dict(depth=20, train_limit=10_000, epochs=3, batch_size=256, lr=0.1, schedule="cosine_step"),
    # Beyond the paper: same ResNet-68 and 50 epochs, better optimization (see docs/training.md, 'Presets').
    "tuned": dict(batch_size=128, lr=0.1, nesterov=True, label_smoothing=0.1, warmup_epochs=2,
                  schedule="cosine_step", ema=0.999, tta=True, no_decay_bn_bias=True),
    # Large batch for wall time on a GPU; lr scaled linearly from 0.1 per 128 images.
    "throughput": dict(batch_size=512, lr=0.1, lr_ref_batch=128, nesterov=True, label_smoothing=0.1,
                       warmup_epochs=5, schedule="cosine_step", ema=0.999, tta=True,
                       no_decay_bn_bias=True, eval_batch_size=2000),
}

CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "amp": ("auto", "bf16", "fp16", "off", "on"),
    "compile": ("auto", "off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "schedule": ("cosine_epoch", "cosine_step"),
    "data_placement": ("auto", "stream", "device"),
    "whole_step": ("auto", "on", "off"),
    "optimizer": ("sgd", "adam", "adamw"),
    "block": ("basic", "preact", "bottleneck"),
}
CONVS_PER_BLOCK = {"basic": 2, "preact": 2, "bottleneck": 3}
EXPANSION = {"basic": 1, "preact": 1, "bottleneck": 4}  # a block's output channels per unit of width
IMAGE_SIZE = 32   # px: CIFAR-10's images, the input every model here is built for
MAX_STAGES = 5    # the 32 px input halved four times leaves a 2x2 map for the fifth stage

# auto | on | off settings: given as a bool (or a bare --key / --no-key) they mean on / off
ON_OFF = {k for k, allowed in CHOICES.items() if {"on", "off"} <= set(allowed)}

_TYPES = typing.get_type_hints(Config)
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def parse_count(raw) -> int:
    """A parameter count: 1050202, 1.05e6, 5M, 500k, 1_000_000 (M = 10^6, k = 10^3)."""
    s = str(raw).strip().replace("_", "").replace(",", "")
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(s[-1:].lower(), 1)
    value = float(s[:-1] if scale != 1 else s) * scale
    if not value.is_integer():
        raise ValueError(raw)
    return int(value)


def parse_value(key: str, raw):
    """Convert `raw` (a string from the command line, or a Python value) to the field's type."""
    typ = _TYPES[key]
    try:
        if key == "max_params":
            return parse_count(raw)
        if key in ON_OFF and (isinstance(raw, bool) or str(raw).lower() in _TRUE | _FALSE):
            return "on" if raw is True or str(raw).lower() in _TRUE else "off"
        if typ is bool:
            if isinstance(raw, bool):
                return raw
            s = str(raw).lower()
            if s in _TRUE | _FALSE:
                return s in _TRUE
            raise ValueError
        if typ is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if typ is float:
            return float(raw)
        if typ is str:
            return str(raw)
        if typing.get_origin(typ) is tuple:
            item = typing.get_args(typ)[0]
            items = raw.split(",") if isinstance(raw, str) else list(raw) if isinstance(raw, (list, tuple)) else [raw]
            return tuple(parse_value_item(item, v) for v in items)
    except (ValueError, TypeError):
        pass
    name = getattr(typ, "__name__", str(typ))
    if typing.get_origin(typ) is tuple:
        name = f"comma-separated {typing.get_args(typ)[0].__name__}s"
    elif key == "max_params":
        name = "a parameter count (1050202, 1.05e6, 5M)"
    raise ConfigError(f"--{key.replace('_', '-')}: expected {name}, got {raw!r}")


def parse_value_item(typ: type, v):
    if isinstance(v, bool) or (typ is int and isinstance(v, float) and not v.is_integer()):
        raise ValueError(v)
    return typ(str(v).strip()) if isinstance(v, str) else typ(v)


def equal_blocks(depth: int, block: str = "basic") -> tuple[int, int, int]:
    """--depth alone: three equal stages of (depth - 2) / 6 blocks (68 -> 11, 11, 11); (depth - 2) / 9
    bottlenecks (164 -> 18, 18, 18)."""
    per = 3 * CONVS_PER_BLOCK[block]
    if depth < per + 2 or (depth - 2) % per:
        examples = "8, 14, 20, 56, 68, 110" if per == 6 else "11, 20, 29, 56, 110, 164"
        raise ConfigError(f"--depth: must be {per}n+2 with n >= 1 ({examples}, ...) for {block} blocks when given "
                          f"alone (three equal stages); got {depth} (--blocks gives other shapes)")
    return ((depth - 2) // per,) * 3


def depth_of(blocks, block: str = "basic") -> int:
    """Weighted layers of a ResNet with these blocks per stage: the stem, two convolutions per block
    (three per bottleneck), the linear layer."""
    return CONVS_PER_BLOCK[block] * sum(blocks) + 2


def feature_map(n_stages: int) -> int:
    """px: side of the last stage's feature map (each stage after the first halves it)."""
    return IMAGE_SIZE >> (n_stages - 1)


def validate(cfg: Config) -> Config:
    def bad(key, msg):
        raise ConfigError(f"--{key.replace('_', '-')}: {msg}")

    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            bad(key, f"must be one of {', '.join(allowed)}; got {getattr(cfg, key)!r}")
    # The model: one family, so a bad shape is caught here rather than by a convolution later.
    n = len(cfg.blocks)
    if not 1 <= n <= MAX_STAGES:
        bad("blocks", f"{n} stages: 1 to {MAX_STAGES} are possible (each stage after the first halves the "
                      f"{IMAGE_SIZE} px input, and a sixth would start from a 1x1 map); got {cfg.blocks}")
    if min(cfg.blocks) <= 0:
        bad("blocks", f"every stage needs at least one block; got {cfg.blocks}")
    if len(cfg.widths) != n:
        bad("widths", f"one width per stage: --blocks has {n} stages but --widths {len(cfg.widths)} "
                      f"({cfg.widths}; blocks {cfg.blocks})")
    if min(cfg.widths) <= 0:
        bad("widths", f"must be positive; got {cfg.widths}")
    per = CONVS_PER_BLOCK[cfg.block]
    if cfg.depth != depth_of(cfg.blocks, cfg.block):
        bad("depth", f"{cfg.depth} disagrees with --blocks {','.join(map(str, cfg.blocks))}, which make "
                     f"{depth_of(cfg.blocks, cfg.block)} layers ({per} per {cfg.block} block + 2); give one of the two")
    validate_parts(cfg, bad)
    for key in ("kernel", "shortcut_kernel"):
        ks = getattr(cfg, key)
        if len(ks) not in (1, n):
            bad(key, f"one size for all stages or one per stage ({n}); got {len(ks)}: {ks}")
        if any(k <= 0 or k % 2 == 0 for k in ks):
            bad(key, f"sizes must be odd and positive (same padding keeps the feature maps); got {ks}")
    if cfg.stem_kernel <= 0 or cfg.stem_kernel % 2 == 0:
        bad("stem_kernel", f"must be odd and positive; got {cfg.stem_kernel}")
    side = feature_map(n)
    if cfg.pool < 0 or cfg.pool > side or (cfg.pool and side % cfg.pool):
        bad("pool", f"the last stage's map is {side}x{side} px ({n} stages), so the pool must be 0 (global) or "
                    f"a divisor of {side} up to {side}; got {cfg.pool}")
    if cfg.max_params < 0:
        bad("max_params", f"must be >= 0 (0 = no limit); got {cfg.max_params}")
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        bad("betas", f"two decay rates in [0, 1), e.g. 0.9,0.999; got {cfg.betas}")
    if not cfg.eps > 0:
        bad("eps", f"must be > 0; got {cfg.eps}")
    if cfg.cutout < 0 or cfg.cutout > IMAGE_SIZE:
        bad("cutout", f"a square side in px from 0 (off) to {IMAGE_SIZE}; got {cfg.cutout}")
    for key in ("mixup", "cutmix"):
        if not getattr(cfg, key) >= 0:
            bad(key, f"alpha must be >= 0 (0 = off); got {getattr(cfg, key)}")
    for key in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(cfg, key) <= 0:
            bad(key, f"must be > 0; got {getattr(cfg, key)}")
    if not cfg.lr > 0:  # also rejects NaN
        bad("lr", f"must be > 0; got {cfg.lr}")
    for key in ("train_limit", "test_limit", "lr_ref_batch", "weight_decay", "warmup_epochs", "progress_s"):
        if not getattr(cfg, key) >= 0:
            bad(key, f"must be >= 0; got {getattr(cfg, key)}")
    for key in ("momentum", "label_smoothing", "ema"):
        if not 0 <= getattr(cfg, key) < 1:
            bad(key, f"must be in [0, 1); got {getattr(cfg, key)}")
    if cfg.nesterov and cfg.momentum == 0:
        bad("nesterov", "needs momentum > 0")
    if cfg.nesterov and cfg.optimizer != "sgd":
        bad("nesterov", f"is SGD's; --optimizer {cfg.optimizer} has its own momentum (--betas)")
    if cfg.warmup_epochs > cfg.epochs:
        bad("warmup_epochs", f"({cfg.warmup_epochs}) exceeds --epochs ({cfg.epochs})")
    return cfg


def validate_parts(cfg: Config, bad) -> None:
    """SE and dropout: a reduction must leave every width it applies to at least one channel."""
    outs = [w * EXPANSION[cfg.block] for w in cfg.widths]
    for key, applies_to in (("se", outs), ("stem_se", cfg.widths[:1])):
        r = getattr(cfg, key)
        if r < 0:
            bad(key, f"a reduction ratio >= 1 (0 = off); got {r}")
        if r > min(applies_to):
            bad(key, f"reduction {r} would squeeze {min(applies_to)} channels to none (width // R); at most "
                     f"{min(applies_to)} here")
    for key in ("dropout", "block_dropout"):
        if not 0 <= getattr(cfg, key) < 1:
            bad(key, f"a probability in [0, 1); got {getattr(cfg, key)}")


def make_config(preset: str = DEFAULT_PRESET, overrides: dict | None = None) -> Config:
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = {"preset": preset}
    given = {}
    for key, raw in (overrides or {}).items():
        key = key.replace("-", "_")
        if key not in _TYPES or key == "preset":
            raise unknown_setting(key)
        given[key] = parse_value(key, raw)
    block = given.get("block", PRESETS[preset].get("block", "basic"))
    if block not in CHOICES["block"]:
        raise ConfigError(f"--block: must be one of {', '.join(CHOICES['block'])}; got {block!r}")
    # the overrides' model shape replaces the preset's; a preset's depth means basic blocks' stages
    for layer, kind in ((PRESETS[preset], "basic"), (given, block)):
        values.update(layer)
        values.update(_shape(layer, kind))
    if not {"depth", "blocks"} & given.keys():  # the preset's stages, counted in this block's layers
        values["depth"] = depth_of(values.get("blocks", Config.blocks), block)
    return validate(Config(**values))


def _shape(layer: dict, block: str = "basic") -> dict:
    """depth and blocks as one layer of settings (a preset, the overrides) gives them: depth alone
    means three equal stages, blocks alone fix the depth, both must agree (checked by validate)."""
    if "blocks" in layer and "depth" not in layer:
        return {"depth": depth_of(layer["blocks"], block)}
    if "depth" in layer and "blocks" not in layer:
        return {"blocks": equal_blocks(layer["depth"], block)}
    return {}


def unknown_setting(key: str) -> ConfigError:
    """'unknown setting --lrr; did you mean --lr?'"""
    names = [k for k in _TYPES if k != "preset"]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    hint = f"; did you mean --{close[0].replace('_', '-')}?" if close else ""
    return ConfigError(f"unknown setting --{key.replace('_', '-')}{hint} (see 'fastres train --help')")


def parse_overrides(args: list[str]) -> dict[str, str]:
    """['--lr', '0.1', '--no-decay-bn-bias', 'true'] -> {'lr': '0.1', 'no_decay_bn_bias': 'true'}.

    '--key=value' works too. A bool flag given without a value means true; '--no-KEY' (no value)
    means false, for any bool KEY ('--no-augment').
    """
    out, i = {}, 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or len(a) == 2:
            raise ConfigError(f"unexpected argument {a!r}; settings are given as --key value")
        key, _, val = a[2:].partition("=")
        key = key.replace("-", "_")
        if key not in _TYPES and key.startswith("no_") and is_switch(key[3:]) and not _:
            out[key[3:]] = "false"
            i += 1
            continue
        if key not in _TYPES or key == "preset":
            raise unknown_setting(key)
        if not _:
            nxt = args[i + 1] if i + 1 < len(args) else None
            if is_switch(key) and (nxt is None or nxt.startswith("--")):
                val = "true"
            elif nxt is None:
                raise ConfigError(f"--{key.replace('_', '-')} needs a value")
            else:
                val, i = nxt, i + 1
        out[key] = val
        i += 1
    return out


def is_switch(key: str) -> bool:
    """A setting that a bare --key turns on and --no-key off."""
    return _TYPES.get(key) is bool or key in ON_OFF


def from_dict(d: dict) -> Config:
    """Rebuild a Config from to_dict() output (e.g. a checkpoint or record.json)."""
    d = {k: v for k, v in d.items() if k in _TYPES}
    for k in ON_OFF & d.keys():  # written as true/false before they had an auto
        d[k] = parse_value(k, d[k])
    for k in d:
        if typing.get_origin(_TYPES[k]) is tuple:
            d[k] = tuple(d[k])
    d.update(_shape(d, d.get("block", "basic")))  # written before --blocks existed: depth alone, three equal stages
    return validate(Config(**d))


def describe(cfg: Config) -> str:
    """The resolved config, one 'key = value' per line, for printing at start."""
    return "\n".join(f"  {f.name:<18} = {json.dumps(getattr(cfg, f.name))}" for f in fields(cfg))


def help_text(auto: dict[str, str] | None = None) -> str:
    """Every setting with its default and the comment beside it in Config, for --help; auto: what
    `auto` resolves to per setting (fastres.runtime.AUTO, beside the code that resolves it)."""
    import inspect

    defaults, auto = {f.name: f.default for f in fields(Config)}, auto or {}
    lines: dict[str, str] = {}  # setting -> its line
    for line in inspect.getsource(Config).splitlines():
        s = line.strip()
        name = s.split(":")[0]
        if name in defaults and name != "preset":
            comment = s.split("#", 1)[1].strip() if "#" in s else ""
            lines[name] = f"  --{name.replace('_', '-'):<20} {json.dumps(defaults[name]):<14} {comment}"
        elif s.startswith("#") and lines and not s.startswith("# ---"):  # the comment goes on
            lines[next(reversed(lines))] += " " + s.lstrip("# ")
    return "\n".join(line + (f"; auto = {auto[name]}" if name in auto else "") for name, line in lines.items())
