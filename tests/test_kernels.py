"""Fused Triton BN+ReLU / BN+add+ReLU against plain PyTorch (TRITON_INTERPRET=1 on CPU, see conftest)."""
import copy
import zlib

import pytest
import torch
import torch.nn.functional as F

from conftest import WHOLE_NET_GRAD_RTOL, assert_grads_close, grad_rel
from kernels import BatchNormAddReLU2d, BatchNormReLU2d, FusedNorm, bn_act_reference
from fastres.model import ResNet, resnet

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = [(3, 17, 5, 5), (1, 16, 8, 8), (4, 1, 3, 3), (2, 33, 4, 7), (5, 64, 2, 2)]


def make_input(shape, dtype, channels_last, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 1.7 + 0.6).to(DEV, dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x.contiguous()


def run(fn, x, r, bn, g):
    """Output, input/residual/weight/bias gradients and running stats after fn(x, r) on copies."""
    bn = copy.deepcopy(bn)
    x = x.detach().clone().requires_grad_()
    r = r.detach().clone().requires_grad_() if r is not None else None
    y = fn(x, r, bn)
    y.backward(g)
    return {"y": y, "dx": x.grad, "dr": r.grad if r is not None else None, "dw": bn.weight.grad,
            "db": bn.bias.grad, "rm": bn.running_mean, "rv": bn.running_var, "nbt": bn.num_batches_tracked}


def fused(x, r, bn):
    return bn(x) if r is None else bn(x, r)


def reference(x, r, bn):
    if bn.training:
        bn.num_batches_tracked += 1
    return bn_act_reference(x, r, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.training, bn.momentum,
                            bn.eps)


def torch_ops(x, r, bn):
    z = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.training, bn.momentum, bn.eps)
    if bn.training:
        bn.num_batches_tracked += 1
    return F.relu(z if r is None else z + r)


def make_bn(cls, C, seed):
    torch.manual_seed(seed)
    bn = cls(C).to(DEV)
    bn.weight.data.uniform_(0.5, 1.5), bn.bias.data.uniform_(-0.5, 0.5)
    bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
    return bn


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual", [False, True])
def test_fused_matches_reference_and_torch(shape, channels_last, dtype, training, residual):
    # A seed fixed per case (hash() of a str changes per process with PYTHONHASHSEED).
    seed = zlib.crc32(repr((shape, channels_last, str(dtype), training, residual)).encode()) % 1000
    x = make_input(shape, dtype, channels_last, seed)
    r = make_input(shape, dtype, channels_last, seed + 1) if residual else None
    bn = make_bn(BatchNormAddReLU2d if residual else BatchNormReLU2d, shape[1], seed)
    bn.train(training)
    g = make_input(shape, dtype, channels_last, seed + 2)
    got, ref, pt = run(fused, x, r, bn, g), run(reference, x, r, bn, g), run(torch_ops, x, r, bn, g)

    assert got["y"].dtype == dtype and got["y"].shape == x.shape
    assert got["y"].is_contiguous(memory_format=torch.channels_last) == channels_last or shape[1] == 1
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1.6e-2)
    # Against the fp32-statistics reference: same math, tight tolerances for all gradients.
    for k in ("y", "dx", "dr", "dw", "db"):
        if got[k] is not None:
            torch.testing.assert_close(got[k].float(), ref[k].float(), **tol, msg=k)
    # Against F.relu(F.batch_norm(...)). In bf16, PyTorch rounds BN's output before the add and
    # ReLU, which flips the ReLU mask of values within rounding of 0; so outputs are compared with
    # PyTorch's bf16 path and gradients with PyTorch's ops on the same inputs in fp32.
    torch.testing.assert_close(got["y"].float(), pt["y"].float(), **tol)
    if dtype == torch.bfloat16:  # PyTorch's ops on the fp32 upcast: the exact answer, to bf16 rounding
        pt = run(torch_ops, x.float(), r.float() if residual else None, bn, g.float())
    for k in ("dx", "dr", "dw", "db"):
        if got[k] is not None:
            torch.testing.assert_close(got[k].float(), pt[k], **(tol if dtype == torch.bfloat16 else
                                                                 dict(rtol=1e-4, atol=1e-4)), msg=k)
    # Running statistics (momentum, unbiased variance) exactly as nn.BatchNorm2d.
    for k in ("rm", "rv"):
        torch.testing.assert_close(got[k], pt[k], rtol=1e-5, atol=1e-6)
    assert got["nbt"].item() == pt["nbt"].item() == (1 if training else 0)


