"""Sweeps on a real Optuna study in SQLite, with real worker processes: a grid shared by two
workers (each configuration run once), over-budget configurations recorded and never trained,
pruning, a worker stopped (Ctrl-C) and killed (SIGKILL) whose trial resumes to the same result as
an uninterrupted run, and storages that cannot be used refused with one line.

The expected values are built from the trials' own record.json files, not from the study."""
from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from conftest import REPO, run_cli
from fastres.cli import main
from fastres.config import from_dict

# A model of a few thousand parameters on the 2,000-image slice: seconds per trial on a CPU.
FIXED = """
[fixed]
data = "{data}"
blocks = [1, 1, 1]
widths = [8, 16, 32]
train_limit = 1000
test_limit = 300
batch_size = 100
eval_batch_size = 500
compile_augment = false
loader_workers = 1
progress_s = 30
epochs = {epochs}
"""


def sweep_file(tmp_path: Path, data: Path, space: str, top: str = "", epochs: int = 1, name="study.toml") -> Path:
    p = tmp_path / name
    p.write_text(f'preset = "smoke"\n{top}\n' + FIXED.format(data=data, epochs=epochs) + f"\n[space]\n{space}\n")
    return p


def trials(out: Path, name: str = "study") -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / 'study.db'}")
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("seed*/record.json"))]


