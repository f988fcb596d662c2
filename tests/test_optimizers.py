"""--optimizer sgd | adam | adamw: the run's optimizer is torch.optim's, and the whole step's own
update (fastres/step.py, uncaptured on a CPU) does what torch.optim.Adam / AdamW + LambdaLR + the
EMA do, step after step, through a state reload. test_resume.py resumes killed Adam/AdamW runs;
test_cuda.py checks the captured graph."""
import copy

import pytest
import torch

from fastres import runtime
from fastres.config import make_config
from fastres.design import build_model
from fastres.optim import EMA, lr_factor, make_criterion, make_optimizer, peak_lr
from fastres.step import TrainStep, adam_update, make_whole_step

STEPS_PER_EPOCH = 4
SETTINGS = {"device": "cpu", "amp": "off", "depth": 8, "widths": "8,16,32", "batch_size": 16, "epochs": 2,
            "lr": 0.01, "no_decay_bn_bias": True, "warmup_epochs": 0.5, "schedule": "cosine_step", "ema": 0.9,
            "label_smoothing": 0.1, "weight_decay": 0.05, "betas": "0.8,0.99", "eps": 1e-6}


def build(optimizer: str, whole: bool, **over):
    cfg = make_config("smoke", {**SETTINGS, **over, "optimizer": optimizer, "whole_step": whole})
    rt = runtime.resolve(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, rt).double()  # float64, as test_whole_step.py explains
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, STEPS_PER_EPOCH))
    ema = EMA(model, cfg.ema)
    if whole:
        step = make_whole_step(model, opt, sched, ema, make_criterion(cfg), rt, lr_factor(cfg, STEPS_PER_EPOCH),
                               peak_lr(cfg), cfg.epochs * STEPS_PER_EPOCH)
    else:
        step = TrainStep(model, opt, sched, ema, make_criterion(cfg), rt)
    return model, opt, sched, ema, step


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 32, 32, generator=g, dtype=torch.float64).to(memory_format=torch.channels_last),
             torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def state(model, opt, sched, ema):
    moments = [(float(opt.state[p]["step"]), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone())
               for g in opt.param_groups for p in g["params"]]
    return {"model": {k: v.clone() for k, v in model.state_dict().items()}, "moments": moments,
            "ema": {k: v.clone() for k, v in ema.state_dict().items()}, "lr": [g["lr"] for g in opt.param_groups],
            "last_epoch": sched.last_epoch}


def assert_same(a, b, rtol=1e-9, atol=1e-12):
    assert a["lr"] == b["lr"] and a["last_epoch"] == b["last_epoch"]
    for key in ("model", "ema"):
        for k in a[key]:
            torch.testing.assert_close(a[key][k], b[key][k], rtol=rtol, atol=atol, msg=f"{key} {k}")
    for (s1, m1, v1), (s2, m2, v2) in zip(a["moments"], b["moments"]):
        assert s1 == s2
        torch.testing.assert_close(m1, m2, rtol=rtol, atol=atol)
        torch.testing.assert_close(v1, v2, rtol=rtol, atol=atol)


@pytest.mark.parametrize("optimizer,cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_whole_step_matches_torch_adam(optimizer, cls):
    ref, new = build(optimizer, False), build(optimizer, True)
    assert type(ref[1]) is cls and type(new[1]) is cls
    assert ref[1].param_groups[1]["weight_decay"] == 0 and ref[1].param_groups[0]["weight_decay"] == 0.05
    for x, y in batches(7):  # across the warm-up (2 steps), into the cosine and past the first epoch
        l_ref, _ = ref[-1](x, y)
        l_new, _ = new[-1](x, y)
        torch.testing.assert_close(l_new, l_ref, rtol=1e-9, atol=1e-12)
    a, b = state(*ref[:4]), state(*new[:4])
    assert a["moments"][0][0] == 7 and a["lr"][0] != SETTINGS["lr"]  # the optimizer and schedule did move
    assert_same(b, a)


def test_adam_and_adamw_differ_where_they_should():
    """With weight decay the two optimizers take different steps; without it the same ones."""
    data = batches(3, seed=5)
    runs = {}
    for optimizer in ("adam", "adamw"):
        for wd in (0.0, 0.05):
            model, *_, step = build(optimizer, True, weight_decay=wd, ema=0.0)
            for x, y in data:
                step(x, y)
            runs[optimizer, wd] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(runs["adam", 0.0], runs["adamw", 0.0], rtol=0, atol=0)
    assert (runs["adam", 0.05] - runs["adamw", 0.05]).abs().max() > 1e-6


def test_adam_update_is_torchs_formula():
    """One update on hand-made tensors against the textbook formula (Kingma and Ba, Algorithm 1;
    AdamW: Loshchilov and Hutter), computed here in Python floats."""
    p, g = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([0.5, 0.25], dtype=torch.float64)
    m, v = torch.tensor([0.1, 0.0], dtype=torch.float64), torch.tensor([0.04, 0.01], dtype=torch.float64)
    lr, t, wd, b1, b2, eps = 0.1, 3, 0.01, 0.9, 0.999, 1e-8
    for decoupled in (False, True):
        want = []
        for pi, gi, mi, vi in zip(p.tolist(), g.tolist(), m.tolist(), v.tolist()):
            if decoupled:
                pi *= 1 - lr * wd
            else:
                gi += wd * pi
            mi = b1 * mi + (1 - b1) * gi
            vi = b2 * vi + (1 - b2) * gi * gi
            want.append(pi - lr * (mi / (1 - b1 ** t)) / ((vi / (1 - b2 ** t)) ** 0.5 + eps))
        params, exp_avg, exp_avg_sq = [p.clone()], [m.clone()], [v.clone()]
        adam_update(params, [g.clone()], exp_avg, exp_avg_sq, torch.tensor(lr, dtype=torch.float64),
                    torch.tensor(float(t), dtype=torch.float64), wd, b1, b2, eps, decoupled)
        torch.testing.assert_close(params[0], torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_whole_step_after_load_resumes_exactly(optimizer):
    model, opt, sched, ema, step = build(optimizer, True)
    data = batches(6, seed=3)
    for x, y in data[:3]:
        step(x, y)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict(), ema.state_dict(), ema.updates))
    for x, y in data[3:]:
        step(x, y)
    want = state(model, opt, sched, ema)
    model.load_state_dict(saved[0]), opt.load_state_dict(saved[1]), sched.load_state_dict(saved[2])
    ema.load_state_dict(saved[3])
    ema.updates = saved[4]
    step.after_load()
    for x, y in data[3:]:
        step(x, y)
    assert_same(state(model, opt, sched, ema), want, rtol=0, atol=0)


def test_a_whole_step_checkpoint_resumes_in_torchs_adam():
    """The state the whole step leaves in the optimizer (moments and step count) is torch's own:
    loaded into a torch.optim.AdamW run, it continues exactly as the whole step does."""
    data = batches(6, seed=7)
    model, opt, sched, ema, step = build("adamw", True)
    for x, y in data[:3]:
        step(x, y)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict(), ema.state_dict(), ema.updates))
    for x, y in data[3:]:
        step(x, y)
    want = state(model, opt, sched, ema)
    m2, o2, s2, e2, step2 = build("adamw", False)
    m2.load_state_dict(saved[0]), o2.load_state_dict(saved[1]), s2.load_state_dict(saved[2])
    e2.load_state_dict(saved[3])
    e2.updates = saved[4]
    for x, y in data[3:]:
        step2(x, y)
    assert_same(state(m2, o2, s2, e2), want)
