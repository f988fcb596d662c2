"""fp16 with dynamic loss scaling (--amp fp16: what CUDA devices below capability 8.0 run), on the
CPU, where float16 autocast and torch.amp.GradScaler("cpu") compute what they compute on a GPU.

The reference is written here from torch's own parts: torch.optim's SGD / Adam / AdamW, GradScaler
(its public API only: a step was skipped when update() lowered the scale), LambdaLR stepped every
step, and the weight EMA updated only after a step that was taken. fastres's usual step and its
whole step (uncaptured on a CPU; test_cuda.py checks the capture) must match it step for step,
including steps whose gradients overflow: forced with a large initial scale, they are skipped by
the same steps, leave weights, momentum, Adam's moments and step count and the EMA exactly as
they were, back the scale off, and the scale grows again after growth_interval good steps."""
import copy
import json

import pytest
import torch

from fastres import runtime
from fastres.config import make_config
from fastres.design import build_model
from fastres.optim import EMA, lr_factor, make_criterion, make_optimizer, peak_lr
from fastres.step import TrainStep, make_whole_step

SETTINGS = {"device": "cpu", "amp": "fp16", "depth": 8, "widths": "8,16,32", "batch_size": 16, "epochs": 2,
            "warmup_epochs": 0.5, "schedule": "cosine_step", "ema": 0.9, "compile_augment": False}
OPTIMIZERS = {"sgd": {"optimizer": "sgd", "lr": 0.1, "nesterov": True, "weight_decay": 5e-4},
              "adam": {"optimizer": "adam", "lr": 0.002, "weight_decay": 1e-4},
              "adamw": {"optimizer": "adamw", "lr": 0.002, "weight_decay": 0.05}}
