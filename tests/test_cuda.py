"""The CUDA paths, checked against the CPU or eager results they must reproduce (skipped without a
GPU; the kernels' own CUDA checks are in test_kernels.py, which runs on the GPU when there is one).

- augmentation on the device: the same pixels as on the CPU, for the same offsets and mirrors,
  also when cropped straight out of the padded resident set;
- FFCV's ToDevice path (stream) and the resident path (device): the test images that reach the
  GPU are the CPU's, bit for bit, after normalization;
- the model: CUDA forward and gradients match the CPU's (gradients in float64);
- torch.compile's default and reduce-overhead (CUDA graphs) training steps follow the eager step
  over several SGD steps (weights and losses), including an evaluation between steps;
- design-space models (kernels 5 and 7, four stages, pools) on CUDA against the CPU; cutout,
  mixup and cutmix on the device against the CPU; the whole step captured with Adam and AdamW,
  and in fp16 with loss scaling (overflows forced);
- a whole tiny run on CUDA with the default switches and with CUDA graphs; its checkpoint evaluates
  to the accuracy the run recorded, and the run resumes from it (a checkpoint read onto the GPU
  once made resuming fail: torch restores RNG states from CPU tensors only);
- packed runs on their own streams against the same runs alone (within bf16's tolerance).
"""
import copy
import json
import re

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def test_augmentation_on_cuda_matches_cpu(cifar):
    from fastres.data import augment_normalize, crop_flip, sample_crop_flip

    images = torch.from_numpy(cifar["train"][0][:512])
    dy, dx, m = sample_crop_flip(512, torch.Generator().manual_seed(1))
    cpu = crop_flip(images, dy, dx, m)
    gpu = crop_flip(images.to(CUDA), dy.to(CUDA), dx.to(CUDA), m.to(CUDA))
    assert torch.equal(gpu.cpu(), cpu)
    mean, std = torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.25, 0.24, 0.26])
    want = augment_normalize(images, dy, dx, m, mean, std, torch.float32, True)
    fused = torch.compile(augment_normalize, dynamic=False)
    got = fused(images.to(CUDA), dy.to(CUDA), dx.to(CUDA), m.to(CUDA), mean.to(CUDA), std.to(CUDA), torch.float32, True)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-5)


def test_resident_augmentation_on_cuda_matches_cpu():
    """--data-placement device: batches cropped straight out of the padded resident set by the
    compiled gather (Triton on CUDA) are the CPU's eager crop/flip/normalize of the same draws."""
    from fastres.data import PAD, augment_normalize, gather_augment_normalize, sample_crop_flip

    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (700, 32, 32, 3), dtype=torch.uint8, generator=g)
    padded = torch.nn.functional.pad(images, (0, 0, PAD, PAD, PAD, PAD))
    idx = torch.randperm(700, generator=g)[:512]
    dy, dx, m = sample_crop_flip(512, g)
    mean, std = torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.25, 0.24, 0.26])
    want = augment_normalize(images[idx], dy, dx, m, mean, std, torch.float32, True)
    fused = torch.compile(gather_augment_normalize, dynamic=False)
    got = fused(*(t.to(CUDA) for t in (padded, idx, dy, dx, m, mean, std)), torch.float32, True)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("placement", ["stream", "device"])
