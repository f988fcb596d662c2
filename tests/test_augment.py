"""Batched on-device augmentation: exact translations with zero fill, mirrored or not."""
import numpy as np
import pytest
import torch

from fastres.data import Batches, augment, normalize


def candidates(src: np.ndarray):
    """Every allowed result for source images (N, 32, 32, 3), built with numpy alone:
    yields ((dy, dx, flipped), (N, 32, 32, 3)) for shifts in [-4, 4]^2, mirrored or not."""
    padded = np.pad(src, ((0, 0), (4, 4), (4, 4), (0, 0)))
    for dy in range(-4, 5):
        for dx in range(-4, 5):
            crop = padded[:, 4 + dy:36 + dy, 4 + dx:36 + dx]
            yield (dy, dx, False), crop
            yield (dy, dx, True), crop[:, :, ::-1]


def identify(src, out):
    """For each output image, the first candidate (dy, dx, flipped) it equals exactly, or None."""
    found = [None] * len(src)
    for key, cand in candidates(src):
        eq = (cand == out).reshape(len(src), -1).all(1)
        for i in np.flatnonzero(eq):
            if found[i] is None:
                found[i] = key
    return found


@pytest.fixture(scope="module")
def batch(cifar):
    x = cifar["train"][0]
    idx = np.random.default_rng(0).choice(len(x), 4096, replace=False)
    return x[idx]


def test_every_image_is_a_zero_filled_translation_maybe_mirrored(batch):
    g = torch.Generator().manual_seed(0)
    out = augment(torch.from_numpy(batch), g).numpy()
    assert out.shape == batch.shape and out.dtype == np.uint8
    found = identify(batch, out)
    assert all(f is not None for f in found), "some augmented image is not a translation of its source"
    offsets = {(dy, dx) for dy, dx, _ in found}
    assert len(offsets) == 81, f"only {len(offsets)} of 81 offsets occurred"
    flipped = np.mean([f[2] for f in found])
    assert 0.45 < flipped < 0.55, flipped
    # Not the identity: most images moved or mirrored.
    assert np.mean([f != (0, 0, False) for f in found]) > 0.9


def test_same_seed_same_batch_other_seed_other_batch(batch):
    x = torch.from_numpy(batch[:512])
    a = augment(x, torch.Generator().manual_seed(7))
    b = augment(x, torch.Generator().manual_seed(7))
    c = augment(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_normalize_matches_definition(batch):
    x = torch.from_numpy(batch[:64])
    mean, std = torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.25, 0.24, 0.26])
    y = normalize(x, mean, std, torch.float32, channels_last=True)
    assert y.shape == (64, 3, 32, 32) and y.is_contiguous(memory_format=torch.channels_last)
    ref = (batch[:64].astype(np.float64) / 255 - mean.numpy()) / std.numpy()
    np.testing.assert_allclose(y.permute(0, 2, 3, 1).numpy(), ref, atol=1e-5)
    assert normalize(x, mean, std, torch.bfloat16, channels_last=False).is_contiguous()


def test_training_batches_are_augmented_test_batches_are_not(small_data, cifar):
    """Same seed and epoch give the same order with augmentation on or off, so the plain batch
    is each augmented image's source."""
    dev = torch.device("cpu")
    aug = Batches(small_data, 500, 500, dev, seed=3, num_workers=2)
    plain = Batches(small_data, 500, 500, dev, seed=3, num_workers=2, augment=False)
    mean, std = aug.mean, aug.std

    def to_u8(x):  # invert normalization exactly enough to recover uint8 pixels
        return ((x.permute(0, 2, 3, 1) * std + mean) * 255).round().to(torch.uint8).numpy()

    (xa, ya), (xp, yp) = next(iter(aug.train_epoch(1))), next(iter(plain.train_epoch(1)))
    assert torch.equal(ya, yp)
    src, out = to_u8(xp), to_u8(xa)
    found = identify(src, out)
    assert all(f is not None for f in found)
    assert np.mean([f != (0, 0, False) for f in found]) > 0.9
    # Test batches: sequential, untouched (compare with the source slice).
    xt, yt = next(iter(aug.test()))
    src_x, src_y = cifar["test"]
    idx = np.sort(np.concatenate([np.flatnonzero(src_y == c)[:50] for c in range(10)]))
    assert np.array_equal(to_u8(xt), src_x[idx]) and np.array_equal(yt.numpy(), src_y[idx])


def test_compiled_augmentation_matches_eager(small_data):
    dev = torch.device("cpu")
    eager = Batches(small_data, 250, 500, dev, seed=4, num_workers=2)
    fused = Batches(small_data, 250, 500, dev, seed=4, num_workers=2, compile_augment=True)
    for (xa, ya), (xb, yb) in zip(eager.train_epoch(2), fused.train_epoch(2)):
        assert torch.equal(ya, yb)
        torch.testing.assert_close(xb, xa, rtol=1e-6, atol=1e-6)
        assert xb.is_contiguous(memory_format=torch.channels_last)