def test_momentum_none_is_cumulative_average():
    x = make_input((4, 6, 3, 3), torch.float32, False, 0)
    a, b = make_bn(BatchNormReLU2d, 6, 0), make_bn(torch.nn.BatchNorm2d, 6, 0)
    a.momentum = b.momentum = None
    for i in range(3):
        a(x * (i + 1)), b(x * (i + 1))
    torch.testing.assert_close(a.running_var, b.running_var)
    torch.testing.assert_close(a.running_mean, b.running_mean)


def test_launcher_rejects_bad_input():
    bn = BatchNormReLU2d(8).to(DEV)
    with pytest.raises(AssertionError, match="4-D"):
        bn(torch.randn(4, 8, device=DEV))
    with pytest.raises(AssertionError, match="float32 or bfloat16"):
        bn(torch.randn(2, 8, 4, 4, device=DEV, dtype=torch.float16))
    with pytest.raises(AssertionError, match="contiguous NCHW or channels_last"):
        bn(torch.randn(2, 8, 4, 8, device=DEV)[..., ::2])


def test_state_dict_keys_match_batchnorm():
    fused_model, plain = resnet(8, norm=FusedNorm), resnet(8)
    assert fused_model.state_dict().keys() == plain.state_dict().keys()
    fused_model.load_state_dict(plain.state_dict())  # checkpoints move both ways
    plain.load_state_dict(fused_model.state_dict())


@pytest.mark.parametrize("channels_last", [False, True])
def test_whole_resnet_forward_backward_and_sgd_step_match(channels_last, exact_convs):
    torch.manual_seed(0)
    plain = resnet(8).to(DEV)
    fused_model = resnet(8, norm=FusedNorm).to(DEV)
    fused_model.load_state_dict(plain.state_dict())
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    plain, fused_model = plain.to(memory_format=fmt), fused_model.to(memory_format=fmt)
    x = torch.randn(6, 3, 32, 32, device=DEV).to(memory_format=fmt)
    y = torch.randint(0, 10, (6,), device=DEV)
    outs = []
    for m in (plain, fused_model):
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        logits = m(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters()}
        opt.step()
        steps = {n: p.detach() - before[n] for n, p in m.named_parameters()}
        outs.append((logits, grads, steps, {k: v.clone() for k, v in m.named_buffers()}))
    (l0, g0, d0, b0), (l1, g1, d1, b1) = outs
    # outputs and running statistics are continuous in the inputs: element by element
    torch.testing.assert_close(l1, l0, rtol=1e-4, atol=1e-4)
    for k in b0:
        torch.testing.assert_close(b1[k], b0[k], rtol=1e-4, atol=1e-5, msg=k)
    # gradients and the SGD step they make pass through ReLU masks: by norm (see conftest)
    assert_grads_close(g1, g0, WHOLE_NET_GRAD_RTOL[8])
    assert_grads_close(d1, d0, WHOLE_NET_GRAD_RTOL[8])


def test_compiles_without_graph_breaks(exact_convs):
    """fullgraph=True fails on any graph break. Inductor also on CPU: it lowers the custom ops
    (with their in-place running-statistics updates) as it does on a GPU, around C++ code. Two
    stages of one block (BN+ReLU, BN+add+ReLU, a projection shortcut's BN): every kind of fused
    layer, for a third fewer kernels to compile than ResNet-8's."""
    torch.manual_seed(0)
    m = ResNet(blocks=(1, 1), widths=(16, 32), norm=FusedNorm).to(DEV)
    ref = copy.deepcopy(m)
    x = torch.randn(4, 3, 32, 32, device=DEV)
    compiled = torch.compile(m, backend="inductor", fullgraph=True)
    out = compiled(x)
    out.sum().backward()
    ref_out = ref(x)
    ref_out.sum().backward()
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    assert_grads_close({n: p.grad for n, p in m.named_parameters()},
                       {n: p.grad for n, p in ref.named_parameters()}, WHOLE_NET_GRAD_RTOL[8])
    got, want = m.state_dict(), ref.state_dict()
    for k in want:  # every BN's running statistics and batch count were updated inside the graph
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)


