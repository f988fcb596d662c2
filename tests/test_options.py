"""Training options beyond the paper: EMA, flip TTA, label smoothing, presets, sweep."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli, run_here
from fastres import runtime
from fastres.config import make_config
from fastres.distributed import Dist
from fastres.model import resnet
from fastres.evaluate import evaluate
from fastres.optim import EMA, make_criterion


def test_ema_tracks_the_weights_by_its_warmed_up_decay():
    """ema <- d ema + (1 - d) w with d = min(decay, (1 + n) / (10 + n)) after n updates."""
    torch.manual_seed(0)
    m = resnet(8)
    ema = EMA(m, 0.9)
    for n, d in ((0, 0.1), (1, 2 / 11), (1000, 0.9)):  # 0.1 and 2/11 from the warm-up, then the decay itself
        ema.updates = n
        before = {k: v.clone() for k, v in ema.model.state_dict().items()}
        with torch.no_grad():
            for p in m.parameters():
                p.add_(1.0)
            m.bn1.running_mean.add_(3.0)
        ema.update()
        assert ema.updates == n + 1
        for name, p in m.named_parameters():
            torch.testing.assert_close(ema.model.state_dict()[name], d * before[name] + (1 - d) * p.detach())
            assert not torch.equal(ema.model.state_dict()[name], p.detach())
        torch.testing.assert_close(ema.model.bn1.running_mean, m.bn1.running_mean)  # buffers copied
    assert not any(p.requires_grad for p in ema.model.parameters())
    off = EMA(m, 0.0)
    assert off.model is m and off.state_dict() is None
    off.update()  # no-op


def test_short_tuned_run_learns_despite_ema_0999(small_data, tmp_path):
    """2 epochs of the tuned recipe (EMA 0.999) on a small slice evaluate learned weights: without
    the EMA warm-up the evaluated weights are ~85% the initial ones and score near chance."""
    r = run_here("fastres", "train", "--preset", "tuned", "--data", small_data, "--out", tmp_path / "t",
                  "--depth", "8", "--epochs", "2", "--batch-size", "64", "--loader-workers", "2",
                 "--compile-augment", "false", "--tta", "false")
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((tmp_path / "t" / "record.json").read_text())
    assert rec["config"]["ema"] == 0.999
    assert rec["final_test_acc"] > 0.25, rec["final_test_acc"]  # chance is 0.10


class Batches1:
    """Test-set stand-in: one fixed batch."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def test(self):
        yield self.x, self.y


def test_tta_averages_logits_of_image_and_mirror():
    torch.manual_seed(0)
    m = resnet(8).eval()
    x, y = torch.randn(12, 3, 32, 32), torch.randint(0, 10, (12,))
    rt = runtime.resolve(make_config("paper", {"device": "cpu", "amp": "off"}))
    loss, acc, n = evaluate(m, Batches1(x, y), rt, tta=True, dist=Dist())
    assert n == 12
    with torch.no_grad():
        logits = (m(x) + m(torch.flip(x, dims=[3]))) / 2
    assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert acc == pytest.approx((logits.argmax(1) == y).float().mean().item())
    loss_plain, _, _ = evaluate(m, Batches1(x, y), rt, tta=False, dist=Dist())
    with torch.no_grad():
        assert loss_plain == pytest.approx(F.cross_entropy(m(x), y).item(), rel=1e-5)
    assert loss_plain != pytest.approx(loss)


def test_label_smoothing_loss_as_defined():
    logits, y = torch.randn(7, 10), torch.randint(0, 10, (7,))
    eps = 0.1
    crit = make_criterion(make_config("paper", {"label_smoothing": eps}))
    logp = logits.log_softmax(1)
    target = torch.full((7, 10), eps / 10).scatter_add_(1, y[:, None], torch.full((7, 1), 1 - eps))
    assert crit(logits, y).item() == pytest.approx(-(target * logp).sum(1).mean().item(), rel=1e-6)
    assert make_criterion(make_config("paper"))(logits, y).item() == pytest.approx(F.cross_entropy(logits, y).item())


