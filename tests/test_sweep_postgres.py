"""One study on a real PostgreSQL server shared by workers of two "machines" (two processes that
name different hosts, each with its own sweep folder): every configuration runs once; a worker
killed on one machine has its trial taken up on the other once its heartbeat is stale, resumed
from the shared folder's checkpoint.

The server is started here from the PostgreSQL binaries (Debian's postgresql package, which
scripts/install.sh installs) in a temporary folder, and stopped at the end."""
from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest

from conftest import REPO
from test_sweep import _wait_for_epochs, sweep_file


def _pg_bin(name: str) -> str | None:
    """On PATH, else Debian's place for it (the newest version there)."""
    return shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)


@pytest.fixture(scope="module")
def postgres():
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        msg = "PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's postgresql package"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    # PostgreSQL refuses to run as root: as root, the server runs as the postgres user, in a
    # folder of its own under /tmp (pytest's tmp folders are private to root)
    as_pg = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="fastres-pg-"))
    if as_pg:
        shutil.chown(root, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    run = lambda *cmd: subprocess.run([*as_pg, *cmd], check=True, capture_output=True, text=True, timeout=120)
    run(initdb, "-D", str(data), "-A", "trust", "-U", "fastres", "--no-sync")
    run(pg_ctl, "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "-o",
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user="fastres", dbname="postgres", autocommit=True) as con:
            con.execute("CREATE DATABASE sweeps")
        yield f"postgresql://fastres@127.0.0.1:{port}/sweeps"
    finally:
        subprocess.run([*as_pg, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def _worker(path: Path, out: Path, url: str, host: str) -> subprocess.Popen:
    env = {**os.environ, "FASTRES_WORKER_HOST": host, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "fastres", "sweep", str(path), "--out", str(out), "--storage", url],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _study(url: str, name: str):
    return optuna.load_study(study_name=name, storage=url)


@pytest.mark.long
def test_two_machines_share_one_study_on_postgresql(tmp_path, small_data, postgres, monkeypatch):
    from fastres.sweep import run_sweep_file

    path = sweep_file(tmp_path, small_data, "lr = [0.02, 0.05, 0.1, 0.2, 0.3, 0.4]", top='name = "machines"')
    # machine a: another process; machine b: this one, at the same time
    a = _worker(path, tmp_path / "a", postgres, "a")
    monkeypatch.setenv("FASTRES_WORKER_HOST", "b")
    assert run_sweep_file(str(path), str(tmp_path / "b"), postgres, log=lambda *a, **k: None) == 0
    out = a.communicate(timeout=600)[0]
    assert a.returncode == 0, out[-3000:]
    ts = _study(postgres, "machines").get_trials()
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in ts)
    assert sorted(t.params["lr"] for t in ts) == [0.02, 0.05, 0.1, 0.2, 0.3, 0.4]  # each once
    by_host = {h: [t for t in ts if t.user_attrs["host"] == h] for h in "ab"}
    assert by_host["a"] and by_host["b"]
    for h, mine in by_host.items():  # each machine's runs in its own folder
        for t in mine:
            rec = json.loads((tmp_path / h / t.user_attrs["folder"] / "seed0" / "record.json").read_text())
            assert rec["status"] == "finished" and rec["final_test_acc"] == t.value
            assert not (tmp_path / ("b" if h == "a" else "a") / t.user_attrs["folder"]).exists()
    # each machine's leaderboard is the whole study's
    for h in "ab":
        with open(tmp_path / h / "leaderboard.csv") as f:
            rows = list(csv.DictReader(f))
        assert sorted(float(r["lr"]) for r in rows) == [0.02, 0.05, 0.1, 0.2, 0.3, 0.4]
        assert {r["state"] for r in rows} == {"complete"}


@pytest.mark.long
def test_a_dead_machines_trial_is_taken_up_elsewhere_after_its_heartbeat(tmp_path, small_data, postgres, monkeypatch):
    from fastres.sweep import run_sweep_file

    # one folder on storage both machines see (a shared filesystem), heartbeat every second
    path = sweep_file(tmp_path, small_data, "lr = [0.1]", top='name = "heartbeat"\nheartbeat_s = 1', epochs=3)
    out = tmp_path / "shared"
    run = out / "trials" / "0000" / "seed0"
    a = _worker(path, out, postgres, "a")
    _wait_for_epochs(run, 1, a)
    a.send_signal(signal.SIGKILL)
    a.wait()
    t0 = time.monotonic()
    # machine b (this process): it cannot tell a's pid, only that a's heartbeat stopped
    monkeypatch.setenv("FASTRES_WORKER_HOST", "b")
    lines = []
    assert run_sweep_file(str(path), str(out), postgres, log=lines.append) == 0
    log = "\n".join(map(str, lines))
    ts = _study(postgres, "heartbeat").get_trials()
    assert [t.state for t in ts] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    assert ts[0].user_attrs["host"] == "a" and ts[1].user_attrs["host"] == "b"
    assert ts[1].system_attrs["failed_trial"] == 0 and ts[1].user_attrs["folder"] == "trials/0000"
    assert "its worker (pid" not in log  # not taken by the same-machine rule
    rec = json.loads((run / "record.json").read_text())
    assert rec["status"] == "finished" and rec["resumed_at_epoch"] >= 1 and ts[1].value == rec["final_test_acc"]
    assert time.monotonic() - t0 < 300
