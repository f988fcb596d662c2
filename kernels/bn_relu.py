"""Fused training-mode BatchNorm2d + ReLU (and BatchNorm2d + residual add + ReLU) in Triton.

Forward, training mode (x viewed as an M x C matrix, M = N*H*W):
  1. _stats_kernel     per tile of BLOCK_M rows: per-channel mean and M2 (sum of squared
                       deviations) in fp32 -> partials [G, C]
  2. _finalize_kernel  Chan's parallel combination of the partials -> mean, 1/std; the affine
                       folded into scale/shift; running-statistics update (unbiased variance),
                       exactly as torch.nn.BatchNorm2d does it
  3. _apply_kernel     y = relu(x * scale + shift [+ residual])
Backward (z = xhat * w + b [+ residual], y = relu(z), dz = dy * (y > 0)):
  4. _bwd_reduce_kernel partials of sum(dz) and sum(dz * xhat) per channel -> db, dw
  5. _bwd_dx_kernel     dx = w/std * (dz - (db + xhat * dw) / M)   [eval mode: w/std * dz];
                        dresidual = dz
Memory: x in contiguous NCHW or channels_last (NHWC); fp32 or bf16 in and out, fp32 statistics.

The forward and backward are registered with torch.library.custom_op (with fake rules) and tied
together by a torch.autograd.Function, so each stays one node inside a torch.compile graph: no
graph breaks. Eager calls skip the ops' dispatch and call the launchers directly (less host time
per call). `bn_act_reference` is the same function in plain PyTorch, for tests.
`python -m kernels.aot` compiles every launch for a GPU on a machine without one.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

MAX_BLOCK_C = 64
TILE = 4096  # elements per program tile (BLOCK_M * BLOCK_C)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _tile(pid_m, pid_c, M, C, HW, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """Offsets and mask of a BLOCK_M x BLOCK_C tile of the (M, C) view, plus its channel ids."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    if CHANNELS_LAST:  # element (m, c) at m * C + c
        offs = rows[:, None] * C + cols[None, :]
    else:  # NCHW: (n, c, hw) at n * C * HW + c * HW + hw, with m = n * HW + hw
        offs = ((rows // HW) * C * HW + rows % HW)[:, None] + cols[None, :] * HW
    mask = (rows < M)[:, None] & (cols < C)[None, :]
    return offs, mask, cols


@triton.jit
def _stats_kernel(x_ptr, pmean_ptr, pm2_ptr, M, C, HW,
                  BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    pid_m, pid_c = tl.program_id(0), tl.program_id(1)
    offs, mask, cols = _tile(pid_m, pid_c, M, C, HW, BLOCK_M, BLOCK_C, CHANNELS_LAST)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    n = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
    mean = tl.sum(x, axis=0) / n
    d = tl.where(mask, x - mean[None, :], 0.0)
    cmask = cols < C
    tl.store(pmean_ptr + pid_m * C + cols, mean, mask=cmask)
    tl.store(pm2_ptr + pid_m * C + cols, tl.sum(d * d, axis=0), mask=cmask)


@triton.jit
def _finalize_kernel(pmean_ptr, pm2_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, mean_ptr, invstd_ptr, scale_ptr, shift_ptr,
                     M, C, G, eps, momentum, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr,
                     BLOCK_C: tl.constexpr, UPDATE_RUNNING: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    total = M.to(tl.float32)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    # The loops over the G partials are `while` loops: Triton 3.6's interpreter cannot take a
    # runtime int as a `range` bound under NumPy >= 2.4 (this tiny kernel gains nothing from a
    # pipelined `for`).
    g0 = 0
    while g0 < G:  # pass 1: mean = sum_g n_g * mean_g / M
        gs = g0 + tl.arange(0, BLOCK_G)
        n_g = tl.where(gs < G, tl.minimum(M - gs * BLOCK_M, BLOCK_M), 0).to(tl.float32)
        m = (gs < G)[:, None] & cmask[None, :]
        pm = tl.load(pmean_ptr + gs[:, None] * C + cols[None, :], mask=m, other=0.0)
        acc += tl.sum(pm * n_g[:, None], axis=0)
        g0 += BLOCK_G
    mean = acc / total
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    g0 = 0
    while g0 < G:  # pass 2: M2 = sum_g M2_g + n_g * (mean_g - mean)^2
        gs = g0 + tl.arange(0, BLOCK_G)
        n_g = tl.where(gs < G, tl.minimum(M - gs * BLOCK_M, BLOCK_M), 0).to(tl.float32)
        m = (gs < G)[:, None] & cmask[None, :]
        pm = tl.load(pmean_ptr + gs[:, None] * C + cols[None, :], mask=m, other=0.0)
        pv = tl.load(pm2_ptr + gs[:, None] * C + cols[None, :], mask=m, other=0.0)
        d = pm - mean[None, :]
        m2 += tl.sum(pv + n_g[:, None] * d * d, axis=0)
        g0 += BLOCK_G
    invstd = 1.0 / tl.sqrt(m2 / total + eps)
    w = tl.load(w_ptr + cols, mask=cmask, other=1.0)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0)
    tl.store(mean_ptr + cols, mean, mask=cmask)
    tl.store(invstd_ptr + cols, invstd, mask=cmask)
    tl.store(scale_ptr + cols, w * invstd, mask=cmask)
    tl.store(shift_ptr + cols, b - mean * w * invstd, mask=cmask)
    if UPDATE_RUNNING:
        rm = tl.load(rm_ptr + cols, mask=cmask, other=0.0)
        rv = tl.load(rv_ptr + cols, mask=cmask, other=0.0)
        unbiased = m2 / tl.maximum(total - 1.0, 1.0)
        tl.store(rm_ptr + cols, (1.0 - momentum) * rm + momentum * mean, mask=cmask)
        tl.store(rv_ptr + cols, (1.0 - momentum) * rv + momentum * unbiased, mask=cmask)


@triton.jit
def _apply_kernel(x_ptr, r_ptr, y_ptr, scale_ptr, shift_ptr, M, C, HW, BLOCK_M: tl.constexpr,
                  BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr, HAS_RES: tl.constexpr):
    offs, mask, cols = _tile(tl.program_id(0), tl.program_id(1), M, C, HW, BLOCK_M, BLOCK_C, CHANNELS_LAST)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + cols, mask=cols < C, other=0.0)
    shift = tl.load(shift_ptr + cols, mask=cols < C, other=0.0)
    z = x * scale[None, :] + shift[None, :]
    if HAS_RES:
        z += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, tl.maximum(z, 0.0).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_reduce_kernel(dy_ptr, y_ptr, x_ptr, mean_ptr, invstd_ptr, pdz_ptr, pdzx_ptr, M, C, HW,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    pid_m, pid_c = tl.program_id(0), tl.program_id(1)
    offs, mask, cols = _tile(pid_m, pid_c, M, C, HW, BLOCK_M, BLOCK_C, CHANNELS_LAST)
    cmask = cols < C
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0)
    dz = tl.where(y > 0, dy, 0.0)
    xhat = tl.where(mask, (x - mean[None, :]) * invstd[None, :], 0.0)
    tl.store(pdz_ptr + pid_m * C + cols, tl.sum(dz, axis=0), mask=cmask)
    tl.store(pdzx_ptr + pid_m * C + cols, tl.sum(dz * xhat, axis=0), mask=cmask)


@triton.jit
def _bwd_dx_kernel(dy_ptr, y_ptr, x_ptr, mean_ptr, invstd_ptr, w_ptr, db_ptr, dw_ptr, dx_ptr, dres_ptr, M, C, HW,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                   TRAINING: tl.constexpr, HAS_RES: tl.constexpr):
    offs, mask, cols = _tile(tl.program_id(0), tl.program_id(1), M, C, HW, BLOCK_M, BLOCK_C, CHANNELS_LAST)
    cmask = cols < C
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dz = tl.where(y > 0, dy, 0.0)
    if HAS_RES:
        tl.store(dres_ptr + offs, dz.to(dres_ptr.dtype.element_ty), mask=mask)
    invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0)
    scale = tl.load(w_ptr + cols, mask=cmask, other=0.0) * invstd
    if TRAINING:  # the batch statistics depend on x too
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
        db = tl.load(db_ptr + cols, mask=cmask, other=0.0)
        dw = tl.load(dw_ptr + cols, mask=cmask, other=0.0)
        xhat = (x - mean[None, :]) * invstd[None, :]
        dx = scale[None, :] * (dz - (db[None, :] + xhat * dw[None, :]) / M.to(tl.float32))
    else:
        dx = scale[None, :] * dz
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _layout(x: Tensor) -> bool:
    """True for channels_last (NHWC memory), False for contiguous NCHW; anything else is refused."""
    assert x.dim() == 4, f"expected a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}"
    assert x.dtype in (torch.float32, torch.bfloat16), f"expected float32 or bfloat16, got {x.dtype}"
    assert x.numel() < 2 ** 31, "tensor too large for 32-bit offsets"
    if x.is_contiguous():  # also true for C == 1 or H == W == 1 in either layout
        return False
    assert x.is_contiguous(memory_format=torch.channels_last), "expected contiguous NCHW or channels_last memory"
    return True


# Host-side arithmetic in plain Python: triton.cdiv is a @jit function in recent Triton, and
# calling one from Python costs microseconds (bench group 'kernel_host').
def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _blocks(C: int) -> tuple[int, int]:
    block_c = min(1 << (C - 1).bit_length(), MAX_BLOCK_C)  # next power of two, at most MAX_BLOCK_C
    return max(16, TILE // block_c), block_c


def _like(t: Tensor, channels_last: bool) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _fwd(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Tensor, running_mean: Tensor,
         running_var: Tensor, training: bool, momentum: float, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    cl = _layout(x)
    N, C, H, W = x.shape
    M, HW = N * H * W, H * W
    assert weight.shape == bias.shape == running_mean.shape == running_var.shape == (C,)
    assert weight.dtype == torch.float32 and running_mean.dtype == torch.float32, "BN parameters must be float32"
    if residual is not None:
        assert residual.shape == x.shape, f"residual shape {tuple(residual.shape)} != {tuple(x.shape)}"
        residual = _like(residual.to(x.dtype), cl)
    block_m, block_c = _blocks(C)
    grid = (_cdiv(M, block_m), _cdiv(C, block_c))
    f32 = dict(device=x.device, dtype=torch.float32)
    if training:
        assert M > 1, "training-mode BatchNorm needs more than one value per channel"
        G = grid[0]
        pmean, pm2 = torch.empty(G, C, **f32), torch.empty(G, C, **f32)
        _stats_kernel[grid](x, pmean, pm2, M, C, HW, BLOCK_M=block_m, BLOCK_C=block_c, CHANNELS_LAST=cl)
        mean, invstd, scale, shift = (torch.empty(C, **f32) for _ in range(4))
        _finalize_kernel[(_cdiv(C, block_c),)](
            pmean, pm2, weight, bias, running_mean, running_var, mean, invstd, scale, shift, M, C, G, eps, momentum,
            BLOCK_M=block_m, BLOCK_G=64, BLOCK_C=block_c, UPDATE_RUNNING=momentum >= 0)
    else:
        mean = running_mean.clone()
        invstd = torch.rsqrt(running_var + eps)
        scale = weight * invstd
        shift = bias - mean * scale
    y = torch.empty_like(x)
    _apply_kernel[grid](x, residual if residual is not None else x, y, scale, shift, M, C, HW,
                        BLOCK_M=block_m, BLOCK_C=block_c, CHANNELS_LAST=cl, HAS_RES=residual is not None)
    return y, mean, invstd


def _bwd(dy: Tensor, y: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, training: bool,
         has_residual: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    cl = _layout(x)
    dy = _like(dy, cl)
    N, C, H, W = x.shape
    M, HW = N * H * W, H * W
    block_m, block_c = _blocks(C)
    grid = (_cdiv(M, block_m), _cdiv(C, block_c))
    pdz = torch.empty(grid[0], C, device=x.device, dtype=torch.float32)
    pdzx = torch.empty_like(pdz)
    _bwd_reduce_kernel[grid](dy, y, x, mean, invstd, pdz, pdzx, M, C, HW, BLOCK_M=block_m, BLOCK_C=block_c,
                             CHANNELS_LAST=cl)
    db, dw = pdz.sum(0), pdzx.sum(0)  # [G, C] -> [C], deterministic order
    dx = torch.empty_like(x)
    dres = torch.empty_like(x) if has_residual else x.new_empty(0)
    _bwd_dx_kernel[grid](dy, y, x, mean, invstd, weight, db, dw, dx, dres if has_residual else dx, M, C, HW,
                         BLOCK_M=block_m, BLOCK_C=block_c, CHANNELS_LAST=cl, TRAINING=training,
                         HAS_RES=has_residual)
    return dx, dw, db, dres


# ----------------------------------------------------------------------------------------------
# Registered ops (opaque to torch.compile, with fake rules) and their autograd.Function
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastres::bn_act_fwd", mutates_args=("running_mean", "running_var"))
def bn_act_fwd(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Tensor, running_mean: Tensor,
               running_var: Tensor, training: bool, momentum: float, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """relu(batch_norm(x) [+ residual]) -> (y, mean, invstd). momentum < 0: no running-stat update."""
    return _fwd(x, residual, weight, bias, running_mean, running_var, training, momentum, eps)


@bn_act_fwd.register_fake
def _(x, residual, weight, bias, running_mean, running_var, training, momentum, eps):
    C = x.shape[1]
    return torch.empty_like(x), x.new_empty(C, dtype=torch.float32), x.new_empty(C, dtype=torch.float32)


@torch.library.custom_op("fastres::bn_act_bwd", mutates_args=())
def bn_act_bwd(dy: Tensor, y: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, training: bool,
               has_residual: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (dx, dweight, dbias, dresidual); dresidual is empty without a residual."""
    return _bwd(dy, y, x, weight, mean, invstd, training, has_residual)


@bn_act_bwd.register_fake
def _(dy, y, x, weight, mean, invstd, training, has_residual):
    C = x.shape[1]
    return (torch.empty_like(x), x.new_empty(C, dtype=torch.float32), x.new_empty(C, dtype=torch.float32),
            torch.empty_like(x) if has_residual else x.new_empty(0))


class _BNAct(torch.autograd.Function):
    """Autograd for the fused op; the forward op also updates the running statistics in place.

    Under torch.compile the registered ops keep each launcher one opaque node. Eager calls go to
    the launchers directly: the op's dispatch costs more host time than the launcher itself
    (bench group 'kernel_host'), and a ResNet-68 training step makes 67 forward + backward pairs."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, running_mean, running_var, training, momentum, eps):
        fwd = bn_act_fwd if torch.compiler.is_compiling() else _fwd
        y, mean, invstd = fwd(x, residual, weight, bias, running_mean, running_var, training, momentum, eps)
        ctx.save_for_backward(x, weight, y, mean, invstd)
        ctx.training, ctx.has_residual = training, residual is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, y, mean, invstd = ctx.saved_tensors
        bwd = bn_act_bwd if torch.compiler.is_compiling() else _bwd
        dx, dw, db, dres = bwd(dy, y, x, weight, mean, invstd, ctx.training, ctx.has_residual)
        return dx, (dres if ctx.has_residual else None), dw, db, None, None, None, None, None


def bn_act(x: Tensor, bn: nn.BatchNorm2d, residual: Optional[Tensor] = None) -> Tensor:
    """relu(bn(x) [+ residual]) with the fused kernels, honouring bn's mode, momentum and buffers."""
    assert bn.affine and bn.track_running_stats, "fused BN needs affine=True and track_running_stats=True"
    momentum = -1.0
    if bn.training:
        bn.num_batches_tracked.add_(1)
        momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    return _BNAct.apply(x, residual, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.training,
                        momentum, bn.eps)


def bn_act_reference(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Tensor, running_mean: Tensor,
                     running_var: Tensor, training: bool, momentum: float, eps: float) -> Tensor:
    """The same function in plain PyTorch (fp32 statistics), for tests. Updates running stats in place."""
    xf = x.float()
    if training:
        mean = xf.mean(dim=(0, 2, 3))
        var = xf.var(dim=(0, 2, 3), unbiased=False)
        n = x.numel() // x.shape[1]
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(momentum * mean)
            running_var.mul_(1 - momentum).add_(momentum * var * n / max(n - 1, 1))
    else:
        mean, var = running_mean, running_var
    shape = (1, -1, 1, 1)
    z = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps) * weight.view(shape) + bias.view(shape)
    if residual is not None:
        z = z + residual.float()
    return torch.relu(z).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Drop-in modules: same parameters, buffers and state_dict keys as nn.BatchNorm2d
# ----------------------------------------------------------------------------------------------
class BatchNormReLU2d(nn.BatchNorm2d):
    """relu(BatchNorm2d(x)) in fused Triton kernels."""

    def forward(self, x):
        return bn_act(x, self)


class BatchNormAddReLU2d(nn.BatchNorm2d):
    """relu(BatchNorm2d(x) + residual) in fused Triton kernels."""

    def forward(self, x, residual):
        return bn_act(x, self, residual)


# The `norm` that fastres.model builds a ResNet with (duck-typed like fastres.model.Norm);
# projection shortcuts keep PyTorch's BN, which has no ReLU to fuse.
FusedNorm = SimpleNamespace(bn=nn.BatchNorm2d, bn_relu=BatchNormReLU2d, bn_add_relu=BatchNormAddReLU2d)
