"""What fastres resolves to on the GPUs its users have (faked: torch.cuda answers as each card
would, nothing runs on it), and on CPUs with and without bf16 units; what it refuses there, before
any folder is made; and a torch that cannot use the machine's GPU, reported instead of training
on the CPU."""
import json
import os
import stat

import pytest
import torch

from conftest import GPUS, run_cli
from fastres import runtime
from fastres.cli import main
from fastres.config import make_config, parse_overrides
from fastres.machine import arch_supported, torch_cuda_problem

FP16 = "fp16 (loss scaling)"
# What each card gets by default, from its capability: bf16 from 8.0 (Ampere), fp16 with loss
# scaling below; Triton (torch.compile, the compiled augmentation) from 7.0; the whole step (CUDA
# graphs, no Triton) and resident data (every card here has 8 GB or more) everywhere.
EXPECTED = {  # amp, compile, compile_augment
    "P100": (FP16, "off", False),
    "V100": (FP16, "default", True),
    "T4": (FP16, "default", True),
    "RTX8000": (FP16, "default", True),
    "A100": ("bf16", "default", True),
    "RTX3070": ("bf16", "default", True),
    "L4": ("bf16", "default", True),
    "H100": ("bf16", "default", True),
}


@pytest.mark.parametrize("card", list(GPUS))
def test_each_gpu_resolves_to_settings_it_runs(fake_gpu, card):
    name, cap, mem = GPUS[card]
    fake_gpu(name, cap, mem)
    rt = runtime.resolve(make_config("paper"))
    s = rt.summary
    assert (s["amp"], s["compile"], s["compile_augment"]) == EXPECTED[card]
    assert rt.amp_dtype == (torch.bfloat16 if cap >= (8, 0) else torch.float16)
    assert rt.loss_scaling == (cap < (8, 0)) and rt.grad_scaler().is_enabled() == rt.loss_scaling
    assert rt.whole_step and rt.data_placement == "device" and s["capability"] == f"{cap[0]}.{cap[1]}"
    whys = {k: v for k, v in s.items() if k.endswith("_why")}
    assert {"amp_why", "compile_why", "whole_step_why", "data_placement_why"} <= whys.keys()
    for k, v in whys.items():  # every reason names the card and its capability
        assert name in v and f"capability {cap[0]}.{cap[1]}" in v, (k, v)
    if cap < (7, 0):
        assert "Triton" in s["compile_why"] and "Triton" in s["compile_augment_why"]
    if cap < (8, 0):
        assert "no native bf16" in s["amp_why"]  # though torch.cuda.is_bf16_supported() said True


def test_small_gpu_streams_the_data_and_says_why(fake_gpu):
    fake_gpu("Quadro T1000", (7, 5), 4)
    big = runtime.resolve(make_config("throughput"))  # batch 512, evaluation at 2,000
    assert big.data_placement == "stream" and "GiB" in big.summary["data_placement_why"]
    assert "stream" in big.summary["data_placement_why"] and "Quadro T1000" in big.summary["data_placement_why"]
    assert runtime.resolve(make_config("paper")).data_placement == "device"  # batch 64 fits in 4 GiB


@pytest.mark.parametrize("has_bf16", [True, False])
def test_cpu_precision_follows_its_bf16_units(monkeypatch, has_bf16):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: has_bf16)
    rt = runtime.resolve(make_config("paper", {"device": "cpu"}))
    assert rt.summary["amp"] == ("bf16" if has_bf16 else "off") and rt.loss_scaling is False
    assert torch.backends.cpu.get_cpu_capability() in rt.summary["amp_why"]
    assert ("with bf16 units" if has_bf16 else "without bf16 units") in rt.summary["amp_why"]
    assert (rt.summary["compile"], rt.whole_step, rt.data_placement) == ("off", False, "stream")
    forced = runtime.resolve(make_config("paper", {"device": "cpu", "amp": "fp16"}))
    assert forced.amp_dtype == torch.float16 and forced.grad_scaler().is_enabled()


