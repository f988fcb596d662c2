"""CIFAR ResNets (He et al. 2016, Section 4.2) and the design space of "Optimizing ResNet
Architecture for CIFAR-10 Classification" (Chen and Ge, NYU), the paper fastres reproduces: N
stages of B_i basic blocks with C_i channels, F_i x F_i convolutions, K_i x K_i projection
shortcuts and a P x P average pool. Its ResNet-68 is ResNet((11, 11, 11), (16, 32, 64)).

The parts other studies of this kind publish, in the conventions of the common public CIFAR
code (so that their models are settings with the same parameter count): pre-activation blocks
(He et al. 2016, "Identity Mappings in Deep Residual Networks"), bottleneck blocks (1x1, FxF,
1x1; output 4x the stage's width), squeeze-and-excitation (Hu et al.) in every block and after
the stem, and dropout inside blocks and before the classifier.

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


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al.): x * sigmoid(fc2(relu(fc1(mean over the map of x)))), the
    two layers as 1x1 convolutions of channels -> channels // reduction -> channels (the squeezed
    width rounded down, as the common CIFAR code does), with bias unless bias=False."""

    def __init__(self, channels: int, reduction: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=bias)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=bias)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class BNExciteAddReLU(nn.Module):
    """relu(SE(BN(x)) + residual): a block's end with squeeze-and-excitation between its last BN and
    the addition (the place the common code puts it)."""

    def __init__(self, bn: nn.Module, se: SqueezeExcite):
        super().__init__()
        self.bn, self.se = bn, se

    def forward(self, x, residual):
        return F.relu(self.se(self.bn(x)) + residual)


def block_end(norm, channels: int, se: int, se_bias: bool) -> nn.Module:
    """The last BN of a basic or bottleneck block, + shortcut, ReLU; with SE when se > 0."""
    return BNExciteAddReLU(norm.bn(channels), SqueezeExcite(channels, se, se_bias)) if se else norm.bn_add_relu(channels)


def conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    """A bias-free convolution with "same" padding (kernel // 2): maps 32 -> 16 -> 8 with stride 2."""
    return nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)


def maybe_dropout(p: float) -> nn.Module:
    """nn.Dropout(p), or nothing at all when p is 0 (the model and its state_dict as without it)."""
    return nn.Dropout(p) if p else nn.Identity()


class BasicBlock(nn.Module):
    """convFxF-BN-ReLU-convFxF-BN, + shortcut, ReLU. Shortcut: KxK conv + BN where the shape changes
    (stride or channels), identity elsewhere. "Same" padding (F // 2, K // 2): for any odd size the
    maps are those of the 3x3 / 1x1 block, 32 -> 16 -> 8 with stride 2. se: SE's reduction before
    the addition (0: none); drop: dropout after the first activation."""
    expansion = 1  # output channels per unit of the stage's width

    def __init__(self, cin: int, cout: int, stride: int, norm=TorchNorm, kernel: int = 3, shortcut_kernel: int = 1,
                 se: int = 0, se_bias: bool = True, drop: float = 0.0):
        super().__init__()
        self.conv1 = conv(cin, cout, kernel, stride)
        self.bn1 = norm.bn_relu(cout)
        self.drop = maybe_dropout(drop)
        self.conv2 = conv(cout, cout, kernel)
        self.bn2 = block_end(norm, cout, se, se_bias)  # BN, (SE,) + shortcut, ReLU
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(conv(cin, cout, shortcut_kernel, stride), norm.bn(cout))

    def forward(self, x):
        return self.bn2(self.conv2(self.drop(self.bn1(self.conv1(x)))), self.shortcut(x))


