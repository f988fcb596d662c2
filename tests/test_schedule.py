"""Learning-rate schedule, warm-up, scaling rule and weight-decay groups."""
import math

import pytest
import torch

from fastres.config import make_config
from fastres.model import resnet
from fastres.optim import lr_factor, param_groups, peak_lr


def lrs(cfg, steps_per_epoch):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=peak_lr(cfg))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, steps_per_epoch))
    out = []
    for _ in range(cfg.epochs * steps_per_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_paper_schedule_equals_cosine_annealing_per_epoch():
    cfg = make_config("paper", {"epochs": 7})
    got = lrs(cfg, steps_per_epoch=5)
    # Reference: torch's CosineAnnealingLR(T_max=epochs), stepped once per epoch.
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.01)
    ref_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7)
    ref = []
    for _ in range(7):
        ref += [opt.param_groups[0]["lr"]] * 5
        opt.step()
        ref_sched.step()
    assert got == pytest.approx(ref, rel=1e-12, abs=1e-15)
    assert got[0] == 0.01


def test_warmup_then_cosine_per_step():
    cfg = make_config("paper", {"epochs": 4, "warmup_epochs": 1, "schedule": "cosine_step", "lr": 0.4})
    got = lrs(cfg, steps_per_epoch=10)
    assert got[:10] == pytest.approx([0.4 * (i + 1) / 10 for i in range(10)])
    for s in range(10, 40):
        assert got[s] == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * (s - 10) / 30)))


def test_linear_scaling_rule():
    cfg = make_config("paper", {"batch_size": 512, "lr": 0.1, "lr_ref_batch": 128})
    assert peak_lr(cfg) == pytest.approx(0.4)
    assert peak_lr(make_config("paper")) == 0.01


def test_no_decay_on_bn_and_bias():
    m = resnet(8)
    groups = param_groups(m, make_config("paper", {"no_decay_bn_bias": True}))
    decay, no_decay = groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}
    bn_and_bias = {id(p) for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d) for p in mod.parameters()}
    bn_and_bias.add(id(m.fc.bias))
    assert ids(no_decay["params"]) == bn_and_bias
    assert ids(decay["params"]) == {id(p) for p in m.parameters()} - bn_and_bias
    assert len(param_groups(m, make_config("paper"))) == 1
