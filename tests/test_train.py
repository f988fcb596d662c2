"""The trainer end to end on real data: artifacts, settings a resume refuses, the non-finite guard
(exact resume after SIGKILL: test_resume.py)."""
import json

import pytest
import torch

from conftest import run_cli, run_here

# --compile-augment false: the compiled path is tested in test_augment.py and by the smoke test;
# here it would only add compile time for each new batch shape.
TINY = ["--preset", "smoke", "--depth", "8", "--train-limit", "0", "--epochs", "3", "--batch-size", "100",
        "--loader-workers", "2", "--compile-augment", "false"]


def train_cmd(data, out, *extra):
    return ["fastres", "train", "--data", data, "--out", out, *TINY, *extra]


def test_run_writes_record_curves_checkpoint(small_data, tmp_path):
    out = tmp_path / "run"
    r = run_here(*train_cmd(small_data, out))
    assert r.returncode == 0
    printed = r.stdout
    assert "train_loss" in printed and "test_acc" in printed  # the table
    rec = json.loads((out / "record.json").read_text())
    assert rec["status"] == "finished" and len(rec["epochs"]) == 3
    for key in ("config", "environment", "switches", "warmup_s", "final_test_acc", "train_s_total", "eval_s_total"):
        assert key in rec
    for key in ("python", "torch", "triton", "ffcv", "device_name", "git_commit"):
        assert key in rec["environment"]
    e = rec["epochs"][-1]
    for key in ("lr", "train_loss", "train_acc", "test_loss", "test_acc", "train_s", "eval_s", "images_per_s"):
        assert key in e
    assert rec["num_train"] == 2000 and rec["num_test"] == 500 and rec["steps_per_epoch"] == 20
    assert rec["epochs"][-1]["train_loss"] < rec["epochs"][0]["train_loss"]  # it learns
    assert rec["final_test_acc"] > 0.2  # well above the 10% of chance after 3 epochs
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    ck = torch.load(out / "last.pt", weights_only=False)
    assert ck["epoch"] == 3 and {"model", "optimizer", "scheduler", "rng", "config"} <= set(ck)
    # fastres eval reproduces the run's final test accuracy from the checkpoint.
    r = run_here("fastres", "eval", out / "last.pt", "--data", small_data)
    assert r.returncode == 0, r.stderr
    assert f"{100 * rec['final_test_acc']:.2f}%" in r.stdout


def test_a_short_run_times_no_more_steps_than_it_trains(small_data, tmp_path, monkeypatch):
    """The estimate's timed steps: 5, or the run's own steps when it trains fewer (here 2)."""
    from fastres import step as step_module

    calls, real = [], step_module.TrainStep.__call__
    monkeypatch.setattr(step_module.TrainStep, "__call__", lambda self, x, y: calls.append(1) or real(self, x, y))
    r = run_here(*train_cmd(small_data, tmp_path / "run", "--epochs", "1", "--train-limit", "200",
                            "--test-limit", "100"))
    assert r.returncode == 0
    assert "of 2 timed steps" in r.stdout
    assert len(calls) == 1 + 2 + 2  # the first (compiling) step, 2 timed, 2 trained


def test_resume_refuses_other_settings(small_data, tmp_path):
    out = tmp_path / "run"
    assert run_here(*train_cmd(small_data, out, "--epochs", "1")).returncode == 0
    r = run_here(*train_cmd(small_data, out, "--epochs", "1", "--lr", "0.05", "--resume"))
    assert r.returncode == 2
    err = r.stderr.strip()
    assert "--lr 0.1 (now 0.05)" in err and len(err.splitlines()) == 1, err


