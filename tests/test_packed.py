"""Packed runs (--pack K): several runs advanced in turn in one process end with exactly the
records and weights of the same runs trained alone (on a CPU the arithmetic is deterministic),
share one copy of resident data, survive a member that diverges, and stop and resume as one run
does: a packed group killed with SIGKILL resumes, packed or alone, to the uninterrupted result.

(data_prep's offline pack is test_offline_scripts.py / test_pack.py; this is training.)"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, run_here
from fastres.config import make_config
from fastres.errors import Diverged

TINY = dict(depth=8, widths="8,16,32", train_limit=1000, test_limit=300, epochs=2, batch_size=100,
            eval_batch_size=300, loader_workers=1, compile_augment=False, progress_s=0)
KEYS = ("train_loss", "train_acc", "test_loss", "test_acc", "lr")


def cfg(data, out, **kw):
    return make_config("smoke", {**TINY, "data": str(data), "out": str(out), **kw})


def epochs(rec):
    return [{k: h[k] for k in KEYS} for h in rec["epochs"]]


def weights(out):
    return torch.load(out / "last.pt", weights_only=False)["model"]


def same_weights(a, b):
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.long
def test_packed_runs_equal_the_same_runs_alone_and_share_resident_data(small_data, tmp_path, monkeypatch):
    from fastres import data as D
    from fastres.packed import train_packed
    from fastres.train import train

    quiet = lambda *a, **k: None
    # two seeds of one recipe, and a different model at another batch size; data on the device
    # (on a CPU: in memory), so that the group shares it and each run permutes it by its own seed
    # (the second in fp16 with loss scaling, which keeps a scaler of its own)
    group = [dict(seed=0), dict(seed=1, amp="fp16"), dict(seed=2, depth=14, widths="8,16,32", batch_size=50, lr=0.05)]
    group = [{**g, "data_placement": "device"} for g in group]
    reads = []
    real = D.read_all
    monkeypatch.setattr(D, "read_all", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    packed = train_packed([cfg(small_data, tmp_path / f"p{i}", **g) for i, g in enumerate(group)], log=quiet)
    assert len(reads) == 2  # the training and test sets, once for the three runs
    alone = [train(cfg(small_data, tmp_path / f"a{i}", **g), log=quiet) for i, g in enumerate(group)]
    for i, (p, a) in enumerate(zip(packed, alone)):
        assert p["status"] == "finished" and len(p["epochs"]) == 2
        assert epochs(p) == epochs(a), f"run {i}"
        assert same_weights(tmp_path / f"p{i}", tmp_path / f"a{i}"), f"run {i}"
    assert epochs(packed[0]) != epochs(packed[1])  # the seeds differ: a real comparison
    assert packed[1]["loss_scaling"] is not None and packed[1]["loss_scaling"] == alone[1]["loss_scaling"]


def test_a_diverging_member_ends_alone_and_the_others_finish(small_data, tmp_path):
    from fastres.packed import train_packed

    cfgs = [cfg(small_data, tmp_path / "ok0", epochs=1), cfg(small_data, tmp_path / "bad", epochs=1, lr=1e8),
            cfg(small_data, tmp_path / "ok1", epochs=1, seed=1)]
    ok0, bad, ok1 = train_packed(cfgs, log=lambda *a, **k: None)
    assert isinstance(bad, Diverged)
    assert json.loads((tmp_path / "bad" / "record.json").read_text())["status"] == "diverged"
    for r in (ok0, ok1):
        assert r["status"] == "finished" and len(r["epochs"]) == 1


def test_a_packed_group_into_a_folder_of_another_run_is_refused_untouched(small_data, tmp_path):
    held = tmp_path / "g" / "seed1"
    held.mkdir(parents=True)
    (held / "record.json").write_text('{"status": "finished"}')
    before = {p.name: p.read_bytes() for p in held.iterdir()}
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    r = run_here("fastres", "train", "--preset", "smoke", "--data", small_data, "--out", tmp_path / "g", *args,
                  "--seeds", "0", "1", "--pack", "2")
    assert r.returncode == 2 and "holds another run" in r.stderr and "Traceback" not in r.stderr
    assert {p.name: p.read_bytes() for p in held.iterdir()} == before
    assert not list((tmp_path / "g" / "seed0").glob("*.json"))


def _wait(pred, proc, timeout=300):
    t0 = time.monotonic()
    while not pred():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout
        time.sleep(0.05)


def _ck_epoch(out):
    try:
        return torch.load(out / "last.pt", weights_only=False)["epoch"]
    except Exception:
        return 0


@pytest.mark.long
def test_killed_packed_group_resumes_packed_or_alone_to_the_uninterrupted_result(small_data, tmp_path):
    from fastres.packed import train_seeds
    from fastres.train import train

    args = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "epochs": 3}.items()]
    base = ["fastres", "train", "--preset", "smoke", "--data", str(small_data), *args]
    group = tmp_path / "group"
    p = subprocess.Popen([sys.executable, "-m", *base, "--out", str(group), "--seeds", "0", "1", "--pack", "2"],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # SIGKILL once both runs have a checkpoint and at least one is in its next epoch
    _wait(lambda: min(_ck_epoch(group / "seed0"), _ck_epoch(group / "seed1")) >= 1, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    shutil.copytree(group, tmp_path / "copy")
    # resumed packed, and seed 1 of the copy resumed alone (in this process: the same code as the
    # command, without another start-up)
    lines = []
    assert train_seeds(cfg(small_data, group, epochs=3), [0, 1], pack=2, resume=True, log=lines.append) == 0
    assert any("packed 2 runs" in line for line in lines)
    train(cfg(small_data, tmp_path / "copy" / "seed1", epochs=3, seed=1), resume=True, log=lambda *a, **k: None)
    for s, places in ((0, [group]), (1, [group, tmp_path / "copy"])):
        want = train(cfg(small_data, tmp_path / f"alone{s}", epochs=3, seed=s), log=lambda *a, **k: None)
        for where in places:
            got = json.loads((where / f"seed{s}" / "record.json").read_text())
            assert got["status"] == "finished" and got["resumed_at_epoch"] >= 1
            assert epochs(got) == epochs(want), (where, s)
            assert same_weights(where / f"seed{s}", tmp_path / f"alone{s}"), (where, s)


def test_ctrl_c_stops_every_packed_run_resumable(small_data, tmp_path):
    args = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "epochs": 20}.items()]
    group = tmp_path / "group"
    p = subprocess.Popen([sys.executable, "-m", "fastres", "train", "--preset", "smoke", "--data", str(small_data),
                          *args, "--out", str(group), "--seeds", "0", "1", "--pack", "2"],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait(lambda: min(_ck_epoch(group / "seed0"), _ck_epoch(group / "seed1")) >= 1, p)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, out[-2000:] + err[-2000:]
    assert "each resumes" in err and f"--out {group}" in err and "--resume" in err
    for s in (0, 1):
        rec = json.loads((group / f"seed{s}" / "record.json").read_text())
        assert rec["status"] == "interrupted" and _ck_epoch(group / f"seed{s}") == len(rec["epochs"]) >= 1
