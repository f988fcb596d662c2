"""`fastres predict`: labels for a hidden test set from real CIFAR-10 images in every input format
equal the model's own predictions, computed here from the checkpoint with plain PyTorch; an
ensemble's probabilities are the mean of its members'; --tta averages each image with its mirror;
bad input stops with one line and exit 2, leaving no CSV."""
import pickle

import numpy as np
import pytest
import torch

from data_prep import TEST_FILE
from data_prep.sources import CLASSES, balanced_indices
from fastres.cli import main
from fastres.config import from_dict
from fastres.design import model_from_config

N = 120  # images labelled per format


@pytest.fixture(scope="module")
def runs(small_data, tmp_path_factory):
    """Two tiny trained runs (fp32, so that the reference forward below is the run's arithmetic)."""
    from fastres.config import make_config
    from fastres.train import train

    root = tmp_path_factory.mktemp("predict_runs")
    for seed in (0, 1):
        train(make_config("smoke", {"data": str(small_data), "out": str(root / f"r{seed}"), "depth": 8,
                                    "epochs": 1, "train_limit": 1000, "test_limit": 200, "batch_size": 100,
                                    "amp": "off", "compile_augment": False, "seed": seed}), log=lambda *a, **k: None)
    return [root / f"r{s}" / "last.pt" for s in (0, 1)]