def test_test_images_reach_the_gpu_unchanged(small_data, placement):
    from fastres.data import Batches

    def test_set(device):
        b = Batches(small_data, 100, 250, device, seed=0, placement=placement, num_workers=2)
        xs, ys = zip(*[(x.float().cpu(), y.cpu()) for x, y in b.test()])
        return torch.cat(xs), torch.cat(ys)

    xc, yc = test_set(torch.device("cpu"))
    xg, yg = test_set(CUDA)
    assert torch.equal(yg, yc) and len(yg) == 500
    torch.testing.assert_close(xg, xc, rtol=0, atol=1e-5)
    b = Batches(small_data, 100, 250, CUDA, seed=0, placement=placement, num_workers=2, compile_augment=True)
    x, y = next(iter(b.train_epoch(0)))
    assert x.device.type == "cuda" and y.device.type == "cuda" and x.shape == (100, 3, 32, 32)
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_model_forward_and_backward_on_cuda_match_cpu(exact_convs):
    """The same network on both devices. Gradients in float64: in fp32 two correct devices differ
    by ReLU flips (see WHOLE_NET_GRAD_RTOL in conftest), which failed this test on an H100 and an
    H200 at element-wise tolerances; in float64 the devices agree to ~1e-12 and any real
    difference (a layer computed otherwise on CUDA) stands out. The fp32 forward, continuous in
    its inputs, is compared as it runs in training."""
    from fastres.model import resnet

    torch.manual_seed(0)
    m_cpu = resnet(20).double()
    m_gpu = copy.deepcopy(m_cpu).to(CUDA)
    x = torch.randn(32, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (32,))
    for m, dev in ((m_cpu, "cpu"), (m_gpu, "cuda")):
        torch.nn.functional.cross_entropy(m(x.to(dev)), y.to(dev)).backward()
    for (name, p), q in zip(m_cpu.named_parameters(), m_gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-7, atol=1e-10, msg=name)
    m_cpu, m_gpu = m_cpu.float(), m_gpu.float()
    torch.testing.assert_close(m_gpu(x.float().to(CUDA)).cpu(), m_cpu(x.float()), rtol=1e-4, atol=1e-4)


def _steps(mode: str, n: int = 6):
    """n SGD steps of a ResNet-20 in fp32 under compile `mode` (an evaluation after step 3)."""
    from fastres import runtime
    from fastres.config import make_config
    from fastres.design import build_model
    from fastres.optim import EMA, make_criterion
    from fastres.step import TrainStep

    torch._dynamo.reset()
    cfg = make_config("paper", {"device": "cuda", "depth": 20, "compile": mode, "amp": "off", "batch_size": 32})
    rt = runtime.resolve(cfg)
    b = torch.backends  # resolve() turned TF32 and cudnn.benchmark on: off again, to compare in fp32
    b.cudnn.allow_tf32 = b.cuda.matmul.allow_tf32 = b.cudnn.benchmark = False
    torch.manual_seed(0)
    model = build_model(cfg, rt)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    compiled = rt.compile(model)
    step = TrainStep(compiled, opt, sched, EMA(model, 0), make_criterion(cfg), rt)
    g = torch.Generator(device=CUDA).manual_seed(0)
    losses, evals = [], []
    for i in range(n):
        x = torch.randn(32, 3, 32, 32, device=CUDA, generator=g).to(memory_format=rt.memory_format)
        y = torch.randint(0, 10, (32,), device=CUDA, generator=g)
        loss, _ = step(x, y)
        losses.append(loss.item())
        if i == 2:
            compiled.eval()
            with torch.no_grad():
                evals.append(compiled(x).float().sum().item())
            compiled.train()
    return losses, evals, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_steps_follow_eager(mode, exact_convs):
    ref_losses, ref_evals, ref_state = _steps("off")
    losses, evals, state = _steps(mode)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-3)
    np.testing.assert_allclose(evals, ref_evals, rtol=2e-3)
    for k, v in ref_state.items():
        if v.is_floating_point():
            torch.testing.assert_close(state[k], v, rtol=1e-2, atol=1e-3, msg=k)
        else:
            assert torch.equal(state[k], v), k


@pytest.mark.parametrize("mode,whole", [("default", "off"), ("reduce-overhead", "off"), ("reduce-overhead", "on"),
                                        ("auto", "auto")])
