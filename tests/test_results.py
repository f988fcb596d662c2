"""Results to look at: every finished run, and `fastres eval` of one checkpoint or an ensemble,
leave per-class accuracy and the confusion matrix (CSV, PNG with class names) and a PNG of the most
confidently misclassified test images; the counts are checked against a count done here from the
checkpoint with plain PyTorch on the same real test images."""
import json

import numpy as np
import pytest
import torch

from data_prep.sources import CLASSES, balanced_indices
from fastres.cli import main
from fastres.config import from_dict
from fastres.design import model_from_config

PNG = b"\x89PNG\r\n\x1a\n"


def predictions(ckpt, images: np.ndarray) -> np.ndarray:
    ck = torch.load(ckpt, weights_only=False)
    model = model_from_config(from_dict(ck["config"]))
    model.load_state_dict(ck["ema"] if ck.get("ema") is not None else ck["model"])
    mean, std = (torch.tensor(ck["normalization"][k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    with torch.no_grad():
        return model.eval()((torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std).argmax(1).numpy()


def read_confusion(path):
    lines = path.read_text().splitlines()
    assert lines[0] == "true\\predicted," + ",".join(CLASSES) + ",accuracy"
    rows = [line.split(",") for line in lines[1:]]
    assert [r[0] for r in rows] == list(CLASSES)
    return np.array([[int(v) for v in r[1:-1]] for r in rows]), [float(r[-1]) for r in rows]


@pytest.fixture(scope="module")
def run(small_data, tmp_path_factory):
    from fastres.config import make_config
    from fastres.train import train

    out = tmp_path_factory.mktemp("results") / "run"
    rec = train(make_config("smoke", {"data": str(small_data), "out": str(out), "depth": 8, "epochs": 2,
                                      "train_limit": 1000, "test_limit": 300, "batch_size": 100, "amp": "off",
                                      "eval_batch_size": 32,  # the images come in 10 batches
                                      "compile_augment": False}), log=lambda *a, **k: None)
    return out, rec


def test_a_finished_run_leaves_per_class_results(run, cifar):
    out, rec = run
    images, labels = cifar["test"]
    order = balanced_indices(labels, 300)  # the run's 300 test images
    want = np.zeros((10, 10), np.int64)
    for t, p in zip(labels[order], predictions(out / "last.pt", images[order])):
        want[t, p] += 1
    counts, acc = read_confusion(out / "confusion.csv")
    assert (counts == want).all() and counts.sum() == 300 == rec["num_test"]
    assert acc == pytest.approx([want[i, i] / want[i].sum() for i in range(10)], abs=1e-4)
    assert np.trace(counts) / 300 == pytest.approx(rec["final_test_acc"])  # the run's own accuracy
    saved = json.loads((out / "record.json").read_text())["per_class_acc"]
    assert list(saved) == list(CLASSES) and saved == pytest.approx(dict(zip(CLASSES, acc)), abs=1e-4)
    for png in ("confusion.png", "mistakes.png"):
        data = (out / png).read_bytes()
        assert data[:8] == PNG and len(data) > 10_000, png


def test_eval_writes_them_for_one_checkpoint_and_an_ensemble(run, small_data, tmp_path, capsys):
    out, rec = run
    assert main(["eval", str(out / "last.pt"), "--data", str(small_data), "--out", str(tmp_path / "one")]) == 0
    text = capsys.readouterr().out
    assert f"test accuracy {rec['final_test_acc']:.2%}" in text and "per class: airplane" in text
    one, _ = read_confusion(tmp_path / "one" / "confusion.csv")
    assert (one == read_confusion(out / "confusion.csv")[0]).all()
    # an ensemble of the run with itself is the run; its results go where --out says
    assert main(["eval", str(out / "last.pt"), str(out / "last.pt"), "--data", str(small_data), "--tta",
                 "--out", str(tmp_path / "ens")]) == 0
    text = capsys.readouterr().out
    assert text.count("ensemble of 2 (mean softmax)") == 2 and f"test accuracy {rec['final_test_acc']:.2%}" in text
    ens, _ = read_confusion(tmp_path / "ens" / "confusion.csv")
    assert ens.sum() == 300 and (tmp_path / "ens" / "mistakes.png").read_bytes()[:8] == PNG


def test_compare_shows_per_class_accuracy(run, tmp_path, capsys):
    out, rec = run
    assert main(["compare", str(out), "--png", str(tmp_path / "c.png")]) == 0
    lines = capsys.readouterr().out.split("per-class test accuracy:\n")[1].splitlines()
    assert lines[0].split()[1:] == [n[:10] for n in CLASSES]
    row = next(line for line in lines if line.startswith(str(out)))
    assert row.split()[1:] == [f"{rec['per_class_acc'][n]:.1%}" for n in CLASSES]