@pytest.mark.parametrize("card,setting,hint", [
    ("T4", ["--amp", "bf16"], "--amp fp16"),
    ("V100", ["--amp", "on"], "--amp fp16"),
    ("P100", ["--compile", "default"], "--compile auto or off"),
    ("P100", ["--fused-bn-relu"], "Drop --fused-bn-relu"),
])
def test_what_the_device_cannot_run_is_refused_before_any_folder(fake_gpu, monkeypatch, tmp_path, capsys, card,
                                                                  setting, hint):
    fake_gpu(*GPUS[card])
    monkeypatch.chdir(tmp_path)  # a run without --out would be made under ./runs
    for out in (["--out", str(tmp_path / "run")], []):
        assert main(["train", "--preset", "smoke", *setting, *out]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and hint in err and GPUS[card][0] in err, err
    assert list(tmp_path.iterdir()) == []
    # the same settings on a card that has what they need resolve without complaint
    fake_gpu(*GPUS["H100"])
    runtime.check(make_config("smoke", parse_overrides(setting)), runtime.Gpu.of(0))


def test_arch_list_decides_whether_torch_runs_on_a_capability():
    cu13 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]
    assert arch_supported((7, 5), cu13) and arch_supported((8, 9), cu13) and arch_supported((12, 1), cu13)
    assert not arch_supported((7, 0), cu13) and not arch_supported((6, 0), cu13)
    assert arch_supported((7, 0), ["sm_50", "sm_60", "sm_70", "sm_80"])
    assert arch_supported((8, 6), ["compute_80"]) and not arch_supported((8, 6), ["sm_90"])


def test_torch_without_kernels_for_the_gpu_is_reported(fake_gpu, monkeypatch):
    fake_gpu(*GPUS["V100"])
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_90"])
    problem = torch_cuda_problem()
    assert "Tesla V100" in problem and "capability 7.0" in problem and "scripts/install.sh" in problem
    fake_gpu(*GPUS["T4"])
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_90"])
    assert torch_cuda_problem() is None


def fake_nvidia_smi(folder, rows: str):
    """An nvidia-smi that answers --query-gpu with `rows` (CSV), as the real one does."""
    folder.mkdir(exist_ok=True)
    exe = folder / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\nprintf '%s\\n' '{rows}'\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return folder


def test_driver_torch_cannot_use_is_one_line_not_hours_on_the_cpu(tmp_path, small_data):
    if torch.cuda.is_available():
        pytest.skip("this torch can use the GPU here")
    fake = fake_nvidia_smi(tmp_path / "bin", "Tesla T4, 535.104.05, 7.5, 15360")
    env = {"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}
    r = run_cli("fastres", "train", "--preset", "smoke", "--data", small_data, "--out", tmp_path / "run", env=env,
                timeout=300)
    err = r.stderr.strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1, r.stderr[-2000:]
    assert "Tesla T4" in err and "driver 535.104.05" in err and "scripts/install.sh" in err and "--device cpu" in err
    assert not (tmp_path / "run").exists()
    r = run_cli("fastres", "env", env=env, timeout=300)
    assert r.returncode == 0 and "driver 535.104.05" in r.stdout and "scripts/install.sh" in r.stdout, r.stderr


def test_env_says_what_a_run_would_use_on_this_gpu(fake_gpu, monkeypatch, capsys):
    """`fastres env` on a faked T4: the card, its capability and memory, and the run's resolution
    with reasons (the same summary a run's record keeps); a refused setting is said, not raised."""
    fake_gpu(*GPUS["T4"])
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80", "sm_90"])
    assert main(["env", "--preset", "tuned"]) == 0
    out = capsys.readouterr().out
    assert "GPU 0: Tesla T4, capability 7.5, 15.0 GiB" in out and "'fastres train --preset tuned'" in out
    assert "fp16 (loss scaling)" in out and "no native bf16" in out and "PROBLEM" not in out
    assert main(["env", "--json", "--amp", "bf16"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert "--amp fp16" in r["refused"] and "switches" not in r
    assert r["machine"]["cuda_devices"] == [{"name": "Tesla T4", "capability": "7.5", "memory_gib": 15.0}]