def test_tiny_run_on_cuda_trains_evaluates_and_resumes(small_data, tmp_path, mode, whole):
    """Each step mode, and the CUDA defaults (auto: the whole step over resident data, compiled
    in default mode)."""
    from conftest import run_cli

    extra = ["--whole-step", whole]
    r = run_cli("fastres", "train", "--preset", "smoke", "--data", small_data, "--depth", "8", "--epochs", "2",
                "--train-limit", "2000", "--compile", mode, "--out", tmp_path / "run", *extra, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((tmp_path / "run" / "record.json").read_text())
    assert rec["status"] == "finished" and rec["switches"]["compile"] == ("default" if mode == "auto" else mode)
    assert rec["switches"]["amp"] == "bf16" and rec["environment"]["device"].startswith("cuda")
    assert rec["switches"]["whole_step"] == ("off" if whole == "off" else "one CUDA graph per step")
    # the config keeps what was asked (auto); the switches say what it resolved to on one CUDA GPU
    assert rec["config"]["data_placement"] == "auto" and rec["switches"]["data_placement"] == "device"
    assert rec["final_test_acc"] > 0.2, rec["epochs"]  # chance is 0.1
    r = run_cli("fastres", "eval", tmp_path / "run" / "last.pt", "--device", "cuda", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # eval runs eager; the run evaluated its compiled graph: bf16 rounding may flip a few of 500
    acc = float(re.search(r"test accuracy ([0-9.]+)%", r.stdout).group(1)) / 100
    assert abs(acc - rec["final_test_acc"]) <= 0.01, (r.stdout, rec["final_test_acc"])
    # resume on CUDA: rewind the checkpoint to epoch 1 and let the run redo epoch 2 from it
    ck = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=False)
    assert ck["rng"]["torch"].device.type == "cpu"
    ck["epoch"], ck["history"] = 1, ck["history"][:1]
    torch.save(ck, tmp_path / "run" / "last.pt")
    r = run_cli("fastres", "train", "--preset", "smoke", "--data", small_data, "--depth", "8", "--epochs", "2",
                "--train-limit", "2000", "--compile", mode, "--out", tmp_path / "run", *extra, "--resume", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads((tmp_path / "run" / "record.json").read_text())
    assert again["status"] == "finished" and again["resumed_at_epoch"] == 1 and len(again["epochs"]) == 2


def _whole_step(optimizer: str, amp: str, capture: bool, scaler=None):
    """A depth-20 model of the tuned recipe and its WholeStep on CUDA (captured or not), with the
    exact convolutions of the `exact_convs` fixture (resolve() turns TF32 and autotuning on)."""
    from fastres import runtime
    from fastres.config import make_config
    from fastres.design import build_model
    from fastres.optim import EMA, lr_factor, make_criterion, make_optimizer, peak_lr
    from fastres.step import WholeStep

    torch._dynamo.reset()
    over = {"nesterov": False, "lr": 0.002, "weight_decay": 0.05} if optimizer != "sgd" else {}
    cfg = make_config("tuned", {"device": "cuda", "depth": 20, "amp": amp, "batch_size": 32, "epochs": 2,
                                "whole_step": True, "optimizer": optimizer, **over})
    rt = runtime.resolve(cfg)
    b = torch.backends
    b.cudnn.allow_tf32 = b.cuda.matmul.allow_tf32 = b.cudnn.benchmark = False
    torch.manual_seed(0)
    model = build_model(cfg, rt)
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, 5))
    ema = EMA(model, cfg.ema)
    f = lr_factor(cfg, 5)
    step = WholeStep(model, opt, sched, ema, make_criterion(cfg), rt, [peak_lr(cfg) * f(s) for s in range(11)],
                     capture=capture, scaler=scaler)
    return model, opt, sched, ema, step, rt


