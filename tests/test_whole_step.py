"""--whole-step (fastres/step.py): the step that is captured as one CUDA graph does exactly what
torch.optim.SGD + LambdaLR + fastres's EMA do, step after step, and survives a state reload.
On a CPU it runs uncaptured, so this checks the arithmetic; test_cuda.py checks the capture."""
import json

import pytest
import torch

from fastres import runtime
from fastres.config import make_config
from fastres.design import build_model
from fastres.optim import EMA, lr_factor, make_criterion, make_optimizer, peak_lr
from fastres.step import TrainStep, make_whole_step

SETTINGS = {"device": "cpu", "amp": "off", "depth": 8, "widths": "8,16,32", "batch_size": 16, "epochs": 2,
            "lr": 0.2, "nesterov": True, "no_decay_bn_bias": True, "warmup_epochs": 0.5, "schedule": "cosine_step",
            "ema": 0.9, "label_smoothing": 0.1}
STEPS_PER_EPOCH = 4


def build(whole: bool, **over):
    cfg = make_config("smoke", {**SETTINGS, **over, "whole_step": whole})
    rt = runtime.resolve(cfg)
    torch.manual_seed(0)
    # float64: the two steps round differently, and this small net amplifies float32 rounding
    # (a 1e-7 nudge of its weights grows to 1e-5 within 7 steps), so compare where rounding is
    # 1e-16 and tolerances can be tight
    model = build_model(cfg, rt).double()
    opt = make_optimizer(model, cfg)  # torch.optim's SGD, Adam or AdamW, as training builds it
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
    bufs = [opt.state[p]["momentum_buffer"].clone() for g in opt.param_groups for p in g["params"]]
    return {"model": {k: v.clone() for k, v in model.state_dict().items()}, "bufs": bufs,
            "ema": {k: v.clone() for k, v in ema.state_dict().items()}, "ema_updates": ema.updates,
            "lr": [g["lr"] for g in opt.param_groups], "last_epoch": sched.last_epoch}


def assert_same(a, b, rtol=1e-9, atol=1e-12):
    """Equal to float64 rounding (measured: 1e-16 for weights and momentum, 1e-15 for the EMA)."""
    assert a["ema_updates"] == b["ema_updates"] and a["last_epoch"] == b["last_epoch"] and a["lr"] == b["lr"]
    for key in ("model", "ema"):
        for k in a[key]:
            torch.testing.assert_close(a[key][k], b[key][k], rtol=rtol, atol=atol, msg=f"{key} {k}")
    for x, y in zip(a["bufs"], b["bufs"]):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def test_whole_step_matches_torch_sgd_schedule_and_ema():
    data = batches(7)  # across the warm-up (2 steps), into the cosine and past the first epoch
    ref, new = build(False), build(True)
    for x, y in data:
        l_ref, _ = ref[-1](x, y)
        l_new, _ = new[-1](x, y)
        torch.testing.assert_close(l_new, l_ref, rtol=1e-9, atol=1e-12)
    # the epoch's sums that each step keeps on the device
    torch.testing.assert_close(new[-1].loss_sum, ref[-1].loss_sum, rtol=1e-9, atol=1e-12)
    assert ref[-1].correct.item() == new[-1].correct.item() and ref[-1].loss_sum.item() > 0
    a, b = state(*ref[:4]), state(*new[:4])
    assert a["ema_updates"] == 7 and a["lr"][0] != SETTINGS["lr"]  # the schedule and EMA did move
    assert_same(b, a)


@pytest.mark.parametrize("momentum,nesterov,no_decay", [(0.9, False, False), (0.0, False, True)])
def test_whole_step_matches_other_sgd_settings(momentum, nesterov, no_decay):
    over = {"momentum": momentum, "nesterov": nesterov, "no_decay_bn_bias": no_decay, "ema": 0.0,
            "schedule": "cosine_epoch", "warmup_epochs": 0}
    ref, new = build(False, **over), build(True, **over)
    for x, y in batches(5, seed=2):
        ref[-1](x, y), new[-1](x, y)
    for (k, v), w in zip(ref[0].state_dict().items(), new[0].state_dict().values()):
        torch.testing.assert_close(w, v, rtol=1e-9, atol=1e-12, msg=k)


def test_after_load_resumes_exactly():
    """Restore a saved state (optimizer state replaced by the load) and step again: the same
    result as stepping on from that state, as training's warm-up and --resume require."""
    model, opt, sched, ema, step = build(True)
    data = batches(6, seed=3)
    for x, y in data[:3]:
        step(x, y)
    import copy
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


def test_training_run_with_whole_step_equals_the_usual_step(small_data, tmp_path):
    from fastres.train import train

    recs = {}
    for whole in (False, True):
        cfg = make_config("smoke", {"data": str(small_data), "depth": 8, "widths": "8,16,32", "epochs": 2,
                                    "train_limit": 640, "test_limit": 200, "batch_size": 64, "ema": 0.9,
                                    "amp": "off", "compile_augment": False, "whole_step": whole,
                                    "out": str(tmp_path / str(whole))})
        recs[whole] = train(cfg, log=lambda *a, **k: None)
    assert recs[True]["switches"]["whole_step"].startswith("uncaptured")
    for a, b in zip(recs[False]["epochs"], recs[True]["epochs"]):
        for k in ("train_loss", "test_loss", "lr"):
            assert b[k] == pytest.approx(a[k], rel=1e-3), (k, a[k], b[k])  # float32 rounding, 20 steps
        assert abs(a["test_acc"] - b["test_acc"]) <= 0.01
    rec = json.loads((tmp_path / "True" / "record.json").read_text())
    assert rec["config"]["whole_step"] == "on"


def test_compiled_update_matches_torch_sgd_and_ema():
    """With --compile, the SGD update and the EMA are torch.compile'd functions (lr, EMA count
    and decay as tensors): the same parameters, momentum and EMA weights as eager torch."""
    data = batches(5, seed=4)
    ref, new = build(False), build(True, compile="default")
    from fastres.step import ema_update, sgd_update
    assert all(u["update"] is not sgd_update for u in new[-1].updates) and new[-1].ema_update is not ema_update
    from torch._dynamo.utils import counters
    counters.clear()
    for x, y in data:
        ref[-1](x, y), new[-1](x, y)
    assert counters["stats"]["unique_graphs"] >= 2, dict(counters["stats"])  # the update and the EMA
    assert_same(state(*new[:4]), state(*ref[:4]))