# The two divergence tests below make their run diverge on purpose and at a known place. A run
# left to diverge on its own (lr warmed up to 600 over 3 epochs) does so where the CPU's
# arithmetic takes it: with AVX-512 its epoch 1 stayed finite, on a CPU with AVX2 alone (the
# same fp32 code, other kernels) its BN running variances overflowed in epoch 1 already.
def _diverging_run(small_data, tmp_path, monkeypatch, epoch2_lr=None, corrupt_bn_after_epoch1=False):
    """Train 3 epochs of a tiny model in this process, with a sane lr in epoch 1; from epoch 2 on
    the schedule's factor is epoch2_lr (the run's real SGD then overflows its activations), or
    the last step of epoch 1 leaves one BN running variance at inf (what bf16 activations
    can do to it while the loss stays finite). Returns (the Diverged error, the run folder)."""
    import fastres.train as T
    from fastres.config import make_config
    from fastres.errors import Diverged

    real_factor, real_step = T.lr_factor, T.build_step
    if epoch2_lr is not None:
        monkeypatch.setattr(T, "lr_factor", lambda cfg, n: (lambda s, f=real_factor(cfg, n): f(s) if s < n else epoch2_lr))
    if corrupt_bn_after_epoch1:
        def build_step(cfg, rt, model, *a):
            step, steps_per_epoch = real_step(cfg, rt, model, *a), a[-1]

            class Corrupting:  # the real step, and everything it offers the loop
                def __getattr__(self, name):
                    return getattr(step, name)

                def __call__(self, x, y):
                    out = step(x, y)
                    if step.sched.last_epoch == steps_per_epoch:  # the last step of epoch 1 was taken
                        model.layer1[0].bn1.running_var[0] = float("inf")
                    return out
            return Corrupting()
        monkeypatch.setattr(T, "build_step", build_step)
    out = tmp_path / "run"
    cfg = make_config("smoke", {"data": str(small_data), "out": str(out), "depth": 8, "train_limit": 1000,
                                "epochs": 3, "batch_size": 100, "loader_workers": 2, "compile_augment": False,
                                "amp": "off"})
    with pytest.raises(Diverged) as e:
        T.train(cfg, log=lambda *a, **k: None)
    assert e.value.exit_status == 3
    return str(e.value), out


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(small_data, tmp_path, monkeypatch):
    """Epoch 1 trains normally and is checkpointed; in epoch 2 an lr of 1e30 overflows the
    activations and the loss turns non-finite: the run stops (exit 3) and its own epoch-1
    checkpoint stays."""
    msg, out = _diverging_run(small_data, tmp_path, monkeypatch, epoch2_lr=1e30)
    assert "non-finite training loss at epoch 2" in msg and "(after epoch 1) is kept" in msg
    rec = json.loads((out / "record.json").read_text())
    assert rec["status"] == "diverged" and len(rec["epochs"]) == 1
    ck = torch.load(out / "last.pt", weights_only=False)
    assert ck["epoch"] == 1 and ck["history"] == rec["epochs"]
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_overflowed_bn_statistics_count_as_divergence(small_data, tmp_path, monkeypatch):
    """A finite loss through epoch 1 but an inf BN running variance at its end: that epoch is not
    checkpointed either."""
    msg, out = _diverging_run(small_data, tmp_path, monkeypatch, corrupt_bn_after_epoch1=True)
    assert "non-finite weights or BN statistics after epoch 1" in msg
    assert "no checkpoint of this run was written" in msg and not (out / "last.pt").exists()
    assert json.loads((out / "record.json").read_text())["status"] == "diverged"


def test_a_diverged_run_exits_3_from_the_command(small_data, tmp_path):
    """The command's exit status and message for a run that diverges on its own (wherever this
    CPU's arithmetic takes it: in epoch 1 or 2, by its loss or its BN statistics)."""
    r = run_here(*train_cmd(small_data, tmp_path / "run", "--warmup-epochs", "3", "--lr", "600", "--amp", "off",
                            "--train-limit", "1000"))
    assert r.returncode == 3, (r.returncode, r.stderr[-2000:])
    assert "non-finite" in r.stderr and "Lower --lr" in r.stderr and "Traceback" not in r.stderr


def test_missing_data_is_converted_on_demand(cifar_dir, tmp_path):
    """With no .beton files in --data, train converts from $FASTRES_CIFAR10 first."""
    data = tmp_path / "data"
    r = run_cli("fastres", "train", "--data", data, "--out", tmp_path / "run", "--preset", "smoke", "--depth", "8",
                "--epochs", "1", "--train-limit", "500", "--test-limit", "200", "--batch-size", "100",
                "--compile-augment", "false", env={"FASTRES_CIFAR10": str(cifar_dir)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "converting CIFAR-10 first" in r.stdout
    assert (data / "cifar10_train.beton").is_file() and (data / "cifar10_manifest.json").is_file()


@pytest.mark.slow  # 2-5 minutes on 2 cores without bf16 units; the short runs elsewhere show learning
def test_smoke_preset_learns_on_cpu(full_data, tmp_path):
    """The documented quick run: resnet20, 10,000 class-balanced images, 3 epochs, >= 35% test accuracy."""
    r = run_cli("fastres", "train", "--preset", "smoke", "--data", full_data, "--out", tmp_path / "smoke",
                "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((tmp_path / "smoke" / "record.json").read_text())
    assert rec["num_train"] == 10_000 and rec["num_test"] == 10_000 and rec["config"]["depth"] == 20
    assert rec["final_test_acc"] >= 0.35, rec["final_test_acc"]
