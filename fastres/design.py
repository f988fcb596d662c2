"""The design space as settings: the model a Config describes, its size and its cost.

    model = model_from_config(cfg)          # the ResNet of cfg's blocks, widths, kernels, pool
    s = summarize(cfg)                      # parameters, MACs, sizes and torchinfo's layer table
    check_budget(cfg)                       # OverBudget (exit 2) past cfg.max_params

`fastres summary` prints summarize()'s table in the spirit of the paper's Table 1; `fastres train`
calls check_budget before it makes a run folder, and its record carries parameters and MACs.
"""
from __future__ import annotations

import torch

from .config import IMAGE_SIZE, Config
from .errors import BadInput
from .model import ResNet, TorchNorm, count_params


class OverBudget(BadInput):
    """The model has more trainable parameters than --max-params allows (exit status 2)."""


def model_from_config(cfg: Config, norm=TorchNorm) -> ResNet:
    return ResNet(cfg.blocks, cfg.widths, cfg.kernel, cfg.stem_kernel, cfg.shortcut_kernel, cfg.pool, norm=norm,
                  block=cfg.block, se=cfg.se, stem_se=cfg.stem_se, se_bias=cfg.se_bias, dropout=cfg.dropout,
                  block_dropout=cfg.block_dropout)


def build_model(cfg: Config, rt) -> ResNet:
    """The model of cfg with the BN modules, device and memory format the switches (rt) chose."""
    return model_from_config(cfg, rt.norm).to(rt.device, memory_format=rt.memory_format)


def describe_model(cfg: Config) -> str:
    """'resnet68 (blocks 11,11,11, widths 16,32,64)', with the kernels and pool where not the paper's."""
    j = lambda v: ",".join(map(str, v))
    parts = [f"blocks {j(cfg.blocks)}", f"widths {j(cfg.widths)}"]
    if cfg.kernel != (3,) or cfg.stem_kernel != 3:
        parts.append(f"kernel {j(cfg.kernel)}, stem {cfg.stem_kernel}")
    if cfg.shortcut_kernel != (1,):
        parts.append(f"shortcut kernel {j(cfg.shortcut_kernel)}")
    if cfg.pool:
        parts.append(f"pool {cfg.pool}")
    if cfg.se or cfg.stem_se:
        parts.append(f"SE {cfg.se}" + (f", stem SE {cfg.stem_se}" if cfg.stem_se else "") +
                     ("" if cfg.se_bias else " without bias"))
    if cfg.dropout or cfg.block_dropout:
        parts.append(f"dropout {cfg.dropout:g}, in blocks {cfg.block_dropout:g}")
    name = {"basic": "resnet", "preact": "preact-resnet", "bottleneck": "bottleneck-resnet"}[cfg.block]
    return f"{name}{cfg.depth} ({'; '.join(parts)})"


def check_budget(cfg: Config) -> int:
    """The model's trainable parameters; OverBudget if cfg.max_params (> 0) is exceeded. Counted on
    the meta device: no memory, no initialization, milliseconds even for large models."""
    with torch.device("meta"):
        n = count_params(model_from_config(cfg))
    if cfg.max_params and n > cfg.max_params:
        raise OverBudget(f"{describe_model(cfg)} has {n:,} trainable parameters, {n - cfg.max_params:,} "
                         f"({n / cfg.max_params - 1:.1%}) over --max-params {cfg.max_params:,}")
    return n


def summarize(cfg: Config, depth: int = 2) -> dict:
    """torchinfo's summary of the model for one 32x32 image: the layer table (layer, output shape,
    parameters) and the totals. macs: multiply-accumulates per image; the sizes are torchinfo's:
    activations kept for the backward pass (forward/backward) and the parameters, in MB (10^6 B)
    of float32."""
    from torchinfo import summary

    with torch.random.fork_rng(devices=[]):  # the model's init leaves a training run's RNG as it was
        model = model_from_config(cfg)
        s = summary(model, input_size=(1, 3, IMAGE_SIZE, IMAGE_SIZE), depth=depth, verbose=0, device="cpu",
                    col_names=("output_size", "num_params"))
    # torchinfo's own footer misprints its unit ('Units.MEGABYTES' for millions of MACs): the
    # table is kept up to its totals, which are printed here instead
    table = str(s).split("\nTotal params")[0].rstrip("=\n") + "\n"
    return {"model": describe_model(cfg), "parameters": s.total_params, "trainable_parameters": s.trainable_params,
            "macs": s.total_mult_adds, "forward_backward_mb": s.total_output_bytes / 1e6,
            "params_mb": s.total_param_bytes / 1e6, "input_mb": s.total_input / 1e6, "table": table}


def summary_text(s: dict, max_params: int = 0) -> str:
    """The table and the totals, as `fastres summary` prints them."""
    rule = "=" * max(len(line) for line in s["table"].splitlines())
    lines = [s["model"], s["table"].rstrip(), rule,
             f"Total params: {s['parameters']:,}",
             f"Trainable params: {s['trainable_parameters']:,}",
             f"Non-trainable params: {s['parameters'] - s['trainable_parameters']:,}",
             f"Mult-adds per image: {s['macs'] / 1e6:,.2f} M",
             f"Input size (MB): {s['input_mb']:.2f}",
             f"Forward/backward pass size (MB): {s['forward_backward_mb']:.2f}",
             f"Params size (MB): {s['params_mb']:.2f}",
             f"Estimated total size (MB): {s['input_mb'] + s['forward_backward_mb'] + s['params_mb']:.2f}"]
    if max_params:
        lines.append(f"Budget: {s['trainable_parameters']:,} of {max_params:,} trainable parameters "
                     f"({s['trainable_parameters'] / max_params:.1%})")
    return "\n".join(lines + [rule])
