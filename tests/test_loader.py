"""FFCV loaders: seeded random order per epoch, drop_last, sequential test order, subsets."""
import numpy as np
import torch

from fastres.data import Batches

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


def test_drop_last_and_each_image_once(small_data):
    b = Batches(small_data, 300, 500, CPU, seed=0, num_workers=2, augment=False)
    assert len(b) == 2000 // 300
    labels = epoch_labels(b, 0)
    assert len(labels) == 6 * 300
    # A permutation of 2,000 balanced images with 200 dropped: no class has more than 200.
    assert np.bincount(labels, minlength=10).max() <= 200


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