def test_presets_beyond_the_paper():
    t, tp = make_config("tuned"), make_config("throughput")
    for c in (t, tp):
        assert c.depth == 68 and c.epochs == 50 and c.ema > 0 and c.tta and c.nesterov and c.label_smoothing > 0
    assert tp.batch_size == 512 and tp.lr_ref_batch == 128


@pytest.mark.long
def test_all_options_on_in_a_small_run_and_sweep(small_data, tmp_path):
    args = ["--data", small_data, "--depth", "8", "--epochs", "2", "--train-limit", "1000", "--test-limit", "200",
            "--batch-size", "100", "--loader-workers", "2", "--compile-augment", "false"]
    r = run_cli("fastres", "sweep", "--preset", "tuned", "--seeds", "0", "1", "--out", tmp_path / "sw", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--resume" not in r.stdout and "starting from scratch" not in r.stdout  # nobody asked to resume
    s = json.loads((tmp_path / "sw" / "summary.json").read_text())
    recs = [json.loads((tmp_path / "sw" / f"seed{i}" / "record.json").read_text()) for i in (0, 1)]
    accs = [x["final_test_acc"] for x in recs]
    assert s["final_test_acc"] == accs and s["acc_mean"] == pytest.approx(sum(accs) / 2)
    assert recs[0]["config"]["ema"] == 0.999 and recs[0]["config"]["tta"] is True
    assert recs[0]["config"]["seed"] == 0 and recs[1]["config"]["seed"] == 1
    assert "±" in r.stdout
    # A second sweep reads the finished runs instead of training again.
    r = run_cli("fastres", "sweep", "--preset", "tuned", "--seeds", "0", "1", "--out", tmp_path / "sw", *args)
    assert r.returncode == 0 and r.stdout.count("reading it") == 2


@pytest.mark.long
def test_eval_uses_the_ema_weights_and_flip_tta(small_data, tmp_path):
    """`fastres eval` on a checkpoint with EMA weights reports the EMA model's numbers (which
    differ from the raw weights'), and with --tta those of the averaged mirror logits; each
    computed here independently from the checkpoint's tensors."""
    from fastres.data import Batches
    from fastres.config import from_dict
    from fastres.design import build_model

    out = tmp_path / "t"
    r = run_here("fastres", "train", "--preset", "tuned", "--data", small_data, "--out", out, "--depth", "8",
                  "--epochs", "1", "--warmup-epochs", "0.5", "--batch-size", "100", "--loader-workers", "2",
                 "--compile-augment", "false", "--tta", "false")
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((out / "record.json").read_text())
    ck = torch.load(out / "last.pt", weights_only=False)
    assert ck["ema"] is not None and ck["ema_updates"] == rec["steps_per_epoch"]
    cfg = from_dict({**ck["config"], "compile": "off"})
    rt = runtime.resolve(cfg)
    b = Batches(small_data, 100, cfg.eval_batch_size, rt.device, 0, channels_last=rt.channels_last, num_workers=2)

    def score(weights, tta):
        m = build_model(cfg, rt)
        m.load_state_dict(weights)
        return evaluate(m, b, rt, tta, Dist())[:2]

    ema_loss, ema_acc = score(ck["ema"], False)
    raw_loss, _ = score(ck["model"], False)
    assert f"{ema_loss:.4f}" != f"{raw_loss:.4f}"  # the EMA is its own model, told apart in the output
    assert rec["final_test_loss"] == pytest.approx(ema_loss, rel=1e-6)  # what training reported
    r = run_here("fastres", "eval", out / "last.pt", "--data", small_data)
    assert r.returncode == 0 and f"test loss {ema_loss:.4f}, test accuracy {ema_acc:.2%}" in r.stdout, r.stdout
    tta_loss, tta_acc = score(ck["ema"], True)
    assert f"{tta_loss:.4f}" != f"{ema_loss:.4f}"
    r = run_here("fastres", "eval", out / "last.pt", "--data", small_data, "--tta")
    assert r.returncode == 0 and f"test loss {tta_loss:.4f}, test accuracy {tta_acc:.2%} (flip TTA)" in r.stdout