# A batch-64 training layer of the first stage: M = 64*32*32 = 65,536 rows of 16 channels, so the
# statistics come from 256 tiles of 256 rows and the finalize kernel loops 4 times over blocks of
# 64 partials (the per-op cases above fit one tile). An odd M (batch 63) leaves a partial last tile.
@pytest.mark.parametrize("shape", [(64, 16, 32, 32), (63, 32, 16, 16)])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_size_layer_with_many_partials(shape, channels_last, dtype):
    seed = zlib.crc32(repr((shape, channels_last, str(dtype))).encode()) % 1000
    x = make_input(shape, dtype, channels_last, seed)
    r = make_input(shape, dtype, channels_last, seed + 1)
    g = make_input(shape, dtype, channels_last, seed + 2)
    bn = make_bn(BatchNormAddReLU2d, shape[1], seed)
    got, ref = run(fused, x, r, bn, g), run(reference, x, r, bn, g)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1.6e-2)
    for k in ("y", "dx", "dr"):
        torch.testing.assert_close(got[k].float(), ref[k].float(), **tol, msg=k)
    # dw, db sum over 65,536 rows: relative tolerance for the order of summation
    for k in ("dw", "db"):
        torch.testing.assert_close(got[k].float(), ref[k].float(), rtol=1e-4 if dtype == torch.float32 else 2e-2,
                                   atol=1e-3, msg=k)
    pt = run(torch_ops, x.float(), r.float(), bn, g.float())
    for k in ("rm", "rv"):  # running statistics from many partials, against nn.BatchNorm2d's
        torch.testing.assert_close(got[k], pt[k], rtol=1e-5, atol=1e-5)


@pytest.mark.long
def test_whole_resnet_bf16_channels_last_training_step_matches(exact_convs):
    """The training path at a training-like size: ResNet-20, channels_last, batch 32 (stage-1
    layers combine 128 partials). In fp32 the fused network's gradients match PyTorch's as two
    fp32 implementations can (WHOLE_NET_GRAD_RTOL, see conftest); under bf16 autocast, where
    PyTorch's own bf16 gradients stray tens of percent from fp32 in the first layers, the fused
    ones may stray no more than PyTorch's (x1.5, +0.02)."""
    from fastres.runtime import cpu_has_bf16

    # where this CPU emulates bf16 (no bf16 units, ~10x slower), ResNet-8 at batch 16: the same
    # layers, a third of the blocks, half the partials per layer (the layer tests above combine 256)
    native = DEV.type == "cuda" or cpu_has_bf16()
    depth, batch = (20, 32) if native else (8, 16)
    torch.manual_seed(0)
    plain = resnet(depth).to(DEV, memory_format=torch.channels_last)
    fused_model = resnet(depth, norm=FusedNorm).to(DEV, memory_format=torch.channels_last)
    fused_model.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(DEV, memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), generator=g).to(DEV)

    def step(m, bf16):
        m.zero_grad()
        before = {k: v.clone() for k, v in m.state_dict().items()}
        with torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=bf16):
            logits = m(x)
        F.cross_entropy(logits.float(), y).backward()
        after = {k: v.clone() for k, v in m.state_dict().items()}
        m.load_state_dict(before)  # running statistics back, for the next pass
        return logits.float(), {n: p.grad.float().clone() for n, p in m.named_parameters()}, after

    l_ref, g_ref, s_ref = step(plain, False)
    l_f32, g_f32, s_f32 = step(fused_model, False)
    l_pb, g_pb, _ = step(plain, True)
    l_fb, g_fb, s_fb = step(fused_model, True)
    torch.testing.assert_close(l_f32, l_ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(l_fb, l_ref, rtol=5e-2, atol=5e-2)
    assert_grads_close(g_f32, g_ref, WHOLE_NET_GRAD_RTOL[depth])
    for n in g_ref:
        assert grad_rel(g_fb[n], g_ref[n]) <= 1.5 * grad_rel(g_pb[n], g_ref[n]) + 0.02, \
            (n, grad_rel(g_fb[n], g_ref[n]), grad_rel(g_pb[n], g_ref[n]))
    for k in s_ref:
        if s_ref[k].is_floating_point():
            torch.testing.assert_close(s_f32[k], s_ref[k], rtol=1e-4, atol=1e-5, msg=k)
            torch.testing.assert_close(s_fb[k], s_ref[k], rtol=2e-2, atol=2e-2, msg=k)
        else:
            assert torch.equal(s_fb[k], s_ref[k]), k
