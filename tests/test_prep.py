"""data_prep: lossless conversion, manifest, sources, subsets, and clean failures on bad input."""
import json
import pickle

import numpy as np
import torch

from conftest import run_cli, run_here
from data_prep import MANIFEST_FILE, TEST_FILE, TRAIN_FILE
from data_prep.cli import prepare
from fastres.data import make_loader


def read_back(path):
    """All (images NHWC uint8, labels) of a .beton in sequential order."""
    loader = make_loader(path, 1000, torch.device("cpu"), train=False, num_workers=2)
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in loader])
    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


def test_full_conversion_is_bit_exact(full_data, cifar):
    """All 60,000 images read back from the .beton files equal the source, pixel for pixel."""
    for split, fname in (("train", TRAIN_FILE), ("test", TEST_FILE)):
        images, labels = read_back(full_data / fname)
        src_images, src_labels = cifar[split]
        assert images.shape == src_images.shape == ((50_000 if split == "train" else 10_000), 32, 32, 3)
        assert np.array_equal(images, src_images)
        assert np.array_equal(labels, src_labels)
    m = json.loads((full_data / MANIFEST_FILE).read_text())
    assert m["counts"] == {"train": 50_000, "test": 10_000}
    assert m["per_class"]["train"] == [5000] * 10 and m["per_class"]["test"] == [1000] * 10
    x = cifar["train"][0].astype(np.float64) / 255
    np.testing.assert_allclose(m["mean"], x.mean(axis=(0, 1, 2)), rtol=1e-9)
    np.testing.assert_allclose(m["std"], x.std(axis=(0, 1, 2)), rtol=1e-9)
    assert len(m["content_sha256"]) == 64


def test_cli_converts_reruns_as_no_op_and_force_rebuilds(tmp_path, cifar_dir, cifar):
    out = tmp_path / "d"
    args = ("data_prep", "--source", cifar_dir, "--out", out, "--limit-train", "1000", "--limit-test", "500")
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    images, labels = read_back(out / TEST_FILE)
    idx = np.sort(np.concatenate([np.flatnonzero(cifar["test"][1] == c)[:50] for c in range(10)]))
    assert np.array_equal(images, cifar["test"][0][idx]) and np.array_equal(labels, cifar["test"][1][idx])
    # Output is a pipe, as in a log: a plain progress line per file, no carriage-return redraws.
    assert "fastres-prep: writing cifar10_test.beton: 500/500 (100%) in" in r.stdout
    assert "\r" not in r.stdout + r.stderr
    # A rerun on up-to-date output does nothing and says so, but for removing what a conversion
    # killed mid-write left (its pid gone); --force rebuilds.
    before = (out / TRAIN_FILE).stat().st_mtime_ns
    stale = out / f".{TRAIN_FILE}.tmp-999999"
    stale.write_bytes(b"half a .beton")
    r = run_here(*args)  # nothing to write: in this process
    assert r.returncode == 0 and "up to date" in r.stdout
    assert not stale.exists() and f"removed {stale}" in r.stdout
    assert (out / TRAIN_FILE).stat().st_mtime_ns == before
    r = run_cli(*args, "--force")
    assert r.returncode == 0 and "writing" in r.stdout
    assert (out / TRAIN_FILE).stat().st_mtime_ns != before
    # Other settings are other content: rebuilt without --force.
    r = run_cli(*args[:-2], "--limit-test", "100")
    assert r.returncode == 0 and "writing" in r.stdout
    assert json.loads((out / MANIFEST_FILE).read_text())["counts"] == {"train": 1000, "test": 100}


def test_limits_are_class_balanced_prefixes(small_data, cifar):
    images, labels = read_back(small_data / TRAIN_FILE)
    assert np.bincount(labels, minlength=10).tolist() == [200] * 10
    src_x, src_y = cifar["train"]
    # Independently: the first 200 images of each class, in source order.
    idx = np.sort(np.concatenate([np.flatnonzero(src_y == c)[:200] for c in range(10)]))
    assert np.array_equal(images, src_x[idx]) and np.array_equal(labels, src_y[idx])


