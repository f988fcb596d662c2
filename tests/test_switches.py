"""Performance switches: each resolves once, shows in the record, and falls back cleanly on CPU."""
import json

import pytest
import torch

from conftest import run_cli, run_here
from fastres.config import make_config
from fastres.runtime import cpu_has_avx512, cpu_has_bf16, resolve

TINY = ["--preset", "smoke", "--depth", "8", "--epochs", "1", "--train-limit", "200", "--test-limit", "100",
        "--batch-size", "50", "--loader-workers", "2", "--compile-augment", "false"]


def record(out):
    return json.loads((out / "record.json").read_text())


def test_cpu_defaults_resolve_to_no_ops():
    rt = resolve(make_config("paper", {"device": "cpu"}))
    assert rt.summary["compile"] == "off" and rt.compile_mode is None
    assert rt.amp is cpu_has_bf16() and rt.summary["amp"] == ("bf16" if cpu_has_bf16() else "off")
    assert resolve(make_config("paper", {"device": "cpu", "amp": "off"})).amp is False
    m = object()
    assert rt.compile(m) is m


def test_auto_switches_resolve_per_device(fake_gpu):
    """The auto defaults: on CPU the plain step and FFCV streaming; on one CUDA GPU the whole step
    as one graph over device-resident data with the model compiled in default mode (the measured
    paper run); under torchrun neither (DDP's all-reduce is not captured; resident data is not
    measured there). CUDA is faked:
    only the resolution is checked, nothing runs on it."""
    cpu = resolve(make_config("paper", {"device": "cpu"}))
    assert (cpu.whole_step, cpu.data_placement, cpu.compile_mode) == (False, "stream", None)
    fake_gpu("a faked GPU", (9, 0), 80)
    one = resolve(make_config("paper"))
    off = resolve(make_config("paper", {"whole_step": "off"}))
    ddp = resolve(make_config("paper"), world=2)
    streamed = resolve(make_config("paper", {"data_placement": "stream", "compile": "max-autotune"}))
    assert one.device.type == "cuda" and one.whole_step and one.data_placement == "device"
    assert one.compile_mode == "default" and one.summary["whole_step"] == "one CUDA graph per step"
    assert "whole_step_why" in one.summary and "data_placement_why" in one.summary
    assert not off.whole_step and off.compile_mode == "reduce-overhead" and off.data_placement == "device"
    assert not ddp.whole_step and ddp.compile_mode == "default" and ddp.data_placement == "stream"
    assert streamed.data_placement == "stream" and streamed.compile_mode == "max-autotune"


def test_cuda_requested_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = run_cli("fastres", "train", "--device", "cuda", *TINY, "--out", "/tmp/never", timeout=120)
    assert r.returncode != 0 and "no CUDA device" in r.stderr


