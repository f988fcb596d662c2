"""Cutout, mixup and cutmix on the training batch (fastres.data.CutoutMixupCutmix): each result checked
against its definition built here independently, the draws' statistics against their
distributions, the same draws for the same (seed, epoch, step), and a short run with each learns."""
import numpy as np
import pytest
import torch

from fastres.data import CutoutMixupCutmix, cutout, sample_cutout


def batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def test_cutout_zeroes_exactly_the_clipped_square():
    x, _ = batch(40)
    x = x.abs() + 1  # no zeros of its own
    for size in (1, 8, 16, 7):
        cy, cx = sample_cutout(len(x), torch.Generator().manual_seed(size))
        out = cutout(x, cy, cx, size)
        assert out.is_contiguous(memory_format=torch.channels_last) and out.shape == x.shape
        for i in range(len(x)):
            want = x[i].numpy().copy()
            y0, x0 = int(cy[i]) - size // 2, int(cx[i]) - size // 2
            want[:, max(0, y0):max(0, y0 + size), max(0, x0):max(0, x0 + size)] = 0
            np.testing.assert_array_equal(out[i].numpy(), want)


def test_cutout_centres_are_uniform_and_cover_the_expected_area():
    n, size = 20_000, 8
    cy, cx = sample_cutout(n, torch.Generator().manual_seed(1))
    for c in (cy, cx):
        counts = np.bincount(c.flatten().numpy(), minlength=32)
        assert len(counts) == 32 and counts.min() > 0.8 * n / 32 and counts.max() < 1.2 * n / 32
    out = cutout(torch.ones(n, 1, 32, 32), cy, cx, size)
    # mean clipped side: rows c - 4 .. c + 3 inside 0..31, averaged over the 32 centres
    side = np.mean([min(32, c + size - size // 2) - max(0, c - size // 2) for c in range(32)])
    assert (out == 0).float().mean().item() == pytest.approx(side ** 2 / 1024, rel=0.03)


def recover_lambda(y_mixed, y):
    """The weight of each image's own label in mixed targets: lam*onehot(y) + (1-lam)*onehot(roll(y))."""
    rolled = y.roll(1, 0)
    own = y_mixed.gather(1, y[:, None]).squeeze(1)
    return torch.where(rolled == y, torch.full_like(own, float("nan")), own)


def test_mixup_blends_images_and_targets_with_a_beta_coefficient():
    alpha, lams = 0.4, []
    reg = CutoutMixupCutmix(seed=3, mixup=alpha)
    for step in range(200):
        x, y = batch(16, seed=step)
        xm, ym = reg(x, y, torch.Generator().manual_seed(0), epoch=0, step=step)
        assert ym.shape == (16, 10) and torch.allclose(ym.sum(1), torch.ones(16))
        lam = recover_lambda(ym, y)
        lam = lam[~lam.isnan()]
        assert torch.allclose(lam, lam[0].expand_as(lam))  # one coefficient per batch
        lam = lam[0].item()
        torch.testing.assert_close(xm, lam * x + (1 - lam) * x.roll(1, 0))
        lams.append(lam)
    lams = np.array(lams)
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)); 200 draws: standard errors ~0.026 and ~0.007
    assert abs(lams.mean() - 0.5) < 0.08 and abs(lams.var() - 1 / (4 * (2 * alpha + 1))) < 0.025
    assert lams.min() >= 0 and lams.max() <= 1


def test_cutmix_pastes_a_box_and_mixes_targets_by_its_area():
    reg = CutoutMixupCutmix(seed=5, cutmix=1.0)
    areas = []
    for step in range(100):
        x, y = batch(8, seed=100 + step)
        xm, ym = reg(x, y, torch.Generator().manual_seed(0), epoch=2, step=step)
        pasted = (xm == x.roll(1, 0)).all(1) & (xm != x).any(1)  # (N, H, W), per pixel
        kept = (xm == x).all(1)
        assert (pasted | kept).all()  # every pixel is its own or the rolled image's
        box = pasted[0]
        assert (pasted == box).all()  # the same box in every image
        rows, cols = box.any(1).nonzero(), box.any(0).nonzero()
        if len(rows):  # a rectangle: its bounding box is filled
            assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
        frac = box.float().mean().item()
        lam = recover_lambda(ym, y)
        lam = lam[~lam.isnan()]
        torch.testing.assert_close(lam, torch.full_like(lam, 1 - frac))
        areas.append(frac)
    # alpha 1: lam ~ U(0, 1), the box side r = sqrt(1 - lam) of the image, clipped at the borders,
    # so on average below (and near) E[1 - lam] = 0.5, and spread over (0, 1)
    assert 0.25 < np.mean(areas) < 0.5 and min(areas) < 0.05 and max(areas) > 0.6


def test_mixup_and_cutmix_together_choose_one_per_batch():
    reg = CutoutMixupCutmix(seed=0, mixup=1.0, cutmix=1.0)
    kinds = set()
    for step in range(40):
        x, y = batch(8, seed=step)
        xm, _ = reg(x, y, torch.Generator().manual_seed(0), epoch=0, step=step)
        own_or_rolled = ((xm == x) | (xm == x.roll(1, 0))).all()
        kinds.add("cutmix" if own_or_rolled else "mixup")
    assert kinds == {"mixup", "cutmix"}


def test_draws_are_a_function_of_seed_epoch_and_step():
    x, y = batch(32)
    reg = CutoutMixupCutmix(seed=1, cutout_px=8, mixup=0.5, cutmix=1.0)
    g = lambda: torch.Generator().manual_seed(11)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = reg(x, y, g(), epoch=3, step=7)
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is left as it was
    b = CutoutMixupCutmix(seed=1, cutout_px=8, mixup=0.5, cutmix=1.0)(x, y, g(), epoch=3, step=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for other in ({"epoch": 4, "step": 7}, {"epoch": 3, "step": 8}):
        c = reg(x, y, g(), **other)
        assert not torch.equal(a[1], c[1])
    c = CutoutMixupCutmix(seed=2, cutout_px=8, mixup=0.5, cutmix=1.0)(x, y, g(), epoch=3, step=7)
    assert not torch.equal(a[1], c[1])


def test_all_off_passes_the_batch_through():
    x, y = batch(8)
    xo, yo = CutoutMixupCutmix(seed=0)(x, y, torch.Generator().manual_seed(0), 0, 0)
    assert xo is x and yo is y


@pytest.mark.parametrize("extra", [{"cutout": 12}, {"mixup": 0.4, "cutmix": 1.0}])
def test_a_short_run_with_each_learns(small_data, tmp_path, extra):
    """Cutout alone, and mixup with cutmix (one of the two per batch): a small model trained for
    two epochs on 2,000 images scores well above chance (0.10)."""
    from fastres.config import make_config
    from fastres.train import train

    cfg = make_config("smoke", {"data": str(small_data), "out": str(tmp_path / "r"), "depth": 8, "epochs": 2,
                                "widths": "8,16,32", "train_limit": 2000, "test_limit": 500, "batch_size": 50,
                                "lr": 0.05, "compile_augment": False, "loader_workers": 2, **extra})
    rec = train(cfg, log=lambda *a, **k: None)
    assert rec["final_test_acc"] > 0.22, rec["final_test_acc"]
    assert rec["epochs"][-1]["train_loss"] < rec["epochs"][0]["train_loss"]
