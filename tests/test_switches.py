"""Performance switches: each resolves once, shows in the record, and falls back cleanly on CPU."""
import json
import pytest

from conftest import run_cli
from fastres.config import make_config
from fastres.runtime import cpu_has_bf16, resolve

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


def test_cuda_requested_without_gpu_is_a_clear_error():
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = run_cli("fastres", "train", "--device", "cuda", *TINY, "--out", "/tmp/never", timeout=120)
    assert r.returncode != 0 and "no CUDA device" in r.stderr


def test_fused_without_cuda_falls_back_and_says_so(small_data, tmp_path):
    r = run_cli("fastres", "train", "--data", small_data, "--out", tmp_path / "r", *TINY, "--fused-bn-relu",
                env={"TRITON_INTERPRET": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "falling back to the PyTorch BN+ReLU path" in r.stdout
    assert record(tmp_path / "r")["switches"]["fused_bn_relu"].startswith("off: requested")


def test_fused_under_interpreter_trains(small_data, tmp_path):
    # The interpreter is slow: 2 steps of 10 images, 10 test images.
    r = run_cli("fastres", "train", "--data", small_data, "--out", tmp_path / "r", *TINY, "--fused-bn-relu",
                "--train-limit", "20", "--batch-size", "10", "--test-limit", "10", "--eval-batch-size", "10",
                env={"TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    rec = record(tmp_path / "r")
    assert rec["switches"]["fused_bn_relu"] == "triton (interpreter)"
    assert rec["status"] == "finished" and rec["epochs"][0]["train_loss"] > 0


@pytest.mark.parametrize("amp", ["on", "off"])
def test_amp_switch_reaches_the_record(small_data, tmp_path, amp):
    r = run_cli("fastres", "train", "--data", small_data, "--out", tmp_path / "r", *TINY, "--amp", amp,
                "--channels-last", "false")
    assert r.returncode == 0, r.stderr[-2000:]
    s = record(tmp_path / "r")["switches"]
    assert s["amp"] == ("bf16" if amp == "on" else "off") and s["channels_last"] is False


@pytest.mark.slow
def test_compile_on_cpu(small_data, tmp_path):
    r = run_cli("fastres", "train", "--data", small_data, "--out", tmp_path / "r", *TINY, "--compile", "default")
    assert r.returncode == 0, r.stderr[-2000:]
    rec = record(tmp_path / "r")
    assert rec["switches"]["compile"] == "default" and rec["warmup_s"] > 0