def _write_batches(folder, cifar, n_train=50, n_test=30):
    """The official cifar-10-batches-py layout (pickled dicts, CHW rows) from real images."""
    folder.mkdir(parents=True)
    x, y = cifar["train"]
    pick = np.concatenate([np.flatnonzero(y == c)[:5 * n_train // 50] for c in range(10)])
    for i in range(5):
        part = pick[i::5]
        rows = x[part].transpose(0, 3, 1, 2).reshape(len(part), -1)
        with open(folder / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump({b"data": rows, b"labels": y[part].tolist()}, f)
    xt, yt = cifar["test"]
    pt = np.concatenate([np.flatnonzero(yt == c)[:n_test // 10] for c in range(10)])
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": xt[pt].transpose(0, 3, 1, 2).reshape(len(pt), -1), b"labels": yt[pt].tolist()}, f)
    return np.concatenate([pick[i::5] for i in range(5)]), pt


def test_batches_folder_source(tmp_path, cifar):
    train_idx, test_idx = _write_batches(tmp_path / "src" / "cifar-10-batches-py", cifar)
    for src in (tmp_path / "src", tmp_path / "src" / "cifar-10-batches-py"):
        out = tmp_path / ("o" + str(len(str(src))))
        prepare(str(src), str(out), log=lambda *a: None)
        images, labels = read_back(out / TRAIN_FILE)
        assert np.array_equal(images, cifar["train"][0][train_idx])
        assert np.array_equal(labels, cifar["train"][1][train_idx])
        images, labels = read_back(out / TEST_FILE)
        assert np.array_equal(images, cifar["test"][0][test_idx])


def _npz(folder, train=None, test=None, cifar=None):
    folder.mkdir(parents=True, exist_ok=True)
    x, y = cifar["train"]
    xt, yt = cifar["test"]
    for name, arrays in (("train", train or {"images": x[:100], "labels": y[:100]}),
                         ("test", test or {"images": xt[:50], "labels": yt[:50]})):
        if arrays != "skip":
            np.savez(folder / f"{name}.npz", **arrays)
    return folder


def bad_sources(tmp_path, cifar):
    x, y = cifar["train"][0][:100], cifar["train"][1][:100]
    yield "missing", _npz(tmp_path / "missing", test="skip", cifar=cifar), "test.npz: file not found"
    yield "shape", _npz(tmp_path / "shape", train={"images": x[:, :, :31], "labels": y}, cifar=cifar), "shape"
    yield "dtype", _npz(tmp_path / "dtype", train={"images": x.astype(np.float32), "labels": y}, cifar=cifar), "uint8"
    bad_y = y.copy()
    bad_y[7] = 10
    yield "label", _npz(tmp_path / "label", train={"images": x, "labels": bad_y}, cifar=cifar), "label 10 at index 7"
    yield "count", _npz(tmp_path / "count", train={"images": x, "labels": y[:99]}, cifar=cifar), "labels must have shape"
    d = _npz(tmp_path / "trunc", cifar=cifar)
    raw = (d / "train.npz").read_bytes()
    (d / "train.npz").write_bytes(raw[: len(raw) // 2])
    yield "truncated", d, "truncated or corrupt"
    d = tmp_path / "pickle" / "cifar-10-batches-py"
    _write_batches(d, cifar)
    (d / "data_batch_3").write_bytes(b"\x80\x04garbage")
    yield "corrupt-pickle", tmp_path / "pickle", "data_batch_3: truncated or corrupt"
    yield "no-folder", tmp_path / "does-not-exist", "source folder not found"


def test_bad_inputs_fail_cleanly(tmp_path, cifar):
    for name, src, expected in bad_sources(tmp_path, cifar):
        out = tmp_path / f"out-{name}"
        r = run_here("data_prep", "--source", src, "--out", out)
        assert r.returncode == 2, (name, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fastres-prep: error: "), (name, r.stderr)
        assert expected in lines[0], (name, lines[0])
        assert not out.exists() or not any(out.iterdir()), (name, list(out.iterdir()))


def test_bad_limits_rejected(tmp_path, cifar_dir):
    for args in (["--limit-train", "0"], ["--limit-test", "20000"]):
        r = run_here("data_prep", "--source", cifar_dir, "--out", tmp_path / "o", *args)
        assert r.returncode == 2 and r.stderr.startswith("fastres-prep: error:"), r.stderr
        assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_failed_rebuild_keeps_previous_output(tmp_path, small_data, cifar):
    """A bad source on --force leaves the earlier good files untouched."""
    import shutil
    out = tmp_path / "keep"
    shutil.copytree(small_data, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = _npz(tmp_path / "bad", train={"images": cifar["train"][0][:10, :, :, :2], "labels": cifar["train"][1][:10]},
               cifar=cifar)
    r = run_here("data_prep", "--source", bad, "--out", out, "--force")
    assert r.returncode == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_rebuild_that_fails_while_writing_keeps_previous_output(tmp_path, small_data, cifar_dir):
    """A good source whose rebuild fails in FFCV's writer processes (a file size limit: the
    writes fail with EFBIG) stops with exit 4 instead of waiting for the dead writer forever,
    and leaves the earlier files byte for byte, with no temporary file."""
    import resource
    import shutil
    out = tmp_path / "keep"
    shutil.copytree(small_data, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    limit = (out / "cifar10_train.beton").stat().st_size // 5

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = run_cli("data_prep", "--source", cifar_dir, "--out", out, "--limit-train", "2000", "--limit-test", "500",
                "--force", preexec_fn=small_files, timeout=300)
    assert r.returncode == 4, r.stderr[-3000:]
    assert "fastres-prep: error: cannot write" in r.stderr and "a writer process stopped" in r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_help_explains():
    r = run_cli("data_prep", "--help")
    assert r.returncode == 0
    for word in ("--source", "torchvision", "cifar-10-batches-py", "train.npz", "--limit-train", "--force"):
        assert word in r.stdout
