"""--optimizer sgd | adam | adamw: the run's optimizer is torch.optim's, and the whole step's own
update (fastres/step.py, uncaptured on a CPU) does what torch.optim.Adam / AdamW + LambdaLR + the
EMA do, step after step, through a state reload. test_resume.py resumes killed Adam/AdamW runs;
test_cuda.py checks the captured graph."""
import copy

import pytest
import torch

from fastres.step import adam_update
from test_whole_step import SETTINGS, batches, build as build_sgd_or_adam

# test_whole_step.py's tiny float64 setting, with Adam's knobs and weight decay in both groups' sense
ADAM = {"lr": 0.01, "nesterov": False, "weight_decay": 0.05, "betas": "0.8,0.99", "eps": 1e-6}


def build(optimizer: str, whole: bool, **over):
    return build_sgd_or_adam(whole, **{**ADAM, **over, "optimizer": optimizer})


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
    assert SETTINGS["no_decay_bn_bias"] and ref[1].defaults["betas"] == (0.8, 0.99)
    for x, y in batches(7):  # across the warm-up (2 steps), into the cosine and past the first epoch
        l_ref, _ = ref[-1](x, y)
        l_new, _ = new[-1](x, y)
        torch.testing.assert_close(l_new, l_ref, rtol=1e-9, atol=1e-12)
    a, b = state(*ref[:4]), state(*new[:4])
    assert a["moments"][0][0] == 7 and a["lr"][0] != ADAM["lr"]  # the optimizer and schedule did move
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


def _three_steps_saved(optimizer, seed):
    """A whole-step run after 3 of 6 batches: (its parts, the 6 batches, the state saved after
    3, the state reached after all 6)."""
    parts = build(optimizer, True)
    model, opt, sched, ema, step = parts
    data = batches(6, seed=seed)
    for x, y in data[:3]:
        step(x, y)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict(), ema.state_dict(), ema.updates))
    for x, y in data[3:]:
        step(x, y)
    return parts, data, saved, state(*parts[:4])


def _load(parts, saved):
    model, opt, sched, ema, _ = parts
    model.load_state_dict(saved[0]), opt.load_state_dict(saved[1]), sched.load_state_dict(saved[2])
    ema.load_state_dict(saved[3])
    ema.updates = saved[4]


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_whole_step_after_load_resumes_exactly(optimizer):
    parts, data, saved, want = _three_steps_saved(optimizer, seed=3)
    _load(parts, saved)
    parts[-1].after_load()
    for x, y in data[3:]:
        parts[-1](x, y)
    assert_same(state(*parts[:4]), want, rtol=0, atol=0)


def test_a_whole_step_checkpoint_resumes_in_torchs_adam():
    """The state the whole step leaves in the optimizer (moments and step count) is torch's own:
    loaded into a torch.optim.AdamW run, it continues exactly as the whole step does."""
    _, data, saved, want = _three_steps_saved("adamw", seed=7)
    plain = build("adamw", False)
    _load(plain, saved)
    for x, y in data[3:]:
        plain[-1](x, y)
    assert_same(state(*plain[:4]), want)