# The reference's skipped first steps call the schedule before any optimizer step, as GradScaler's
# documented loop does; LambdaLR's warning about that order is expected here.
pytestmark = pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)` before")
STEPS_PER_EPOCH = 6
STEPS = 12
INIT_SCALE, GROWTH_INTERVAL = 2.0 ** 22, 3  # overflows fp16 for the first steps; grows every 3 good steps


def scaler():
    return torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, growth_interval=GROWTH_INTERVAL)


def build(kind: str, opt_name: str):
    """'torch' (the reference loop below), 'usual' (TrainStep) or 'whole' (WholeStep, uncaptured)."""
    cfg = make_config("smoke", {**SETTINGS, **OPTIMIZERS[opt_name]})
    rt = runtime.resolve(cfg)
    assert rt.amp_dtype == torch.float16 and rt.loss_scaling
    torch.manual_seed(0)
    model = build_model(cfg, rt)  # float32: autocast casts float32 (not float64) to float16
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, STEPS_PER_EPOCH))
    ema = EMA(model, cfg.ema)
    crit = make_criterion(cfg)
    if kind == "whole":
        step = make_whole_step(model, opt, sched, ema, crit, rt, lr_factor(cfg, STEPS_PER_EPOCH), peak_lr(cfg),
                               cfg.epochs * STEPS_PER_EPOCH, scaler=scaler())
    elif kind == "usual":
        step = TrainStep(model, opt, sched, ema, crit, rt, scaler=scaler())
    else:
        step = reference_step(model, opt, sched, ema, crit, scaler())
    return model, opt, sched, ema, step


def reference_step(model, opt, sched, ema, crit, sc):
    def step(x, y):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = crit(model(x), y)
        sc.scale(loss).backward()
        before = sc.get_scale()
        sc.step(opt)
        sc.update()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if sc.get_scale() >= before:  # not backed off: the step was taken
            ema.update()
    step.scaler = sc
    return step


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 32, 32, generator=g).to(memory_format=torch.channels_last),
             torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def saved(model, opt, sched, ema, scaler):
    """What a checkpoint holds of the training state."""
    return copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                          "ema": ema.state_dict(), "ema_updates": ema.updates, "scaler": scaler.state_dict()})


def tensors(st):
    """The state's tensors by name: weights and buffers, the optimizer's state (momentum; moments
    and step count), the EMA."""
    out = {f"model.{k}": v for k, v in st["model"].items()}
    out.update({f"ema.{k}": v for k, v in st["ema"].items()})
    for i, s in st["opt"]["state"].items():
        out.update({f"opt{i}.{k}": torch.as_tensor(v) for k, v in s.items()})
    return out


def unmoved_on_skip(before, after):
    """Nothing but BN's running statistics (the forward pass) may move on a skipped step."""
    a, b = tensors(before), tensors(after)
    return [k for k in a if not torch.equal(a[k], b[k]) and not ("running" in k or "num_batches" in k)
            or k.startswith("ema.") and not torch.equal(a[k], b[k])]


def reference(opt_name):
    """The reference's states before and after each step, free-running from the forced overflow."""
    model, opt, sched, ema, step = build("torch", opt_name)
    trace = []
    for x, y in batches(STEPS):
        before = saved(model, opt, sched, ema, step.scaler)
        step(x, y)
        after = saved(model, opt, sched, ema, step.scaler)
        trace.append((x, y, before, after, after["scaler"]["scale"] < before["scaler"]["scale"]))
    return trace


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_fp16_steps_equal_torch_optim_with_grad_scaler(opt_name):
    """Each step, started from the reference's state before it (loaded as a checkpoint is), ends
    where the reference's did. (Left to run free, two correct fp32 implementations drift apart by
    rounding, which fp16's 11-bit activations amplify within a few steps.)"""
    trace = reference(opt_name)
    skipped = [t[-1] for t in trace]
    scales = [t[3]["scaler"]["scale"] for t in trace]
    # the forced overflow happened, was backed off from, and the scale grew again afterwards
    assert skipped[0] and 0 < sum(skipped) < STEPS - GROWTH_INTERVAL, scales
    assert any(b > a for a, b in zip(scales, scales[1:])), scales
    for x, y, before, after, skip in trace:
        if skip:
            assert not unmoved_on_skip(before, after)  # the reference itself
    for kind in ("usual", "whole"):
        model, opt, sched, ema, step = build(kind, opt_name)
        for i, (x, y, before, after, skip) in enumerate(trace):
            # a copy: torch's load_state_dict keeps the optimizer's tensors, which the step updates in place
            model.load_state_dict(before["model"]), opt.load_state_dict(copy.deepcopy(before["opt"]))
            sched.load_state_dict(before["sched"]), ema.load_state_dict(before["ema"])
            ema.updates = before["ema_updates"]
            step.load_scaling_state({"scaler": before["scaler"], "skipped_steps": sum(skipped[:i])})
            step.after_load()
            step(x, y)
            step.sync_host()
            got = saved(model, opt, sched, ema, step.scaler)
            assert got["scaler"] == after["scaler"] and got["ema_updates"] == after["ema_updates"], (kind, i)
            assert step.scaling_report()["skipped_steps"] == sum(skipped[:i + 1])
            if skip:
                assert not unmoved_on_skip(before, got), (kind, i)
            g, w = tensors(got), tensors(after)
            # before torch's first update its optimizer has no state; the whole step's buffers
            # exist from the start, at zero (what torch's first update starts from)
            assert w.keys() <= g.keys() and all(not g[k].any() for k in g.keys() - w.keys()), kind
            for k in w:  # one update's float32 rounding, two implementations
                torch.testing.assert_close(g[k], w[k], rtol=1e-5, atol=1e-7, msg=f"{kind} step {i} {k}")


def test_whole_step_scaler_state_reloads_exactly():
    """The warm-up's restore and --resume: the scaler's state and skipped count, saved and loaded
    with the rest, continue exactly as if never interrupted."""
    model, opt, sched, ema, step = build("whole", "adam")
    data = batches(8, seed=3)

    def run(part):
        for x, y in part:
            step(x, y)
        step.sync_host()
        return saved(model, opt, sched, ema, step.scaler), step.scaling_state()

    mid, mid_scaling = run(data[:4])
    want = run(data[4:])
    model.load_state_dict(mid["model"]), opt.load_state_dict(mid["opt"]), sched.load_state_dict(mid["sched"])
    ema.load_state_dict(mid["ema"])
    ema.updates = mid["ema_updates"]
    step.load_scaling_state(mid_scaling)
    step.after_load()
    got = run(data[4:])
    assert mid_scaling["skipped_steps"] >= 1 and got[1] == want[1]
    g, w = tensors(got[0]), tensors(want[0])
    assert all(torch.equal(g[k], w[k]) for k in w)


@pytest.mark.long
def test_short_fp16_run_learns_and_records_its_scaling(small_data, tmp_path):
    from fastres.train import train

    cfg = make_config("smoke", {"data": str(small_data), "depth": 8, "widths": "8,16,32", "epochs": 3,
                                "train_limit": 1000, "test_limit": 200, "batch_size": 50, "lr": 0.1,
                                "amp": "fp16", "whole_step": "on", "out": str(tmp_path / "r"),
                                "compile_augment": False})
    rec = train(cfg, log=lambda *a, **k: None)
    assert rec["switches"]["amp"] == "fp16 (loss scaling)" and rec["status"] == "finished"
    losses = [e["train_loss"] for e in rec["epochs"]]
    assert losses[-1] < losses[0] and rec["final_test_acc"] > 0.25, (losses, rec["final_test_acc"])
    scaling = json.loads((tmp_path / "r" / "record.json").read_text())["loss_scaling"]
    assert scaling["skipped_steps"] >= 0 and scaling["final_scale"] > 0
    ck = torch.load(tmp_path / "r" / "last.pt", weights_only=False)
    assert ck["amp"] == "fp16 (loss scaling)" and ck["loss_scaling"]["scaler"]["scale"] == scaling["final_scale"]
