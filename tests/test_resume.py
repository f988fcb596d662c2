"""Exact resume: a run killed with SIGKILL (twice: once after its first checkpoint, once in the
middle of a resumed run's training) and resumed ends with exactly the metrics and weights of an
uninterrupted run, for the settings long runs use, each optimizer and each augmentation. The
kills are timed from the checkpoint on disk, not from printed output, so buffering cannot move
them."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, run_cli

EPOCHS = 3  # killed after epoch 1's checkpoint, killed again after epoch 2's, resumed to the end
BASE = ["--depth", "8", "--train-limit", "1000", "--test-limit", "200", "--epochs", str(EPOCHS), "--batch-size", "100",
        "--loader-workers", "2"]
SETTINGS = {
    # What the tuned recipe uses: EMA (with its warm-up), lr warm-up, per-step cosine, Nesterov,
    # label smoothing; and the compiled augmentation.
    "ema_warmup_cosine_step_compiled_augment": ["--preset", "tuned", "--warmup-epochs", "1", "--tta", "false",
                                                "--compile-augment", "true"],
    # The paper's schedule: CosineAnnealingLR stepped per epoch; data held on the device.
    "cosine_epoch_resident_data": ["--preset", "paper", "--lr", "0.05", "--compile-augment", "false",
                                   "--data-placement", "device"],
    # AdamW through the whole step's own update (uncaptured on a CPU) in fp16 with loss scaling,
    # with cutout, mixup and cutmix: the scaler's state, the skipped steps, Adam's step count
    # (which skipped steps do not advance) and the augmentations' draws (the epoch's generator,
    # and (seed, epoch, step)). Adam's and the usual step's resume: test_optimizers.py (the whole
    # step's state loaded into torch's Adam/AdamW). A smaller model and fewer images: a CPU without
    # fp16 arithmetic emulates it (about 4x slower than fp32 here).
    "adamw_fp16_whole_step_cutout_mixup_cutmix": [
        "--preset", "paper", "--optimizer", "adamw", "--lr", "0.002", "--weight-decay", "0.05", "--amp", "fp16",
        "--whole-step", "on", "--cutout", "8", "--mixup", "0.4", "--cutmix", "1.0", "--widths", "8,16,32",
        "--train-limit", "400", "--batch-size", "50", "--compile-augment", "false"],
}


def args(data, out, setting, *extra):
    return ["fastres", "train", "--data", data, "--out", out, *BASE, *SETTINGS[setting], *extra]  # a setting's own win


def start(a):
    return subprocess.Popen([sys.executable, "-m", *map(str, a)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def checkpoint_epoch(out):
    try:
        return torch.load(out / "last.pt", weights_only=False)["epoch"]
    except Exception:  # not there yet (written by rename, so never half-read)
        return 0


def wait_until(pred, proc, timeout=300):
    t0 = time.time()
    while not pred():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() - t0 < timeout
        time.sleep(0.02)


# The resident-data case runs with `pytest -m slow` (the default run's 25-minute budget on 2 cores
# without bf16 units); test_resident.py checks that resume keeps the placement.
@pytest.mark.long
@pytest.mark.parametrize("setting", [pytest.param(s, marks=pytest.mark.slow) if "resident" in s else s
                                     for s in SETTINGS])
def test_sigkilled_twice_and_resumed_matches_an_uninterrupted_run(small_data, tmp_path, setting):
    from fastres.cli import main

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    # the uninterrupted reference in this process (as many threads as the runs started below: a
    # process start less per case)
    assert main(list(map(str, args(small_data, ref, setting)[1:]))) == 0

    # 1) killed once its first checkpoint is on disk (epoch 2 is under way)
    p = start(args(small_data, cut, setting))
    wait_until(lambda: checkpoint_epoch(cut) >= 1, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    first = checkpoint_epoch(cut)
    assert 1 <= first < EPOCHS
    # 2) resumed, and killed in the middle of training: after the resumed run wrote its own next
    #    checkpoint, a little into the following epoch
    p = start(args(small_data, cut, setting, "--resume"))
    wait_until(lambda: checkpoint_epoch(cut) > first, p)
    time.sleep(0.3)
    assert p.poll() is None, "the resumed run finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    second = checkpoint_epoch(cut)
    assert first < second < EPOCHS
    # What a kill during a checkpoint write leaves: a partial temporary file of a dead process.
    stale = cut / ".last.pt.tmp-999999"
    stale.write_bytes((cut / "last.pt").read_bytes()[:1000])
    # 3) resumed to the end
    r = run_cli(*args(small_data, cut, setting, "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {cut / 'last.pt'} after epoch {second}" in r.stdout
    assert not stale.exists()  # the dead process's leftover is removed

    a, b = (json.loads((d / "record.json").read_text()) for d in (ref, cut))
    metrics = ("lr", "train_loss", "train_acc", "test_loss", "test_acc")
    assert [[e[k] for k in metrics] for e in a["epochs"]] == [[e[k] for k in metrics] for e in b["epochs"]]
    ca, cb = (torch.load(d / "last.pt", weights_only=False) for d in (ref, cut))
    for part in ("model", "ema") if ca["ema"] is not None else ("model",):
        assert all(torch.equal(ca[part][k], cb[part][k]) for k in ca[part]), part
    assert ca["ema_updates"] == cb["ema_updates"]
    assert ca["loss_scaling"] == cb["loss_scaling"] and a["loss_scaling"] == b["loss_scaling"]  # fp16: scale, skipped
    assert ca["optimizer"]["state"].keys() == cb["optimizer"]["state"].keys()
    for k, s in ca["optimizer"]["state"].items():  # SGD's momentum; Adam's moments and step count
        assert s.keys() == cb["optimizer"]["state"][k].keys()
        for name, t in s.items():
            assert torch.equal(t, cb["optimizer"]["state"][k][name]), name
