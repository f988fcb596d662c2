"""CIFAR ResNets of depth 6n+2 (He et al. 2016, Section 4.2), as in "Optimizing ResNet
Architecture for CIFAR-10 Classification" (Chen and Ge, NYU), the paper fastres reproduces.

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
    """conv3x3-BN-ReLU-conv3x3-BN, + shortcut, ReLU. Shortcut: 1x1 conv + BN where shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, norm=TorchNorm):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm.bn_relu(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm.bn_add_relu(cout)  # BN, + shortcut, ReLU in one module
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm.bn(cout))

    def forward(self, x):
        return self.bn2(self.conv2(self.bn1(self.conv1(x))), self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, n: int, widths=(16, 32, 64), num_classes: int = 10, norm=TorchNorm):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = norm.bn_relu(widths[0])
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks = [BasicBlock(cin if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1, norm) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def depth_to_n(depth: int) -> int:
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, ...), got {depth}")
    return (depth - 2) // 6


def resnet(depth: int, widths=(16, 32, 64), num_classes: int = 10, norm=TorchNorm) -> ResNet:
    return ResNet(depth_to_n(depth), tuple(widths), num_classes, norm)


def resnet20(**kw): return resnet(20, **kw)
def resnet56(**kw): return resnet(56, **kw)
def resnet68(**kw): return resnet(68, **kw)  # Chen and Ge's model: 1,050,202 parameters
def resnet110(**kw): return resnet(110, **kw)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