class PreActBlock(nn.Module):
    """He et al. 2016 ("Identity Mappings"): BN-ReLU-convFxF-BN-ReLU-convFxF, + shortcut, no
    activation after the addition. Where the shape changes the shortcut is a KxK convolution
    (without BN) of the pre-activated input, else the input itself. SE after the second
    convolution, before the addition; dropout between the two convolutions (as Wide ResNets)."""
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int, norm=TorchNorm, kernel: int = 3, shortcut_kernel: int = 1,
                 se: int = 0, se_bias: bool = True, drop: float = 0.0):
        super().__init__()
        self.bn1 = norm.bn_relu(cin)
        self.conv1 = conv(cin, cout, kernel, stride)
        self.bn2 = norm.bn_relu(cout)
        self.drop = maybe_dropout(drop)
        self.conv2 = conv(cout, cout, kernel)
        self.se = SqueezeExcite(cout, se, se_bias) if se else nn.Identity()
        self.shortcut = conv(cin, cout, shortcut_kernel, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = self.bn1(x)
        shortcut = x if self.shortcut is None else self.shortcut(out)
        return self.se(self.conv2(self.drop(self.bn2(self.conv1(out))))) + shortcut


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU-convFxF(stride)-BN-ReLU-conv1x1-BN, + shortcut, ReLU, as the common CIFAR code
    has it: `width` is the inner width, the output 4x that; the shortcut a KxK conv + BN where the
    shape changes. SE before the addition; dropout after the first activation."""
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, norm=TorchNorm, kernel: int = 3, shortcut_kernel: int = 1,
                 se: int = 0, se_bias: bool = True, drop: float = 0.0):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = conv(cin, width, 1)
        self.bn1 = norm.bn_relu(width)
        self.drop = maybe_dropout(drop)
        self.conv2 = conv(width, width, kernel, stride)
        self.bn2 = norm.bn_relu(width)
        self.conv3 = conv(width, cout, 1)
        self.bn3 = block_end(norm, cout, se, se_bias)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(conv(cin, cout, shortcut_kernel, stride), norm.bn(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(self.drop(self.bn1(self.conv1(x)))))
        return self.bn3(self.conv3(out), self.shortcut(x))


BLOCKS = {"basic": BasicBlock, "preact": PreActBlock, "bottleneck": Bottleneck}


def per_stage(value, n: int) -> tuple[int, ...]:
    """One size for every stage (an int or a 1-tuple), or one per stage."""
    v = (value,) if isinstance(value, int) else tuple(value)
    if len(v) not in (1, n):
        raise ValueError(f"expected 1 or {n} values (one per stage), got {v}")
    return v * n if len(v) == 1 else v


class ResNet(nn.Module):
    """The CIFAR ResNet family in the layout of the common public CIFAR code: stem conv + BN + ReLU
    at full resolution; stage i = blocks[i] blocks of widths[i] channels (a bottleneck's output is
    4x that), the first stage at the input's resolution and each later one halving it in its first
    block; then an average pool (pool = 0: global, else a pool x pool window with the same stride),
    flatten, dropout (off by default), linear. With pre-activation blocks the stem is the
    convolution alone (its BN-ReLU is the first block's) and a BN-ReLU precedes the pool.
    stem_se: SE's reduction after the stem (0: none); se, se_bias, block_dropout: every block's.

    Stages are the attributes layer1 ... layerN (the paper's three: layer1, layer2, layer3), so
    state_dict keys do not depend on how many there are.
    """

    def __init__(self, blocks=(11, 11, 11), widths=(16, 32, 64), kernel=3, stem_kernel: int = 3,
                 shortcut_kernel=1, pool: int = 0, num_classes: int = 10, norm=TorchNorm, image_size: int = 32,
                 block: str = "basic", se: int = 0, stem_se: int = 0, se_bias: bool = True, dropout: float = 0.0,
                 block_dropout: float = 0.0):
        super().__init__()
        n = len(blocks)
        if len(widths) != n:
            raise ValueError(f"one width per stage: {n} stages, widths {tuple(widths)}")
        kernels, shortcuts = per_stage(kernel, n), per_stage(shortcut_kernel, n)
        kind, preact = BLOCKS[block], block == "preact"
        self.conv1 = conv(3, widths[0], stem_kernel)
        self.bn1 = nn.Identity() if preact else norm.bn_relu(widths[0])
        self.stem_se = SqueezeExcite(widths[0], stem_se, se_bias) if stem_se else nn.Identity()
        cin = widths[0]
        for i, (b, w) in enumerate(zip(blocks, widths)):
            stage = [kind(cin if j == 0 else w * kind.expansion, w, 2 if (i > 0 and j == 0) else 1, norm, kernels[i],
                          shortcuts[i], se, se_bias, block_dropout) for j in range(b)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            cin = w * kind.expansion
        self.final_bn = norm.bn_relu(cin) if preact else nn.Identity()
        self.num_stages, self.pool = n, pool
        side = image_size >> (n - 1)  # px, the last stage's map
        if pool and (pool > side or side % pool):
            raise ValueError(f"pool {pool} does not tile the last stage's {side}x{side} map")
        self.drop = maybe_dropout(dropout)
        self.fc = nn.Linear(cin * ((side // pool) ** 2 if pool else 1), num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and not m.weight.is_meta:  # a meta tensor (a parameter count) holds no values
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.stem_se(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = self.final_bn(x)
        x = F.adaptive_avg_pool2d(x, 1) if self.pool == 0 else F.avg_pool2d(x, self.pool)
        return self.fc(self.drop(torch.flatten(x, 1)))


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
