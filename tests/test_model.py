"""The ResNet family: parameter counts and the paper's block structure."""
import pytest
import torch
from torch import nn

from fastres.model import BasicBlock, count_params, resnet, resnet20, resnet56, resnet68, resnet110


def expected_params(n, widths=(16, 32, 64), classes=10):
    """Parameter count from the architecture's definition, independently of the code."""
    conv = lambda cin, cout, k: cin * cout * k * k
    total = conv(3, widths[0], 3) + 2 * widths[0]  # stem conv + BN
    cin = widths[0]
    for w in widths:
        for j in range(n):
            c_in = cin if j == 0 else w
            total += conv(c_in, w, 3) + conv(w, w, 3) + 4 * w  # two convs, two BNs
            if c_in != w:
                total += conv(c_in, w, 1) + 2 * w  # projection shortcut + BN
        cin = w
    return total + widths[-1] * classes + classes


def test_resnet68_has_the_papers_parameter_count():
    assert count_params(resnet68()) == 1_050_202 == expected_params(11)


@pytest.mark.parametrize("fn,n", [(resnet20, 3), (resnet56, 9), (resnet110, 18)])
def test_family_counts(fn, n):
    assert count_params(fn()) == expected_params(n)


def test_block_structure_and_shapes():
    m = resnet68()
    stages = [m.layer1, m.layer2, m.layer3]
    assert [len(s) for s in stages] == [11, 11, 11]
    for s, w in zip(stages, (16, 32, 64)):
        for j, b in enumerate(s):
            assert isinstance(b, BasicBlock)
            assert b.conv1.kernel_size == (3, 3) and b.conv2.kernel_size == (3, 3)
            assert b.conv1.out_channels == b.conv2.out_channels == w
            projection = s is not m.layer1 and j == 0
            assert b.conv1.stride == ((2, 2) if projection else (1, 1))
            if projection:
                conv, bn = b.shortcut
                assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and isinstance(bn, nn.BatchNorm2d)
            else:
                assert isinstance(b.shortcut, nn.Identity)
    assert m.conv1.out_channels == 16 and m.conv1.kernel_size == (3, 3)
    # Feature maps 32 / 16 / 8, then 10 logits.
    sizes = []
    for s in stages:
        s.register_forward_hook(lambda mod, i, o: sizes.append(tuple(o.shape[1:])))
    out = m(torch.randn(2, 3, 32, 32))
    assert sizes == [(16, 32, 32), (32, 16, 16), (64, 8, 8)] and out.shape == (2, 10)


def test_block_computes_the_paper_formula():
    """relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x)), written out with functional ops."""
    torch.manual_seed(0)
    b = BasicBlock(16, 32, 2).eval()
    for bn in (b.bn1, b.bn2, b.shortcut[1]):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    x = torch.randn(3, 16, 8, 8)
    F = torch.nn.functional
    bn = lambda m, t: F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
    h = F.relu(bn(b.bn1, F.conv2d(x, b.conv1.weight, stride=2, padding=1)))
    h = bn(b.bn2, F.conv2d(h, b.conv2.weight, padding=1))
    sc = bn(b.shortcut[1], F.conv2d(x, b.shortcut[0].weight, stride=2))
    torch.testing.assert_close(b(x), F.relu(h + sc))


def test_bad_depth():
    with pytest.raises(ValueError, match="6n\\+2"):
        resnet(21)
