"""FFCV loaders: seeded random order per epoch, drop_last, sequential test order, subsets."""
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from data_prep import TRAIN_FILE
import fastres.data as D
from fastres.data import Batches, make_loader

CPU = torch.device("cpu")


def epoch_labels(b, epoch):
    return torch.cat([y for _, y in b.train_epoch(epoch)]).numpy()


def test_order_depends_only_on_seed_and_epoch(small_data):
    a = Batches(small_data, 300, 500, CPU, seed=1, num_workers=2, augment=False)
    b = Batches(small_data, 300, 500, CPU, seed=1, num_workers=2, augment=False)
    c = Batches(small_data, 300, 500, CPU, seed=2, num_workers=2, augment=False)
    for e in range(3):  # a walks through epochs 0..2; b jumps straight to epoch 2
        la = epoch_labels(a, e)
    lb = epoch_labels(b, 2)
    assert np.array_equal(la, lb)
    assert not np.array_equal(lb, epoch_labels(b, 1))
    assert not np.array_equal(lb, epoch_labels(c, 2))
    # Same images too, not only labels.
    xa = next(iter(a.train_epoch(4)))[0]
    xb = next(iter(b.train_epoch(4)))[0]
    assert torch.equal(xa, xb)


def _pixels(b, x):
    """Normalized float batch -> the uint8 NHWC images it was made from."""
    x = x.float() * b.std[:, None, None] + b.mean[:, None, None]
    return (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_drop_last_and_each_image_once(small_data):
    """An epoch is 6 full batches of 300 distinct images of the file (200 dropped), with their own
    labels: checked by image identity, so sampling with replacement would fail."""
    b = Batches(small_data, 300, 500, CPU, seed=0, num_workers=2, augment=False)
    assert len(b) == 2000 // 300
    got = [(_pixels(b, x), y.numpy()) for x, y in b.train_epoch(0)]
    images = np.concatenate([g[0] for g in got])
    labels = np.concatenate([g[1] for g in got])
    assert images.shape == (6 * 300, 32, 32, 3)
    src_pairs = {}  # the training file's images in file order, independently of Batches
    for x, y in make_loader(small_data / TRAIN_FILE, 500, CPU, train=False, num_workers=2):
        for img, lab in zip(x.numpy(), y.numpy()):
            src_pairs[img.tobytes()] = int(lab)
    keys = [img.tobytes() for img in images]
    assert len(set(keys)) == len(keys)  # no image twice
    assert all(k in src_pairs for k in keys)  # every one from the file
    assert [src_pairs[k] for k in keys] == labels.tolist()  # with its own label


def test_train_limit_balanced_subset(small_data):
    b = Batches(small_data, 100, 500, CPU, seed=0, num_workers=2, augment=False, train_limit=1000)
    assert b.num_train == 1000
    assert np.bincount(epoch_labels(b, 0), minlength=10).tolist() == [100] * 10


def test_batches_dtype_layout(small_data):
    b = Batches(small_data, 256, 500, CPU, seed=0, num_workers=2, dtype=torch.bfloat16)
    x, y = next(iter(b.train_epoch(0)))
    assert x.dtype == torch.bfloat16 and x.shape == (256, 3, 32, 32)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert y.dtype == torch.int64
    # Normalized with the manifest's statistics: roughly zero mean and unit std per channel.
    m = x.float().mean(dim=(0, 2, 3))
    assert m.abs().max() < 0.5


@pytest.mark.parametrize("batch_size, eval_batch_size", [(100, 50), (500, 125)], ids=["mid_epoch", "at_its_end"])
def test_an_epoch_left_early_stops_its_reading_thread(small_data, batch_size, eval_batch_size):
    """A run stopped mid-epoch (diverged, interrupted, an exception) drops its epoch's batches
    unread. FFCV reads an epoch on a thread of its own, which would wait forever to hand over a
    batch, holding its buffers: a sweep worker running trial after trial would gather them.
    Training and test epochs alike, each left after its first batch: with 20 and 10 batches an
    epoch, the thread waits to hand over its next batch; with 4 (FFCV reads 3 ahead) it has read
    them all and waits to hand over the epoch's end."""
    from ffcv.loader.epoch_iterator import EpochIterator

    def readers():
        return {t for t in threading.enumerate() if isinstance(t, EpochIterator)}

    b = Batches(small_data, batch_size, eval_batch_size, CPU, seed=0, num_workers=2, augment=False)
    before = readers()
    train, test = b.train_epoch(0), b.test()
    next(train), next(test)
    started = readers() - before
    assert len(started) == 2
    del train, test
    for t in started:
        t.join(timeout=10)  # FFCV's thread looks for the stop every 0.5 s
    assert not [t for t in started if t.is_alive()]


def test_a_later_run_of_the_process_takes_an_idle_loader(small_data, tmp_path, monkeypatch):
    """FFCV compiles a pipeline for each Loader (about 1 s; numba never frees the code): a run made
    after an earlier one is gone takes its loaders with the same file and settings, and reads the
    same batches from them as from new ones. Runs alive together never share one; another seed
    has a training loader of its own but the same evaluation loader; a file converted again
    (here: only its time changed) gets new ones."""
    monkeypatch.setattr(D, "IDLE_LOADERS", D.IdleLoaders(size=16))
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    settings = dict(batch_size=100, eval_batch_size=50, device=CPU, num_workers=2, augment=False)
    a, b = Batches(data, seed=1, **settings), Batches(data, seed=1, **settings)
    assert not {a.train_loader, a.test_loader} & {b.train_loader, b.test_loader}
    labels = epoch_labels(a, 3)
    made = {id(a.train_loader), id(a.test_loader), id(b.train_loader), id(b.test_loader)}
    del a, b
    c = Batches(data, seed=1, **settings)
    assert {id(c.train_loader), id(c.test_loader)} <= made
    assert np.array_equal(epoch_labels(c, 3), labels)
    d = Batches(data, seed=2, **settings)
    assert id(d.train_loader) not in made and id(d.test_loader) in made and d.test_loader is not c.test_loader
    del c, d
    os.utime(data / TRAIN_FILE)
    e = Batches(data, seed=1, **settings)
    assert id(e.train_loader) not in made and id(e.test_loader) in made
    # Resident data is read once per run, through loaders given back as soon as it is read.
    def idle_readers():  # read_all's loaders (batches of 1,000) waiting in the pool
        return {id(loader) for _, loader in D.IDLE_LOADERS.idle if loader.batch_size == 1000}
    Batches(data, seed=1, placement="device", **settings)
    first = idle_readers()
    Batches(data, seed=2, placement="device", **settings)
    assert len(first) == 2 and idle_readers() == first


def test_loader_workers_keep_the_process_thread_count(small_data):
    """FFCV sets torch's intra-op thread count at import (to 1) and to its loader's worker count
    (when a loader is made and at every epoch). fastres puts the count back each time, so a
    process keeps the threads it was given whatever its loaders decode with: all cores by default,
    fewer under OMP_NUM_THREADS (N sweep workers sharing a CPU). More workers than the CPUs numba
    can use (which FFCV refuses with a ValueError) are that many. In a fresh process, where FFCV
    is not imported yet."""
    code = f"""
import numba, torch
from fastres.data import make_loader
for n, workers in ((2, -1), (1, -1), (1, 2), (1, 999)):  # FFCV imported during the first loader's creation
    torch.set_num_threads(n)
    loader = make_loader({str(small_data / TRAIN_FILE)!r}, 100, torch.device("cpu"), train=True, seed=0,
                         num_workers=workers)
    made = torch.get_num_threads()
    for _ in loader:  # an epoch
        pass
    print(n, made, torch.get_num_threads(), loader.num_workers, numba.config.NUMBA_NUM_THREADS)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "NUMBA_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[:4] == ["2 2 2 2 2", "1 1 1 1 2", "1 1 1 2 2", "1 1 1 2 2"], r.stdout
