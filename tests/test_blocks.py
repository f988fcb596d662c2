"""The blocks other studies publish, as settings (--block preact|bottleneck, --se, --stem-se,
--se-bias, --dropout, --block-dropout): parameter counts from a formula written here, counts of
published models, each block's forward against a functional reference built here from its own
weights, and bad values refused before any work. The paper's model is unchanged (test_design.py
checks it against a reference implementation)."""
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import run_here
from fastres.config import ConfigError, make_config
from fastres.design import check_budget, model_from_config
from fastres.model import BasicBlock, Bottleneck, PreActBlock, count_params


def conv_p(cin, cout, k):
    return cin * cout * k * k


def se_p(c, r, bias):
    """Two 1x1 layers c -> c // r -> c, with bias unless bias is False."""
    h = c // r
    return 2 * c * h + (h + c if bias else 0)


def formula(blocks, widths, block="basic", k=3, sk=1, se=0, stem_se=0, se_bias=True, classes=10):
    """Trainable parameters, counted weight by weight (2 per BN channel), global pool."""
    exp = 4 if block == "bottleneck" else 1
    total = conv_p(3, widths[0], 3) + (0 if block == "preact" else 2 * widths[0])
    total += se_p(widths[0], stem_se, se_bias) if stem_se else 0
    cin = widths[0]
    for i, (b, w) in enumerate(zip(blocks, widths)):
        out = w * exp
        for j in range(b):
            c = cin if j == 0 else out
            if block == "basic":
                p = conv_p(c, w, k) + conv_p(w, w, k) + 4 * w
            elif block == "preact":
                p = 2 * c + conv_p(c, w, k) + 2 * w + conv_p(w, w, k)
            else:
                p = conv_p(c, w, 1) + conv_p(w, w, k) + conv_p(w, out, 1) + 4 * w + 2 * out
            if (i > 0 and j == 0) or c != out:  # projection: conv (+ BN, but not in pre-activation)
                p += conv_p(c, out, sk) + (0 if block == "preact" else 2 * out)
            total += p + (se_p(out, se, se_bias) if se else 0)
        cin = out
    return total + (2 * cin if block == "preact" else 0) + cin * classes + classes


POINTS = {
    "preact_20": {"block": "preact", "depth": "20"},
    "preact_56_wide": {"block": "preact", "blocks": "2,3,2", "widths": "32,64,128"},
    "bottleneck_29": {"block": "bottleneck", "depth": "29"},
    "bottleneck_four_stages": {"block": "bottleneck", "blocks": "1,2,2,1", "widths": "16,32,64,128"},
    "se_basic": {"depth": "14", "se": "8"},
    "se_basic_no_bias_stem": {"depth": "14", "se": "4", "stem_se": "2", "se_bias": "false"},
    "se_preact": {"block": "preact", "depth": "14", "se": "16", "widths": "16,32,64"},
    "se_bottleneck_stem": {"block": "bottleneck", "depth": "20", "se": "16", "stem_se": "4"},
    "dropout": {"depth": "14", "dropout": "0.3", "block_dropout": "0.2"},
    "preact_kernels": {"block": "preact", "blocks": "1,1,1", "kernel": "5", "shortcut_kernel": "3"},
}


@pytest.mark.parametrize("point", list(POINTS))
def test_counts_shape_gradients(point):
    cfg = make_config("paper", POINTS[point])
    n = len(cfg.blocks)
    assert len(cfg.kernel) == 1 and len(cfg.shortcut_kernel) == 1 and cfg.stem_kernel == 3 and cfg.pool == 0
    want = formula(cfg.blocks, cfg.widths, cfg.block, cfg.kernel[0], cfg.shortcut_kernel[0], cfg.se, cfg.stem_se,
                   cfg.se_bias)
    model = model_from_config(cfg)
    assert count_params(model) == check_budget(cfg) == want, point
    assert cfg.depth == (3 if cfg.block == "bottleneck" else 2) * sum(cfg.blocks) + 2 and n >= 3
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_dropout_has_no_parameters_and_acts_only_in_training():
    plain, dropped = (model_from_config(make_config("paper", {"depth": "14", **d}))
                      for d in ({}, {"dropout": "0.5", "block_dropout": "0.3"}))
    assert count_params(plain) == count_params(dropped)
    dropped.load_state_dict(plain.state_dict())  # the same state_dict: dropout keeps none
    x = torch.randn(4, 3, 32, 32)
    plain.eval(), dropped.eval()
    torch.testing.assert_close(dropped(x), plain(x))
    dropped.train(), plain.train()
    assert not torch.allclose(dropped(x), plain(x))


def test_published_counts():
    """The common public CIFAR code's ResNet-50 (bottlenecks 3,4,6,3 at 64-512) has 23,520,842
    parameters; its pre-activation ResNet-18 11,171,146 without the final BN-ReLU that He et al.
    2016 put before the pool (2 x 512 parameters, which this family has)."""
    assert check_budget(make_config("paper", {"block": "bottleneck", "blocks": "3,4,6,3",
                                              "widths": "64,128,256,512"})) == 23_520_842
    assert check_budget(make_config("paper", {"block": "preact", "blocks": "2,2,2,2",
                                              "widths": "64,128,256,512"})) == 11_171_146 + 2 * 512


