"""What a run leaves and shows: one folder per run (runs/latest, resume of the latest), metrics.csv,
TensorBoard scalars, progress lines in a log, the estimate, and `fastres compare`."""
import csv
import json
import os

import pytest
import torch

from conftest import run_cli, run_here

TINY = ["--preset", "smoke", "--depth", "8", "--train-limit", "0", "--batch-size", "100",
        "--loader-workers", "2", "--compile-augment", "false"]


@pytest.mark.slow  # out of the default run's 25-minute budget on 2 cores without bf16 units
def test_runs_get_their_own_folders_and_resume_takes_the_latest(small_data, tmp_path):
    """Without --out each run gets runs/PRESET/DATE-TIME (under the working folder), runs/latest
    points at the newest, and --resume without --out continues that one."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    args = ["fastres", "train", "--data", small_data, *TINY, "--epochs", "1"]
    env = {}
    first = run_cli(*args, cwd=cwd, env=env)
    second = run_cli(*args, cwd=cwd, env=env)
    assert first.returncode == 0 and second.returncode == 0, second.stderr[-3000:]
    runs = sorted((cwd / "runs" / "smoke").iterdir())
    assert len(runs) == 2 and all((r / "record.json").is_file() for r in runs)  # nothing overwritten
    latest = cwd / "runs" / "latest"
    assert latest.is_symlink() and latest.resolve() == runs[-1].resolve()
    r = run_cli(*args[:-1], "2", "--resume", cwd=cwd, env=env)  # a finished 1-epoch run: settings differ
    assert r.returncode == 2 and "--epochs 1 (now 2)" in r.stderr
    r = run_cli(*args, "--resume", cwd=cwd, env=env)
    assert r.returncode == 0 and f"resumed from {runs[-1].resolve() / 'last.pt'} after epoch 1" in r.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli(*args, "--resume", cwd=empty, env=env)
    assert r.returncode == 2 and "there is no runs/latest to resume" in r.stderr


def test_metrics_csv_tensorboard_and_progress_in_a_log(small_data, tmp_path):
    out = tmp_path / "run"
    r = run_here("fastres", "train", "--data", small_data, "--out", out, *TINY, "--epochs", "2",
                  "--tensorboard", "--progress-s", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((out / "record.json").read_text())
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(x["epoch"]) for x in rows] == [1, 2]
    for x, e in zip(rows, rec["epochs"]):
        for k in ("lr", "train_loss", "train_acc", "test_loss", "test_acc", "train_s", "eval_s", "images_per_s"):
            assert float(x[k]) == e[k]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    got = [(s.step, round(s.value, 6)) for s in acc.Scalars("test_acc")]
    assert got == [(e["epoch"], round(e["test_acc"], 6)) for e in rec["epochs"]]
    # Output is a pipe here, as in a log: plain progress lines (every step with --progress-s 0),
    # no carriage returns, an estimate that says so, and a measured ETA after the first epoch.
    assert "\r" not in r.stdout + r.stderr
    lines = [x for x in r.stdout.splitlines() if x.startswith("epoch 1/2: ")]
    assert len(lines) == 19 and "img/s" in lines[0] and "run ETA" in lines[0], r.stdout  # 20 steps, last is the row
    assert "estimated time for 2 epoch(s)" in r.stdout and "median" in r.stdout
    assert "measured" in r.stdout and "left (estimate" in r.stdout
    assert rec["environment"]["ffcv"] == "1.0.2"  # the installed distribution's version


@pytest.mark.slow  # out of the default run's 25-minute budget on 2 cores without bf16 units
def test_estimate_covers_only_the_epochs_left(small_data, tmp_path):
    out = tmp_path / "run"
    r = run_cli("fastres", "train", "--data", small_data, "--out", out, *TINY, "--epochs", "3",
                "--progress-s", "100")
    assert r.returncode == 0 and "estimated time for 3 epoch(s)" in r.stdout
    ck = out / "last.pt"  # made to look like a run stopped after its first epoch
    c = torch.load(ck, weights_only=False)
    c["epoch"], c["history"] = 1, c["history"][:1]
    torch.save(c, ck)
    r = run_cli("fastres", "train", "--data", small_data, "--out", out, *TINY, "--epochs", "3", "--resume")
    assert r.returncode == 0 and "estimated time for 2 epoch(s)" in r.stdout, r.stdout


@pytest.mark.long
def test_compare_prints_a_table_and_draws_accuracy_against_time(small_data, tmp_path):
    from fastres.config import make_config, parse_overrides
    from fastres.train import train

    runs = []
    for lr in ("0.1", "0.05"):  # trained here (the command's own test is test_train's); compared by the command
        out = tmp_path / f"lr{lr}"
        o = parse_overrides(TINY[2:] + ["--data", str(small_data), "--out", str(out), "--epochs", "2", "--lr", lr,
                                        "--train-limit", "600", "--test-limit", "200"])
        train(make_config("smoke", o), log=lambda *a, **k: None)
        runs.append(out)
    png = tmp_path / "cmp.png"
    r = run_here("fastres", "compare", *runs, "--png", png)
    assert r.returncode == 0, r.stderr
    head, *rows = r.stdout.splitlines()[:3]
    assert head.split()[:2] == ["run", "preset"] and "final_acc" in head and "epoch_s" in head
    for run, line in zip(runs, rows):
        rec = json.loads((run / "record.json").read_text())
        assert line.startswith(str(run))
        assert f"{rec['final_test_acc']:.2%}" in line
        assert f"{sum(e['train_s'] for e in rec['epochs']):.1f}" in line
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = run_here("fastres", "compare", tmp_path / "missing")
    assert r.returncode == 2 and "no run record" in r.stderr and "Traceback" not in r.stderr


def test_quiet_start_on_cpu(small_data, tmp_path):
    """No CUDA warning from torch, and a fallback's reason printed once."""
    r = run_cli("fastres", "train", "--data", small_data, "--out", tmp_path / "r", "--preset", "smoke", "--depth", "8",
                "--epochs", "1", "--train-limit", "500", "--test-limit", "200", "--batch-size", "100",
                "--fused-bn-relu", env={"TRITON_INTERPRET": "0"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "No CUDA runtime" not in r.stderr
    assert r.stdout.count("Triton kernels need CUDA") == (0 if torch.cuda.is_available() else 1)
    assert os.path.exists(tmp_path / "r" / "curves.png")