def reference_logits(ckpt, images: np.ndarray, mirror=False) -> torch.Tensor:
    """The checkpoint's model on uint8 NHWC images, normalized by hand with the run's mean and std."""
    ck = torch.load(ckpt, weights_only=False)
    model = model_from_config(from_dict(ck["config"]))
    model.load_state_dict(ck["ema"] if ck.get("ema") is not None else ck["model"])
    mean, std = (torch.tensor(ck["normalization"][k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        return model.eval()(x.flip(3) if mirror else x)


def read_csv(path):
    lines = path.read_text().splitlines()
    return lines[0], [line.split(",") for line in lines[1:]]


@pytest.fixture(scope="module")
def hidden(cifar):
    images = cifar["test"][0][:N]
    assert images.shape == (N, 32, 32, 3) and images.dtype == np.uint8
    return images


def write_inputs(folder, images):
    """The same images in every format, with ids as each format gives them."""
    from PIL import Image

    ids = [f"img{i:04d}" for i in range(len(images))]
    cifar_rows = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)  # CIFAR's channel-major layout
    paths = {"pickle_cifar_layout": folder / "hidden.pkl", "pickle_nhwc": folder / "hidden_nhwc.pkl",
             "npz": folder / "hidden.npz", "npz_without_ids": folder / "plain.npz", "png_folder": folder / "pngs"}
    with open(paths["pickle_cifar_layout"], "wb") as f:
        pickle.dump({b"data": cifar_rows, b"ids": [i.encode() for i in ids]}, f)
    with open(paths["pickle_nhwc"], "wb") as f:
        pickle.dump({"data": images, "ids": ids}, f)
    np.savez(paths["npz"], images=images, ids=np.array(ids))
    np.savez(paths["npz_without_ids"], images=images)
    paths["png_folder"].mkdir()
    for i, im in zip(ids, images):
        Image.fromarray(im).save(paths["png_folder"] / f"{i}.png")
    return paths, ids


def test_every_input_format_gives_the_models_own_labels(runs, hidden, tmp_path, capsys):
    paths, ids = write_inputs(tmp_path, hidden)
    want = reference_logits(runs[0], hidden).argmax(1).tolist()
    assert len(set(want)) > 1  # a model that learned something: not one class for all
    for kind, path in paths.items():
        out = tmp_path / f"{kind}.csv"
        assert main(["predict", str(runs[0]), "--images", str(path), "--out", str(out)]) == 0, capsys.readouterr().err
        header, rows = read_csv(out)
        assert header == "ID,Labels"
        got_ids = [r[0] for r in rows]
        assert got_ids == ([str(i) for i in range(N)] if kind == "npz_without_ids" else ids), kind
        assert [int(r[1]) for r in rows] == want, kind
    # class names and another header
    out = tmp_path / "names.csv"
    assert main(["predict", str(runs[0]), "--images", str(paths["npz"]), "--out", str(out), "--names",
                 "--header", "id,label"]) == 0
    header, rows = read_csv(out)
    assert header == "id,label" and [r[1] for r in rows] == [CLASSES[w] for w in want]


def test_a_converted_beton_in_file_order(runs, small_data, cifar, tmp_path):
    """The .beton holds the class-balanced slice of the test set, in source order."""
    images, labels = cifar["test"]
    order = balanced_indices(labels, 500)
    want = reference_logits(runs[0], images[order]).argmax(1).tolist()
    out = tmp_path / "beton.csv"
    assert main(["predict", str(runs[0]), "--images", str(small_data / TEST_FILE), "--out", str(out)]) == 0
    _, rows = read_csv(out)
    assert [r[0] for r in rows] == [str(i) for i in range(500)] and [int(r[1]) for r in rows] == want


def test_ensemble_is_the_mean_of_its_members_and_tta_mirrors(runs, hidden, tmp_path):
    np.savez(tmp_path / "x.npz", images=hidden)
    probs = {}
    for name, ckpts, extra in (("a", runs[:1], []), ("b", runs[1:], []), ("ab", runs, []), ("a_tta", runs[:1], ["--tta"])):
        p = tmp_path / f"{name}.npy"
        assert main(["predict", *map(str, ckpts), "--images", str(tmp_path / "x.npz"), "--out",
                     str(tmp_path / f"{name}.csv"), "--probs", str(p), *extra]) == 0
        probs[name] = np.load(p)
    assert probs["a"].shape == (N, 10) and np.allclose(probs["a"].sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(probs["ab"], (probs["a"] + probs["b"]) / 2, rtol=1e-5, atol=1e-6)
    assert not np.allclose(probs["a"], probs["b"], atol=1e-3)  # two different members
    _, rows = read_csv(tmp_path / "ab.csv")
    assert [int(r[1]) for r in rows] == probs["ab"].argmax(1).tolist()
    # TTA: the softmax of the mean logits of each image and its mirror
    want = torch.softmax(0.5 * (reference_logits(runs[0], hidden) + reference_logits(runs[0], hidden, True)), 1)
    np.testing.assert_allclose(probs["a_tta"], want.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(probs["a"], torch.softmax(reference_logits(runs[0], hidden), 1).numpy(), rtol=1e-4,
                               atol=1e-5)
    # the probabilities as CSV: an ID column and one per class
    assert main(["predict", str(runs[0]), "--images", str(tmp_path / "x.npz"), "--out", str(tmp_path / "c.csv"),
                 "--probs", str(tmp_path / "p.csv")]) == 0
    header, rows = read_csv(tmp_path / "p.csv")
    assert header == "ID," + ",".join(CLASSES)
    np.testing.assert_allclose(np.array([[float(v) for v in r[1:]] for r in rows]), probs["a"], atol=2e-6)


def _bad_inputs(folder, images):
    from PIL import Image

    cases = {}
    (folder / "gray").mkdir()
    Image.fromarray(images[0, :, :, 0]).save(folder / "gray" / "a.png")
    cases["gray_png"] = (folder / "gray", "expected 32x32 RGB")
    (folder / "big").mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "big" / "a.png")
    cases["big_png"] = (folder / "big", "a 40x40 RGB image")
    np.savez(folder / "small.npz", images=images[:, :28, :28])
    cases["wrong_shape"] = (folder / "small.npz", "expected 32x32 RGB images")
    np.savez(folder / "float.npz", images=images.astype(np.float32))
    cases["float"] = (folder / "float.npz", "must be uint8")
    with open(folder / "noids.pkl", "wb") as f:
        pickle.dump({b"data": images}, f)
    cases["ids_missing"] = (folder / "noids.pkl", "no 'ids'")
    with open(folder / "dup.pkl", "wb") as f:
        pickle.dump({b"data": images[:3], b"ids": [1, 2, 1]}, f)
    cases["ids_repeated"] = (folder / "dup.pkl", "the id 1 appears more than once")
    with open(folder / "short.pkl", "wb") as f:
        pickle.dump({b"data": images[:3], b"ids": [1, 2]}, f)
    cases["ids_short"] = (folder / "short.pkl", "2 ids for 3 images")
    (folder / "junk.pkl").write_bytes(b"not a pickle at all")
    cases["unreadable"] = (folder / "junk.pkl", "cannot be read as images")
    cases["missing"] = (folder / "nope.pkl", "no such file or folder")
    return cases


def test_bad_input_exits_2_with_one_line_and_no_csv(runs, hidden, tmp_path, capsys):
    for name, (path, phrase) in _bad_inputs(tmp_path, hidden[:4]).items():
        out = tmp_path / f"{name}.csv"
        assert main(["predict", str(runs[0]), "--images", str(path), "--out", str(out)]) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and phrase in err, (name, err)
        assert not out.exists() and not list(tmp_path.glob(f".{name}.csv.tmp-*")), name
    # a checkpoint whose head has another number of classes
    ck = torch.load(runs[1], weights_only=False)
    ck["model"]["fc.weight"], ck["model"]["fc.bias"] = ck["model"]["fc.weight"][:5], ck["model"]["fc.bias"][:5]
    torch.save(ck, tmp_path / "five.pt")
    np.savez(tmp_path / "ok.npz", images=hidden[:4])
    out = tmp_path / "mixed.csv"
    assert main(["predict", str(runs[0]), str(tmp_path / "five.pt"), "--images", str(tmp_path / "ok.npz"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "five.pt" in err and not out.exists(), err
