"""What turns gradients into a trained model: the optimizer (SGD, Adam, AdamW), its parameter
groups, the per-step lr schedule, the loss and the weight EMA.

    opt = make_optimizer(model, cfg); sched = LambdaLR(opt, lr_factor(cfg, steps_per_epoch))

fastres.step implements the same updates as device-side functions for --whole-step and is tested
against these torch.optim optimizers.
"""
from __future__ import annotations

import copy
import math

import torch

from .config import Config


def peak_lr(cfg: Config) -> float:
    """Peak lr: cfg.lr, scaled linearly by batch_size / lr_ref_batch when lr_ref_batch > 0."""
    return cfg.lr * (cfg.batch_size / cfg.lr_ref_batch if cfg.lr_ref_batch else 1.0)


def lr_factor(cfg: Config, steps_per_epoch: int):
    """Multiplier of the peak lr at optimizer step s (0-based), for LambdaLR stepped every step.

    Linear warm-up over warmup_epochs, then cosine to 0. 'cosine_epoch' holds the lr constant
    within an epoch, exactly like CosineAnnealingLR(T_max=epochs) stepped once per epoch.
    """
    warm = round(cfg.warmup_epochs * steps_per_epoch)
    total = cfg.epochs * steps_per_epoch

    def f(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        if cfg.schedule == "cosine_epoch":
            return 0.5 * (1 + math.cos(math.pi * (s // steps_per_epoch) / cfg.epochs))
        return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))

    return f


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """With no_decay_bn_bias, 1-D parameters (BN weight/bias, linear bias) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not cfg.no_decay_bn_bias:
        return [{"params": params, "weight_decay": cfg.weight_decay}]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """torch.optim's SGD (momentum, Nesterov, dampening 0), Adam or AdamW over param_groups(),
    at the peak lr (LambdaLR scales it per step). Adam's weight decay is L2 in the gradient,
    AdamW's is decoupled (p *= 1 - lr * wd); both use cfg.weight_decay and its groups."""
    groups = param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=peak_lr(cfg), momentum=cfg.momentum, nesterov=cfg.nesterov)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=peak_lr(cfg), betas=tuple(cfg.betas), eps=cfg.eps)


def make_criterion(cfg: Config) -> torch.nn.Module:
    """Cross-entropy; label_smoothing moves that much probability mass to a uniform target."""
    return torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


class EMA:
    """Exponential moving average of the weights (buffers copied), used for evaluation.

    The decay warms up with the number of updates n: min(decay, (1 + n) / (10 + n)), as the common
    implementations do (TensorFlow's num_updates, timm), so that a short run's EMA is an average
    of its recent weights rather than of the initial ones (decay 0.999 alone keeps 85% of the
    initial weights after 156 steps). `updates` goes into the checkpoint. decay 0 makes it a
    no-op whose `.model` is the trained model itself.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.source, self.updates = decay, model, 0
        self.model = model
        if decay > 0:
            self.model = copy.deepcopy(model).eval().requires_grad_(False)
            self._ema_p = list(self.model.parameters())
            self._src_p = list(model.parameters())
            self._ema_b, self._src_b = list(self.model.buffers()), list(model.buffers())

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self):
        if self.decay > 0:
            torch._foreach_lerp_(self._ema_p, self._src_p, 1 - self.current_decay())
            self.updates += 1
            for e, s in zip(self._ema_b, self._src_b):
                e.copy_(s)

    def state_dict(self):
        return self.model.state_dict() if self.decay > 0 else None

    def load_state_dict(self, sd):
        if self.decay > 0:
            self.model.load_state_dict(sd)