def bn_eval(x, bn):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def se_ref(x, fc1, fc2):
    s = x.mean((2, 3), keepdim=True)
    return x * torch.sigmoid(F.conv2d(F.relu(F.conv2d(s, fc1.weight, fc1.bias)), fc2.weight, fc2.bias))


def conv_ref(x, c):
    return F.conv2d(x, c.weight, None, c.stride, c.padding)


def randomize(block):
    """Non-trivial BN statistics and affine weights, so that a misplaced BN shows."""
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    return block.eval()


@pytest.mark.parametrize("se", [0, 4])
def test_basic_block_forward(se):
    b = randomize(BasicBlock(8, 16, 2, se=se))
    x = torch.randn(2, 8, 16, 16)
    h = F.relu(bn_eval(conv_ref(x, b.conv1), b.bn1))
    bn2 = b.bn2.bn if se else b.bn2
    h = bn_eval(conv_ref(h, b.conv2), bn2)
    if se:
        h = se_ref(h, b.bn2.se.fc1, b.bn2.se.fc2)
    shortcut = bn_eval(conv_ref(x, b.shortcut[0]), b.shortcut[1])
    torch.testing.assert_close(b(x), F.relu(h + shortcut))


@pytest.mark.parametrize("se,project", [(0, True), (4, True), (0, False)])
def test_preact_block_forward(se, project):
    """BN-ReLU-conv-BN-ReLU-conv (+ SE), + the shortcut from the pre-activated input (projecting)
    or the input itself; nothing after the addition."""
    b = randomize(PreActBlock(8, 16 if project else 8, 2 if project else 1, se=se))
    x = torch.randn(2, 8, 16, 16)
    pre = F.relu(bn_eval(x, b.bn1))
    h = conv_ref(F.relu(bn_eval(conv_ref(pre, b.conv1), b.bn2)), b.conv2)
    if se:
        h = se_ref(h, b.se.fc1, b.se.fc2)
    shortcut = conv_ref(pre, b.shortcut) if project else x
    torch.testing.assert_close(b(x), h + shortcut)


@pytest.mark.parametrize("se", [0, 8])
def test_bottleneck_forward(se):
    b = randomize(Bottleneck(16, 8, 2, se=se))
    x = torch.randn(2, 16, 16, 16)
    assert b.conv3.out_channels == 32 and b.conv2.stride == (2, 2) and b.conv1.kernel_size == (1, 1)
    h = F.relu(bn_eval(conv_ref(x, b.conv1), b.bn1))
    h = F.relu(bn_eval(conv_ref(h, b.conv2), b.bn2))
    bn3 = b.bn3.bn if se else b.bn3
    h = bn_eval(conv_ref(h, b.conv3), bn3)
    if se:
        h = se_ref(h, b.bn3.se.fc1, b.bn3.se.fc2)
    shortcut = bn_eval(conv_ref(x, b.shortcut[0]), b.shortcut[1])
    torch.testing.assert_close(b(x), F.relu(h + shortcut))


@pytest.mark.parametrize("settings,message", [
    ({"se": "-1"}, "--se: a reduction ratio >= 1"),
    ({"se": "17"}, "--se: reduction 17 would squeeze 16 channels"),
    ({"stem_se": "32", "block": "bottleneck"}, "--stem-se: reduction 32 would squeeze 16"),
    ({"dropout": "1"}, "--dropout: a probability in [0, 1)"),
    ({"block_dropout": "-0.1"}, "--block-dropout: a probability"),
    ({"block": "wide"}, "--block: must be one of basic, preact, bottleneck"),
    ({"block": "bottleneck", "depth": "68"}, "9n+2"),
])
def test_bad_values_are_refused(settings, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_config("paper", settings)


def test_se_wider_than_a_basic_width_is_fine_for_bottlenecks():
    """A bottleneck's SE squeezes its 4x output: R = 64 fits widths of 16 there, not in a basic block."""
    assert make_config("paper", {"block": "bottleneck", "se": "64"}).se == 64
    with pytest.raises(ConfigError):
        make_config("paper", {"se": "64"})


def test_summary_shows_the_parts_and_refuses_a_bad_one():
    r = run_here("fastres", "summary", "--block", "preact", "--depth", "20", "--se", "4", "--dropout", "0.2",
                 "--depth-of-table", "3")
    assert r.returncode == 0, r.stderr
    cfg = make_config("paper", {"block": "preact", "depth": "20", "se": "4", "dropout": "0.2"})
    assert f"Trainable params: {check_budget(cfg):,}" in r.stdout and "preact-resnet20" in r.stdout
    assert "SqueezeExcite" in r.stdout and "SE 4" in r.stdout
    r = run_here("fastres", "summary", "--se", "100")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--se" in r.stderr