@pytest.mark.parametrize("optimizer,soft_targets", [("sgd", False), ("adam", False), ("adamw", True)])
def test_whole_step_graph_replays_the_uncaptured_step(exact_convs, optimizer, soft_targets):
    """--whole-step: the captured graph (replayed) against the same arithmetic run op by op
    (test_whole_step.py and test_optimizers.py check that arithmetic against torch.optim's SGD,
    Adam and AdamW on the CPU); for each optimizer, and with mixup's (N, 10) targets."""
    results = []
    for capture in (False, True):
        model, opt, sched, ema, step, rt = _whole_step(optimizer, "off", capture)
        g = torch.Generator(device=CUDA).manual_seed(0)
        # as training's warm-up does: a first call (which captures), then the state put back
        saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict(), ema.state_dict()))
        step(torch.randn(32, 3, 32, 32, device=CUDA).to(memory_format=rt.memory_format),
             torch.full((32, 10), 0.1, device=CUDA) if soft_targets else torch.zeros(32, dtype=torch.int64, device=CUDA))
        model.load_state_dict(saved[0]), opt.load_state_dict(saved[1]), sched.load_state_dict(saved[2])
        ema.load_state_dict(saved[3])
        ema.updates = 0
        step.after_load()
        losses = []
        for _ in range(6):
            x = torch.randn(32, 3, 32, 32, device=CUDA, generator=g).to(memory_format=rt.memory_format)
            y = torch.randint(0, 10, (32,), device=CUDA, generator=g)
            if soft_targets:
                y = torch.softmax(torch.randn(32, 10, device=CUDA, generator=g), 1)
            loss, _ = step(x, y)
            losses.append(loss.item())
        results.append((losses, {k: v.clone() for k, v in model.state_dict().items()},
                        {k: v.clone() for k, v in ema.state_dict().items()}, step.graph is not None))
    (l0, s0, e0, captured0), (l1, s1, e1, captured1) = results
    assert not captured0 and captured1
    np.testing.assert_allclose(l1, l0, rtol=1e-4)
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], rtol=1e-4, atol=1e-5, msg=k)
    for k in e0:
        torch.testing.assert_close(e1[k], e0[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fp16_whole_step_graph_replays_the_uncaptured_step(exact_convs, optimizer):
    """--amp fp16 inside the whole step: the captured graph (GradScaler's scale and found-inf flag
    on the device, a skipped step undone by selection) against the same arithmetic op by op
    (test_loss_scaling.py checks that against torch.optim + GradScaler on the CPU). A large initial
    scale forces overflows: the same steps are skipped and the scales agree exactly."""
    results = []
    for capture in (False, True):
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 24, growth_interval=2)
        model, opt, sched, ema, step, rt = _whole_step(optimizer, "fp16", capture, scaler)
        g = torch.Generator(device=CUDA).manual_seed(0)
        saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict(), ema.state_dict(),
                               step.scaling_state()))
        step(torch.randn(32, 3, 32, 32, device=CUDA).to(memory_format=rt.memory_format),
             torch.zeros(32, dtype=torch.int64, device=CUDA))  # captures; then the state is put back
        model.load_state_dict(saved[0]), opt.load_state_dict(saved[1]), sched.load_state_dict(saved[2])
        ema.load_state_dict(saved[3])
        ema.updates = 0
        step.load_scaling_state(saved[4])
        step.after_load()
        losses, scales = [], []
        for _ in range(8):
            x = torch.randn(32, 3, 32, 32, device=CUDA, generator=g).to(memory_format=rt.memory_format)
            y = torch.randint(0, 10, (32,), device=CUDA, generator=g)
            loss, _ = step(x, y)
            losses.append(loss.item())
            scales.append(scaler.get_scale())
        step.sync_host()
        results.append((losses, scales, step.scaling_report(), ema.updates,
                        {k: v.clone() for k, v in model.state_dict().items()}, step.graph is not None))
    (l0, sc0, r0, n0, s0, captured0), (l1, sc1, r1, n1, s1, captured1) = results
    assert not captured0 and captured1
    assert r0["skipped_steps"] >= 1 and sc1 == sc0 and r1 == r0 and n1 == n0 == 8 - r0["skipped_steps"]
    np.testing.assert_allclose(l1, l0, rtol=1e-3)
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.parametrize("settings", [
    {"blocks": "1,1,1", "widths": "8,16,32", "kernel": "5", "stem_kernel": "5"},
    {"blocks": "1,1,1", "widths": "8,16,32", "kernel": "7,5,3", "shortcut_kernel": "3"},
    {"blocks": "1,2,1,1", "widths": "8,16,24,32", "pool": "2"},
    {"blocks": "1,1,1", "widths": "8,16,32", "pool": "4"},
])
def test_design_points_on_cuda_match_the_cpu(settings):
    """Design-space models (kernels 5 and 7, four stages, pools): CUDA forward and gradients equal
    the CPU's in float64 (cuDNN's float64 paths: no TF32, no Winograd)."""
    from fastres.config import make_config
    from fastres.design import model_from_config

    torch.manual_seed(0)
    cpu = model_from_config(make_config("paper", settings)).double()
    gpu = copy.deepcopy(cpu).to(CUDA)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    outs = []
    for m, xx in ((cpu, x), (gpu, x.to(CUDA))):
        out = m(xx)
        out.square().mean().backward()
        outs.append((out.detach().cpu(), {n: p.grad.cpu() for n, p in m.named_parameters()}))
    assert outs[0][0].shape == (4, 10)
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-9, atol=1e-10)
    for n in outs[0][1]:
        torch.testing.assert_close(outs[1][1][n], outs[0][1][n], rtol=1e-7, atol=1e-10, msg=n)