def test_fused_without_cuda_falls_back_and_says_so(small_data, tmp_path):
    """Without CUDA (and without the interpreter) the switch falls back and says why, once; with
    CUDA the kernels are used."""
    r = run_cli("fastres", "train", "--data", small_data, "--out", tmp_path / "r", *TINY, "--fused-bn-relu",
                env={"TRITON_INTERPRET": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    resolved = record(tmp_path / "r")["switches"]["fused_bn_relu"]
    if torch.cuda.is_available():
        assert resolved == "triton" and "falling back" not in r.stdout
    else:
        assert r.stdout.count("falling back to the PyTorch BN+ReLU path") == 1
        assert resolved.startswith("off: requested")


@pytest.mark.long
def test_fused_under_interpreter_trains(small_data, tmp_path):
    # The interpreter is slow: 2 steps of 10 images, 10 test images.
    r = run_cli("fastres", "train", "--data", small_data, "--out", tmp_path / "r", *TINY, "--fused-bn-relu",
                "--train-limit", "20", "--batch-size", "10", "--test-limit", "10", "--eval-batch-size", "10",
                env={"TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    rec = record(tmp_path / "r")
    assert rec["switches"]["fused_bn_relu"] == ("triton" if torch.cuda.is_available() else "triton (interpreter)")
    assert rec["status"] == "finished" and rec["epochs"][0]["train_loss"] > 0


@pytest.mark.parametrize("amp", ["on", "off"])
def test_amp_switch_reaches_the_record(small_data, tmp_path, amp):
    # one step and one test batch where this CPU emulates bf16 (about 10x slower than fp32 there)
    small = ["--train-limit", "50", "--test-limit", "50"] if amp == "on" and not cpu_has_bf16() else []
    r = run_here("fastres", "train", "--data", small_data, "--out", tmp_path / "r", *TINY, "--amp", amp,
                 "--channels-last", "false", *small)
    assert r.returncode == 0, r.stderr[-2000:]
    s = record(tmp_path / "r")["switches"]
    assert s["amp"] == ("bf16" if amp == "on" else "off") and s["channels_last"] is False


@pytest.mark.slow
def test_compile_on_cpu(small_data, tmp_path):
    r = run_cli("fastres", "train", "--data", small_data, "--out", tmp_path / "r", *TINY, "--compile", "default")
    assert r.returncode == 0, r.stderr[-2000:]
    rec = record(tmp_path / "r")
    assert rec["switches"]["compile"] == "default" and rec["warmup_s"] > 0


def _one_training_step(data, **over):
    """One fastres training step of a small ResNet on a real batch, with every conv's output and
    the model as the switches built them."""
    from fastres.data import Batches
    from fastres.design import build_model
    from fastres.optim import EMA, make_criterion
    from fastres.step import TrainStep

    cfg = make_config("smoke", {"device": "cpu", "depth": 8, "widths": "8,16,32", **over})
    rt = resolve(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, rt)
    seen = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, inp, out: seen.append(out))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    step = TrainStep(rt.compile(model), opt, sched, EMA(model, 0), make_criterion(cfg), rt)
    b = Batches(data, 32, 100, rt.device, seed=0, num_workers=2, channels_last=rt.channels_last)
    x, y = next(iter(b.train_epoch(0)))
    before = [p.detach().clone() for p in model.parameters()]
    loss, _ = step(x, y)
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # it stepped
    return model, seen


@pytest.mark.parametrize("amp", ["on", "off"])
def test_amp_makes_the_activations_bf16(small_data, amp):
    _, seen = _one_training_step(small_data, amp=amp, compile="off")
    assert len(seen) == 9  # resnet8: stem + 3 stages x 1 block x 2 convs + 2 shortcut convs
    want = torch.bfloat16 if amp == "on" else torch.float32
    assert all(o.dtype == want for o in seen), {o.dtype for o in seen}


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_applies_to_weights_and_activations(small_data, channels_last):
    model, seen = _one_training_step(small_data, channels_last=channels_last, compile="off", amp="off")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert all(c.weight.is_contiguous(memory_format=fmt) for c in convs)
    # (N, C, H, W) with C, H, W > 1: the two layouts are distinguishable
    assert all(o.is_contiguous(memory_format=fmt) and not o.is_contiguous(
        memory_format=torch.contiguous_format if channels_last else torch.channels_last) for o in seen)


def test_compile_really_compiles_a_training_step(small_data):
    """--compile default: dynamo captures the model into a graph (its counters) and one compiled
    training step runs and updates the weights (a tiny model keeps the compile short on CPU)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    _one_training_step(small_data, compile="default", amp="off")
    assert counters["stats"]["unique_graphs"] >= 1 and counters["stats"]["calls_captured"] > 0
    torch._dynamo.reset()
    counters.clear()
    _one_training_step(small_data, compile="off", amp="off")
    assert counters["stats"]["unique_graphs"] == 0  # eager: nothing captured


@pytest.mark.parametrize("capability,widths,shortcut,want", [
    ("AVX2", "4,8,16", "1", False),      # a 1x1 stride-2 shortcut from 4 channels: the broken kernel
    ("AVX2", "16,4,32", "1", False),     # the second projection's input is the thin one
    ("AVX2", "8,16,32", "1", True),      # 8 input channels or more: fine
    ("AVX2", "4,8,16", "3", True),       # a 3x3 shortcut: fine
    ("AVX512", "4,8,16", "1", True),     # with AVX-512: fine
])
def test_channels_last_falls_back_where_the_cpu_kernel_is_broken(monkeypatch, capability, widths, shortcut, want):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    rt = resolve(make_config("smoke", {"device": "cpu", "depth": 8, "widths": widths, "shortcut_kernel": shortcut}))
    assert rt.channels_last is want and rt.summary["channels_last"] is want
    assert ("channels_last_why" in rt.summary) is (not want)
    if not want:
        assert "1x1 stride-2 shortcut with 4 input channels" in rt.summary["channels_last_why"]


def test_a_thin_model_trains_with_the_default_switches(small_data, tmp_path):
    """The model of the case above trains on this CPU, whatever it is (in its own process: on a
    CPU without AVX-512 the channels_last backward it avoids crashes or hangs the process)."""
    r = run_cli("fastres", "train", "--data", small_data, "--out", tmp_path / "r", *TINY, "--widths", "4,8,16",
                "--amp", "off", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    s = record(tmp_path / "r")["switches"]
    assert s["channels_last"] is cpu_has_avx512() and ("channels_last_why" in s) is not cpu_has_avx512()



def test_help_says_what_auto_resolves_to_from_beside_the_resolution(capsys):
    """`fastres train --help` takes each switch's `auto` rule from runtime.AUTO, written beside the
    function that resolves it, so the two cannot drift apart; every switch with an auto has one."""
    from dataclasses import fields

    from fastres import runtime
    from fastres.cli import main
    from fastres.config import Config

    autos = {f.name for f in fields(Config) if f.default == "auto" and f.name != "device"}
    assert set(runtime.AUTO) == autos
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, rule in runtime.AUTO.items():
        assert f"auto = {' '.join(rule.split())}" in text, name
