"""--data-placement device: both splits held as uint8 tensors on the training device, each epoch
permuted there from (seed, epoch). Checked against the files read independently."""
import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from data_prep import TEST_FILE, TRAIN_FILE
from fastres.data import Batches, augment_normalize, make_loader, sample_crop_flip

CPU = torch.device("cpu")


def file_images(path):
    """uint8 images and labels of a .beton in file order, through FFCV's streaming loader."""
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in make_loader(path, 500, CPU, train=False, num_workers=2)])
    return torch.cat(xs), torch.cat(ys).to(torch.int64)


def raw_epoch(b, epoch):
    """Image indices into the file (found by pixel identity) and labels of one epoch."""
    return [(x.clone(), y.clone()) for x, y in b._train_raw(epoch)]


def index_of(file_x):
    return {img.numpy().tobytes(): i for i, img in enumerate(file_x)}


def test_each_epoch_visits_every_image_once_in_its_own_order(small_data):
    fx, fy = file_images(small_data / TRAIN_FILE)
    where = index_of(fx)
    b = Batches(small_data, 100, 500, CPU, seed=3, placement="device", num_workers=2, augment=False)
    assert len(b) == 20 and b.train_x.dtype == torch.uint8 and b.train_x.shape == (2000, 32, 32, 3)
    orders = []
    for e in range(2):
        idx, labels = [], []
        for x, y in raw_epoch(b, e):
            assert x.shape == (100, 32, 32, 3) and x.dtype == torch.uint8
            idx += [where[img.numpy().tobytes()] for img in x]
            labels.append(y)
        assert sorted(idx) == list(range(2000))  # every image exactly once
        assert torch.equal(torch.cat(labels), fy[idx])  # with its own label
        orders.append(idx)
    assert orders[0] != orders[1]  # epochs differ
    again = Batches(small_data, 100, 500, CPU, seed=3, placement="device", num_workers=2, augment=False)
    assert [where[img.numpy().tobytes()] for x, _ in raw_epoch(again, 1) for img in x] == orders[1]  # same seed
    other = Batches(small_data, 100, 500, CPU, seed=4, placement="device", num_workers=2, augment=False)
    assert [where[img.numpy().tobytes()] for x, _ in raw_epoch(other, 1) for img in x] != orders[1]
    # The augmented, normalized batches are the same pure function of (seed, epoch) too.
    a1 = Batches(small_data, 100, 500, CPU, seed=3, placement="device", num_workers=2)
    a2 = Batches(small_data, 100, 500, CPU, seed=3, placement="device", num_workers=2)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a1.train_epoch(2), a2.train_epoch(2)))


def test_augmented_batches_are_the_raw_batches_cropped_flipped_and_normalized(small_data):
    """Training batches are cropped straight out of the zero-padded resident set: the same images
    as augment_normalize (crop_flip, tested against its definition in test_augment) makes from
    each raw batch with the same draws, eager and compiled."""
    kw = dict(seed=3, placement="device", num_workers=2)
    b = Batches(small_data, 100, 500, CPU, **kw)
    c = Batches(small_data, 100, 500, CPU, compile_augment=True, **kw)
    g = b.epoch_generator(1)
    n = 0
    for (x, y), (cx, cy), (rx, ry) in zip(b.train_epoch(1), c.train_epoch(1), raw_epoch(b, 1)):
        want = augment_normalize(rx, *sample_crop_flip(len(rx), g), b.mean, b.std, torch.float32, True)
        assert torch.equal(x, want) and torch.equal(y, ry) and torch.equal(cy, ry)
        assert cx.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(cx, want, rtol=0, atol=1e-6)
        n += 1
    assert n == len(b) == 20


def test_rank_shares_are_disjoint_and_cover_the_epoch_and_test_set(small_data):
    fx, _ = file_images(small_data / TRAIN_FILE)
    where = index_of(fx)
    tx, ty = file_images(small_data / TEST_FILE)
    ranks = [Batches(small_data, 50, 100, CPU, seed=0, placement="device", rank=r, world=2, num_workers=2,
                     augment=False) for r in (0, 1)]
    for e in range(2):
        shares = [[where[img.numpy().tobytes()] for x, _ in raw_epoch(b, e) for img in x] for b in ranks]
        assert len(shares[0]) == len(shares[1]) == 1000
        assert not set(shares[0]) & set(shares[1])
        assert sorted(shares[0] + shares[1]) == list(range(2000))
    test_where = index_of(tx)
    seen = [[test_where[img.numpy().tobytes()] for img in b.test_x] for b in ranks]
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(500))
    assert sum(b.test_batches for b in ranks) == 2 * 3  # 250 images per rank in batches of 100


def test_test_batches_equal_the_streaming_ones(small_data):
    s = Batches(small_data, 100, 128, CPU, seed=0, num_workers=2)
    d = Batches(small_data, 100, 128, CPU, seed=0, num_workers=2, placement="device")
    pairs = list(zip(s.test(), d.test()))
    assert len(pairs) == s.test_batches == d.test_batches == 4
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in pairs)


@pytest.mark.slow  # out of the default run's 25-minute budget on 2 cores (about 1.5 min on a 2-core AVX2 CPU)
def test_a_short_run_learns_as_well_as_streaming(small_data, tmp_path):
    acc = {}
    for placement in ("stream", "device"):
        out = tmp_path / placement
        r = run_cli("fastres", "train", "--data", small_data, "--out", out, "--preset", "smoke", "--depth", "8",
                    "--train-limit", "0", "--epochs", "3", "--batch-size", "100", "--loader-workers", "2",
                    "--compile-augment", "false", "--data-placement", placement)
        assert r.returncode == 0, r.stderr[-3000:]
        rec = json.loads((out / "record.json").read_text())
        assert rec["config"]["data_placement"] == placement and rec["num_test"] == 500
        acc[placement] = rec["final_test_acc"]
    assert acc["device"] > 0.25 and abs(acc["device"] - acc["stream"]) < 0.06, acc
    np.testing.assert_array_less(0.25, acc["stream"])


@pytest.mark.slow  # out of the default run's 25-minute budget on 2 cores (about 1.5 min on a 2-core AVX2 CPU)
def test_resume_keeps_the_placement_the_run_resolved_to(small_data, tmp_path):
    """A run's batches depend on its placement: a checkpoint made with resident data is not resumed
    streaming, also when the new run's `auto` would resolve to stream (on a CPU)."""
    tiny = ["--data", small_data, "--out", tmp_path / "run", "--preset", "smoke", "--depth", "8", "--train-limit",
            "400", "--test-limit", "100", "--epochs", "1", "--batch-size", "100", "--loader-workers", "2",
            "--compile-augment", "false"]
    r = run_cli("fastres", "train", *tiny, "--data-placement", "device")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("fastres", "train", *tiny, "--resume")
    assert r.returncode == 2 and "--data-placement device (now auto, resolved to stream)" in r.stderr, r.stderr
    r = run_cli("fastres", "train", *tiny, "--resume", "--data-placement", "stream")
    assert r.returncode == 2 and "--data-placement device (now stream)" in r.stderr, r.stderr
    r = run_cli("fastres", "train", *tiny, "--resume", "--data-placement", "device", "--epochs", "2")
    assert r.returncode != 0 and "--epochs 1 (now 2)" in r.stderr and "placement" not in r.stderr, r.stderr
    r = run_cli("fastres", "train", *tiny, "--resume", "--data-placement", "device")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "record.json").read_text())["config"]["data_placement"] == "device"
