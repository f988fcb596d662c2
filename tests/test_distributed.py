"""torchrun data-parallel training on CPU (Gloo, 2 processes)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from conftest import REPO

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def torchrun(*args, timeout=600, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTRES_DIST_TIMEOUT": "30"}
    return subprocess.run([*TORCHRUN, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


def train_args(data, out, *extra):
    return ["-m", "fastres", "train", "--data", data, "--out", out, "--preset", "smoke", "--depth", "8",
            "--train-limit", "0", "--epochs", "2", "--batch-size", "100", "--loader-workers", "1",
            "--compile-augment", "false", *extra]


def _file_fingerprints(path):
    """Fingerprints of every image of a .beton, read sequentially (independently of Batches)."""
    import hashlib
    import torch
    from fastres.data import make_loader

    fp = []
    for x, _ in make_loader(path, 500, torch.device("cpu"), train=False, num_workers=1):
        fp += [int.from_bytes(hashlib.sha1(img.tobytes()).digest()[:8], "little", signed=True) for img in x.numpy()]
    return fp


def test_rank_shards_are_disjoint_and_cover_the_epoch_and_the_test_set(small_data, tmp_path):
    """From the images each rank's Batches delivers: training shards disjoint and together the
    whole epoch, reshuffled per epoch; test shards disjoint and together the whole test set."""
    r = torchrun(REPO / "tests" / "dist_scripts" / "shards.py", small_data, tmp_path, 200)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = np.load(tmp_path / "rank0.npz"), np.load(tmp_path / "rank1.npz")
    train = _file_fingerprints(small_data / "cifar10_train.beton")
    test = _file_fingerprints(small_data / "cifar10_test.beton")
    assert len(set(train)) == 2000 and len(set(test)) == 500  # the slices hold no duplicate images
    for e in ("epoch0", "epoch1"):
        assert len(a[e]) == len(b[e]) == 1000  # 2,000 images, per-rank batch 100: nothing dropped
        assert not set(a[e]) & set(b[e])
        assert sorted(np.concatenate([a[e], b[e]])) == sorted(train)
    assert not np.array_equal(a["epoch0"], a["epoch1"])  # reshuffled per epoch
    assert not set(a["test"]) & set(b["test"])
    assert sorted(np.concatenate([a["test"], b["test"]])) == sorted(test)


def test_ddp_gradients_equal_single_process_on_the_whole_batch(tmp_path):
    r = torchrun(REPO / "tests" / "dist_scripts" / "grads.py", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "grads_ok").read_text() == "ok"


@pytest.mark.long
def test_two_process_run_matches_single_process_and_resumes(small_data, tmp_path):
    r = torchrun(*train_args(small_data, tmp_path / "ddp"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("final test accuracy") == 1  # only rank 0 prints
    rec = json.loads((tmp_path / "ddp" / "record.json").read_text())
    assert (rec["world_size"], rec["backend"], rec["per_rank_batch"]) == (2, "gloo", 50)
    assert rec["num_train"] == 2000 and rec["steps_per_epoch"] == 20 and rec["status"] == "finished"
    assert rec["num_test"] == 500  # counted from the images both ranks evaluated

    from fastres.cli import main

    assert main(list(map(str, train_args(small_data, tmp_path / "one")[2:]))) == 0  # one process: this one
    one = json.loads((tmp_path / "one" / "record.json").read_text())
    # Same global batch and lr: accuracy within a few points (BN statistics are per rank).
    assert abs(rec["final_test_acc"] - one["final_test_acc"]) < 0.08, (rec["final_test_acc"], one["final_test_acc"])
    # --resume works distributed: killed after its first checkpoint, resumed, same record.
    cut = tmp_path / "cut"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTRES_DIST_TIMEOUT": "30"}
    p = subprocess.Popen([*TORCHRUN, *map(str, train_args(small_data, cut))], cwd=REPO, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.time()
    while not (cut / "last.pt").exists():
        assert p.poll() is None and time.time() - t0 < 300
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    r = torchrun(*train_args(small_data, cut, "--resume"))
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    again = json.loads((cut / "record.json").read_text())
    keys = ("train_loss", "train_acc", "test_loss", "test_acc", "lr")
    assert [[e[k] for k in keys] for e in again["epochs"]] == [[e[k] for k in keys] for e in rec["epochs"]]


def test_killing_one_rank_ends_the_job(small_data, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTRES_DIST_TIMEOUT": "30"}
    p = subprocess.Popen([*TORCHRUN, *map(str, train_args(small_data, out, "--epochs", "50"))], cwd=REPO, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        t0 = time.time()
        while not (out / "last.pt").exists():  # training is under way on both ranks
            assert p.poll() is None and time.time() - t0 < 300
            time.sleep(0.1)
        workers = [c for c in psutil.Process(p.pid).children(recursive=True) if "fastres" in " ".join(c.cmdline())]
        assert len(workers) == 2
        victim = workers[-1]
        victim.send_signal(signal.SIGKILL)
        t_kill = time.time()
        rc = p.wait(timeout=120)
        assert rc != 0
        assert time.time() - t_kill < 90
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
