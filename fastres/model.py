"""CIFAR ResNets (He et al. 2016, Section 4.2) and the design space of "Optimizing ResNet
Architecture for CIFAR-10 Classification" (Chen and Ge, NYU), the paper fastres reproduces: N
stages of B_i basic blocks with C_i channels, F_i x F_i convolutions, K_i x K_i projection
shortcuts and a P x P average pool. Its ResNet-68 is ResNet((11, 11, 11), (16, 32, 64)).

Only the model lives here. `norm` picks the BatchNorm implementation: plain PyTorch modules,
SyncBatchNorm, or the fused Triton modules from `kernels` (same parameters, buffers and
state_dict keys, so checkpoints move freely between them).

Initialization (the paper states none): Kaiming-normal (fan_out, ReLU gain) for convolutions,
BN weight 1 and bias 0, and PyTorch's default uniform init for the final linear layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F


class _ThenReLU:
    """Mixin: relu(BN(x)) with whichever BatchNorm class follows it in the bases."""

    def forward(self, x):
        return F.relu(super().forward(x))


class _AddThenReLU:
    """Mixin: relu(BN(x) + residual)."""

    def forward(self, x, residual):
        return F.relu(super().forward(x) + residual)


class BNReLU(_ThenReLU, nn.BatchNorm2d): pass
class BNAddReLU(_AddThenReLU, nn.BatchNorm2d): pass
class SyncBNReLU(_ThenReLU, nn.SyncBatchNorm): pass
class SyncBNAddReLU(_AddThenReLU, nn.SyncBatchNorm): pass


@dataclass(frozen=True)
class Norm:
    """Which modules a ResNet normalizes with; each is built as cls(channels)."""
    bn: type           # BN alone (projection shortcuts)
    bn_relu: type      # relu(BN(x))
    bn_add_relu: type  # relu(BN(x) + residual), the end of a basic block


# Plain PyTorch ops (what torch.compile fuses by itself), and SyncBatchNorm across processes.
TorchNorm = Norm(nn.BatchNorm2d, BNReLU, BNAddReLU)
SyncNorm = Norm(nn.SyncBatchNorm, SyncBNReLU, SyncBNAddReLU)


class BasicBlock(nn.Module):
    """convFxF-BN-ReLU-convFxF-BN, + shortcut, ReLU. Shortcut: KxK conv + BN where the shape changes
    (stride or channels), identity elsewhere. "Same" padding (F // 2, K // 2): for any odd size the
    maps are those of the 3x3 / 1x1 block, 32 -> 16 -> 8 with stride 2."""

    def __init__(self, cin: int, cout: int, stride: int, norm=TorchNorm, kernel: int = 3, shortcut_kernel: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)
        self.bn1 = norm.bn_relu(cout)
        self.conv2 = nn.Conv2d(cout, cout, kernel, 1, kernel // 2, bias=False)
        self.bn2 = norm.bn_add_relu(cout)  # BN, + shortcut, ReLU in one module
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, shortcut_kernel, stride, shortcut_kernel // 2, bias=False), norm.bn(cout))

    def forward(self, x):
        return self.bn2(self.conv2(self.bn1(self.conv1(x))), self.shortcut(x))


def per_stage(value, n: int) -> tuple[int, ...]:
    """One size for every stage (an int or a 1-tuple), or one per stage."""
    v = (value,) if isinstance(value, int) else tuple(value)
    if len(v) not in (1, n):
        raise ValueError(f"expected 1 or {n} values (one per stage), got {v}")
    return v * n if len(v) == 1 else v


class ResNet(nn.Module):
    """The CIFAR ResNet family in the layout of the common public CIFAR code: stem conv + BN + ReLU
    at full resolution; stage i = blocks[i] basic blocks of widths[i] channels, the first stage at
    the input's resolution and each later one halving it in its first block; then an average pool
    (pool = 0: global, else a pool x pool window with the same stride), flatten, linear.

    Stages are the attributes layer1 ... layerN (the paper's three: layer1, layer2, layer3), so
    state_dict keys do not depend on how many there are.
    """

    def __init__(self, blocks=(11, 11, 11), widths=(16, 32, 64), kernel=3, stem_kernel: int = 3,
                 shortcut_kernel=1, pool: int = 0, num_classes: int = 10, norm=TorchNorm, image_size: int = 32):
        super().__init__()
        n = len(blocks)
        if len(widths) != n:
            raise ValueError(f"one width per stage: {n} stages, widths {tuple(widths)}")
        kernels, shortcuts = per_stage(kernel, n), per_stage(shortcut_kernel, n)
        self.conv1 = nn.Conv2d(3, widths[0], stem_kernel, 1, stem_kernel // 2, bias=False)
        self.bn1 = norm.bn_relu(widths[0])
        cin = widths[0]
        for i, (b, w) in enumerate(zip(blocks, widths)):
            stage = [BasicBlock(cin if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1, norm, kernels[i], shortcuts[i])
                     for j in range(b)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            cin = w
        self.num_stages, self.pool = n, pool
        side = image_size >> (n - 1)  # px, the last stage's map
        if pool and (pool > side or side % pool):
            raise ValueError(f"pool {pool} does not tile the last stage's {side}x{side} map")
        self.fc = nn.Linear(widths[-1] * ((side // pool) ** 2 if pool else 1), num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = F.adaptive_avg_pool2d(x, 1) if self.pool == 0 else F.avg_pool2d(x, self.pool)
        return self.fc(torch.flatten(x, 1))


def depth_to_n(depth: int) -> int:
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, ...), got {depth}")
    return (depth - 2) // 6


def resnet(depth: int, widths=(16, 32, 64), num_classes: int = 10, norm=TorchNorm) -> ResNet:
    """Three equal stages of (depth - 2) / 6 basic blocks, 3x3 convolutions, 1x1 projections."""
    return ResNet((depth_to_n(depth),) * 3, tuple(widths), num_classes=num_classes, norm=norm)


def resnet20(**kw): return resnet(20, **kw)
def resnet56(**kw): return resnet(56, **kw)
def resnet68(**kw): return resnet(68, **kw)  # Chen and Ge's model: 1,050,202 parameters
def resnet110(**kw): return resnet(110, **kw)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