@pytest.mark.long
def test_two_workers_share_a_grid_each_configuration_once(tmp_path, small_data):
    space = 'widths = [[8, 16, 32], [16, 32, 64], [64, 128, 256]]\nlr = [0.1]'
    path = sweep_file(tmp_path, small_data, space, top='seeds = [0, 1]\nmax_params = "100k"')
    out = tmp_path / "sweep"
    # each trial's two seeds packed (--pack 2) in its worker
    r = run_cli("fastres", "sweep", path, "--out", out, "--workers", "2", "--pack", "2", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "grid of 3 configurations" in r.stdout and "estimate: about" in r.stdout

    ts = trials(out)
    done = [t for t in ts if t.state == optuna.trial.TrialState.COMPLETE]
    # each trainable configuration exactly once, the over-budget one recorded as such, untrained
    assert sorted(t.params["widths"] for t in done) == ["16,32,64", "8,16,32"]
    assert len(ts) == 3
    over = [t for t in ts if t.user_attrs.get("status") == "over_budget"]
    assert [t.params["widths"] for t in over] == ["64,128,256"] and over[0].state == optuna.trial.TrialState.PRUNED
    assert over[0].user_attrs["parameters"] > 100_000
    assert not list((out / over[0].user_attrs["folder"]).glob("seed*/record.json"))
    # both worker processes took trials
    assert len({t.user_attrs["pid"] for t in done}) == 2
    for t in done:
        recs = records(out / t.user_attrs["folder"])
        assert [r["config"]["seed"] for r in recs] == [0, 1] and all(r["status"] == "finished" for r in recs)
        assert from_dict(recs[0]["config"]).widths == tuple(map(int, t.params["widths"].split(",")))
        acc = [r["final_test_acc"] for r in recs]
        assert t.value == pytest.approx(statistics.fmean(acc))
        assert t.user_attrs["acc_std"] == pytest.approx(statistics.stdev(acc))
        assert t.user_attrs["parameters"] == recs[0]["parameters"] and t.user_attrs["macs"] == recs[0]["macs"]
        assert t.user_attrs["train_s"] == pytest.approx(sum(r["train_s_total"] for r in recs), abs=1e-3)

    # the leaderboard: ranked by value, CSV and both plots written
    with open(out / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:6] == ["rank", "trial", "state", "widths", "lr", "parameters"]
    assert [float(r["acc_mean"]) for r in rows[:2]] == sorted((t.value for t in done), reverse=True)
    assert [r["rank"] for r in rows[:2]] == ["1", "2"] and rows[2]["state"] == "over_budget"
    # the Pareto column: a trial is on it unless another has no more parameters and no less accuracy
    pts = [(int(r["parameters"]), float(r["acc_mean"])) for r in rows[:2]]
    beaten = [any(q != p and q[0] <= p[0] and q[1] >= p[1] for q in pts) for p in pts]
    assert [r["pareto"] == "True" for r in rows[:2]] == [not b for b in beaten]
    for png in ("accuracy_vs_params.png", "accuracy_vs_time.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "over budget  0002 (widths=64,128,256 lr=0.1)" in r.stdout
    assert (out / "logs" / "worker-0.log").is_file() and "[worker 1] trial" in r.stdout
    assert "[worker 0] packed 2 runs" in r.stdout


def _wait_for_epochs(folder: Path, n: int, proc: subprocess.Popen, timeout: float = 300):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if len(json.loads((folder / "record.json").read_text())["epochs"]) >= n:
                return
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"{folder}: {n} epochs not written in {timeout} s")


def _start(path: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "fastres", "sweep", str(path), "--out", str(out), *extra], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.long
def test_stopped_and_killed_worker_trial_resumes_to_the_uninterrupted_result(tmp_path, small_data):
    from fastres.train import train

    path = sweep_file(tmp_path, small_data, "lr = [0.1]", epochs=3)
    out = tmp_path / "sweep"
    run = out / "trials" / "0000" / "seed0"

    # 1. Ctrl-C after the first epoch: the worker stops at a safe point, the trial is queued again
    p = _start(path, out)
    _wait_for_epochs(run, 1, p)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert "fastres: interrupted:" in stderr and "Traceback" not in stderr
    # 2. SIGKILL after the next epoch: no chance to clean up
    p = _start(path, out)
    _wait_for_epochs(run, 2, p)
    p.kill()
    p.wait()
    # 3. the same command again (here, in this process) takes the dead worker's trial up at once
    # and finishes it
    lines = []
    from fastres.sweep import run_sweep_file

    assert run_sweep_file(str(path), str(out), log=lines.append) == 0
    assert any("its worker (pid" in line and "queued again" in line for line in lines), lines

    ts = trials(out)
    states = [t.state for t in ts]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    assert [t.user_attrs.get("status") for t in ts] == ["requeued", "requeued", "complete"]
    assert all(t.user_attrs["folder"] == "trials/0000" for t in ts)
    rec = json.loads((run / "record.json").read_text())
    assert rec["status"] == "finished" and rec["resumed_at_epoch"] >= 2
    assert ts[-1].value == rec["final_test_acc"]

    # an uninterrupted run of the same configuration gives the same epochs, to the bit
    cfg = from_dict({**rec["config"], "out": str(tmp_path / "alone")})
    alone = train(cfg, log=lambda *a, **k: None)
    keys = ("train_loss", "train_acc", "test_loss", "test_acc", "lr")
    assert [{k: h[k] for k in keys} for h in rec["epochs"]] == [{k: h[k] for k in keys} for h in alone["epochs"]]


@pytest.mark.long
def test_a_packed_worker_fills_freed_slots_with_the_next_trials_and_resumes_them(tmp_path, small_data):
    import sqlite3

    from fastres.sweep import run_sweep_file
    from fastres.train import train

    # three configurations, one seed each, two at a time in one worker
    path = sweep_file(tmp_path, small_data, "lr = [0.05, 0.1, 0.2]", epochs=3)
    out = tmp_path / "sweep"
    first = [out / "trials" / f"{n:04d}" / "seed0" for n in (0, 1)]

    # 1. Ctrl-C once the first two trials, training together, each have an epoch: both are queued again
    p = _start(path, out, "--pack", "2")
    for run in first:
        _wait_for_epochs(run, 1, p, timeout=120)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert "packed 2 runs" in stdout and "Traceback" not in stderr
    ts = trials(out)
    assert [(t.state, t.user_attrs.get("status")) for t in ts[:2]] == [(optuna.trial.TrialState.FAIL, "requeued")] * 2
    queued = [t.system_attrs["fixed_params"]["lr"] for t in ts if t.state == optuna.trial.TrialState.WAITING]
    assert sorted(queued) == [0.05, 0.1, 0.2]  # the two again, and the third not started yet

    # 2. the same command again (here, in this process) finishes all three, still two at a time
    lines = []
    assert run_sweep_file(str(path), str(out), log=lines.append, pack=2) == 0
    done = sorted((t for t in trials(out) if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.datetime_start)
    assert sorted(t.user_attrs["folder"] for t in done) == ["trials/0000", "trials/0001", "trials/0002"]
    a, b, c = done  # in the order they started (the queue hands out the untouched third before the retries)
    # the first two trained at the same time; the third started in the first slot they freed
    assert a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete
    assert c.datetime_start >= min(a.datetime_complete, b.datetime_complete)
    recs = {t.number: json.loads((out / t.user_attrs["folder"] / "seed0" / "record.json").read_text()) for t in done}
    for t in done:
        assert recs[t.number]["status"] == "finished" and t.value == recs[t.number]["final_test_acc"]
        # the two stopped trials resumed their checkpoints; the third started afresh
        assert (recs[t.number]["resumed_at_epoch"] >= 1) == (t.user_attrs["folder"] != "trials/0002")
    # Optuna's heartbeat was kept for every trial in flight (it is how other workers tell a live one)
    with sqlite3.connect(out / "study.db") as con:
        beating = {row[0] for row in con.execute("SELECT trial_id FROM trial_heartbeats")}
    assert {t._trial_id for t in done} <= beating

    # the one that joined the group mid-way (resumed) and the one trained packed from the start
    # equal the same runs trained alone
    keys = ("train_loss", "train_acc", "test_loss", "test_acc", "lr")
    fresh = next(t for t in done if t.user_attrs["folder"] == "trials/0002")
    for t in {c.number: c, fresh.number: fresh}.values():
        rec = recs[t.number]
        alone = train(from_dict({**rec["config"], "out": str(tmp_path / f"alone{t.number}")}), log=lambda *a, **k: None)
        assert [{k: h[k] for k in keys} for h in rec["epochs"]] == [{k: h[k] for k in keys} for h in alone["epochs"]]


@pytest.mark.long
@pytest.mark.parametrize("packed", [False, True], ids=["alone", "two_seeds_packed"])
def test_median_pruner_stops_a_trial_that_trails_the_others(tmp_path, small_data, packed):
    # two startup trials that learn, then one whose lr leaves it at chance level; packed: two seeds
    # a trial, trained together, the first seed's accuracy judged
    top = 'pruner = "median"' + ("\nseeds = [0, 1]" if packed else "")
    path = sweep_file(tmp_path, small_data, "lr = [0.2, 0.1, 1e-7]", top=top, epochs=3)
    out = tmp_path / "sweep"
    assert main(["sweep", str(path), "--out", str(out), *(["--pack", "2"] if packed else [])]) == 0
    ts = trials(out)
    assert [t.state for t in ts[:2]] == [optuna.trial.TrialState.COMPLETE] * 2
    bad = ts[2]
    assert bad.state == optuna.trial.TrialState.PRUNED and bad.user_attrs["status"] == "pruned"
    step = bad.user_attrs["pruned_at_epoch"]
    assert 2 <= step < 3  # not in the warm-up epoch, before the end
    # the pruner's rule, computed here: below the median of the earlier trials at that epoch
    assert bad.intermediate_values[step] < statistics.median(t.intermediate_values[step] for t in ts[:2])
    for seed in (0, 1) if packed else (0,):
        # packed: the second seed, training beside the first, ended with it at the same epoch
        rec = json.loads((out / "trials" / "0002" / f"seed{seed}" / "record.json").read_text())
        assert rec["status"] == "pruned" and len(rec["epochs"]) == step
        assert (out / "trials" / "0002" / f"seed{seed}" / "last.pt").is_file()


def test_unusable_storages_and_folders_stop_with_one_line(tmp_path, small_data, capsys):
    path = sweep_file(tmp_path, small_data, "lr = [0.1, 0.2]")

    def fails(args, status, words):
        assert main(["sweep", str(path), *map(str, args)]) == status
        err = capsys.readouterr().err.strip()
        assert err.startswith("fastres: error: ") and len(err.splitlines()) == 1, err
        assert all(w in err for w in words), err

    # nothing listens on this port: refused in seconds, the password never shown, nothing made
    fails(["--out", tmp_path / "a", "--storage", "postgresql://me:secret@127.0.0.1:9/db"], 2,
          ["cannot open the study storage", "127.0.0.1:9"])
    assert not (tmp_path / "a").exists()
    # a folder under a file cannot be made: exit status 4
    (tmp_path / "file").write_text("")
    fails(["--out", tmp_path / "file" / "sweep"], 4, ["cannot create the sweep folder"])
    # a study of this name made by another sweep file: refused, naming what differs
    from fastres.study import claim_folder, open_storage, open_study
    from fastres.sweepfile import load_sweep

    other = tmp_path / "other"
    other.mkdir()
    (other / "study.toml").write_text(path.read_text().replace("lr = [0.1, 0.2]", "lr = [0.3]"))
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    open_study(load_sweep(other / "study.toml"), open_storage(url), url)
    fails(["--out", tmp_path / "b", "--storage", url], 2, ["belongs to another sweep file", "space: lr differ"])
    assert not (tmp_path / "b").exists()
    # a sweep folder holding another sweep's trials
    (tmp_path / "d").mkdir()
    claim_folder(tmp_path / "d", load_sweep(other / "study.toml"), url)
    fails(["--out", tmp_path / "d"], 2, ["holds the trials of another sweep", "space: lr differ"])
    # an SQLite file another process keeps locked past the sweep's storage timeout
    import sqlite3

    (tmp_path / "locked").mkdir()
    con = sqlite3.connect(tmp_path / "locked" / "study.db", isolation_level=None)
    con.execute("CREATE TABLE t (x)")
    con.execute("BEGIN EXCLUSIVE")
    short = sweep_file(tmp_path, small_data, "lr = [0.1, 0.2]", top="storage_timeout_s = 0.5", name="short.toml")
    assert main(["sweep", str(short), "--out", str(tmp_path / "locked")]) == 2
    err = capsys.readouterr().err.strip()
    assert "database is locked" in err and len(err.splitlines()) == 1, err
    con.execute("ROLLBACK")
    con.close()
    # a report of a study that does not exist yet writes nothing
    fails(["--out", tmp_path / "c", "--report"], 2, ["no study at"])
    assert not (tmp_path / "c").exists()


def test_time_limit_starts_no_trial_after_it_and_the_rest_stay_queued(tmp_path, small_data):
    from fastres.sweep import run_sweep_file

    path = sweep_file(tmp_path, small_data, "lr = [0.05, 0.1, 0.2]", top='time_limit = "1s"')
    lines = []
    assert run_sweep_file(str(path), str(tmp_path / "sweep"), log=lines.append) == 0
    ts = trials(tmp_path / "sweep")
    # the first trial starts at once and takes longer than a second; then no other starts
    assert [t.state for t in ts] == [optuna.trial.TrialState.COMPLETE] + [optuna.trial.TrialState.WAITING] * 2
    assert any("time limit (1.0 s) reached" in str(line) for line in lines)
    assert "not finished: 0 running, 2 queued" in "\n".join(map(str, lines))


def test_a_full_disk_in_a_trial_names_the_command_that_continues_the_sweep(tmp_path, small_data, monkeypatch,
                                                                           capsys):
    """A checkpoint that cannot be written (the disk full) stops the sweep with exit 4 and the
    command that continues it (not train's --resume, which `fastres sweep` lacks); that command,
    once there is room, finishes the sweep."""
    import errno

    import fastres.checkpoint as T  # where the checkpoint is written

    path = sweep_file(tmp_path, small_data, "lr = [0.1]")
    out = tmp_path / "sweep"
    real = T.atomic_write

    def full_disk(p, write):
        if p.name == "last.pt":
            def enospc(tmp):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
            return real(p, enospc)
        return real(p, write)

    monkeypatch.setattr(T, "atomic_write", full_disk)
    assert main(["sweep", str(path), "--out", str(out)]) == 4
    err = capsys.readouterr().err
    assert "No space left on device" in err and "--resume" not in err, err
    assert f"then continue the sweep with: fastres sweep {path} --out {out}" in err, err
    monkeypatch.setattr(T, "atomic_write", real)
    assert main(["sweep", str(path), "--out", str(out)]) == 0
    assert [t.state for t in trials(out)][-1] == optuna.trial.TrialState.COMPLETE