def test_cutout_mixup_and_cutmix_on_cuda_match_the_cpu():
    """The same draws give the same batch on the device as on the CPU: cutout from given centres,
    mixup / cutmix from the (seed, epoch, step) generator of the host."""
    from fastres.data import Regularize, cutout, sample_cutout

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, 32, 32, generator=g).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,), generator=g)
    cy, cx = sample_cutout(32, torch.Generator().manual_seed(1))
    got = cutout(x.to(CUDA), cy.to(CUDA), cx.to(CUDA), 12)
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.cpu(), cutout(x, cy, cx, 12), rtol=0, atol=0)
    reg = Regularize(seed=4, mixup=0.4, cutmix=1.0)
    for step in range(6):
        a = reg(x, y, torch.Generator().manual_seed(2), 1, step)
        b = reg(x.to(CUDA), y.to(CUDA), torch.Generator(device=CUDA).manual_seed(2), 1, step)
        torch.testing.assert_close(b[0].cpu(), a[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(b[1].cpu(), a[1], rtol=1e-6, atol=1e-6)



def test_packed_runs_on_streams_follow_the_same_runs_alone(small_data, tmp_path):
    """Two packed runs with the CUDA defaults (the whole step as one CUDA graph over resident data,
    each run on its own stream, the data shared) against the same runs trained alone. Not to the
    bit: kernels that overlap and bf16 round differently, so within 5%."""
    from fastres.config import make_config
    from fastres.packed import train_packed
    from fastres.train import train

    def cfg(seed, out):
        return make_config("smoke", {"data": str(small_data), "depth": 8, "epochs": 2, "train_limit": 2000,
                                     "seed": seed, "compile": "off", "out": str(out)})

    quiet = lambda *a, **k: None  # noqa: E731
    packed = train_packed([cfg(s, tmp_path / f"p{s}") for s in (0, 1)], log=quiet)
    alone = [train(cfg(s, tmp_path / f"a{s}"), log=quiet) for s in (0, 1)]
    for p, a in zip(packed, alone):
        assert isinstance(p, dict) and p["status"] == "finished", p
        assert p["switches"]["whole_step"] == "one CUDA graph per step" and p["switches"]["data_placement"] == "device"
        assert p["device_memory_peak_mb"] > 0
        for hp, ha in zip(p["epochs"], a["epochs"]):
            assert hp["train_loss"] == pytest.approx(ha["train_loss"], rel=0.05), (hp, ha)
            assert abs(hp["test_acc"] - ha["test_acc"]) <= 0.05, (hp, ha)
    # two seeds, two different runs (each its own order and initialization on its own stream)
    assert packed[0]["epochs"][0]["train_loss"] != packed[1]["epochs"][0]["train_loss"]
