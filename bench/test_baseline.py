"""Group 'baseline': epoch time of fastres's default against the plain-PyTorch way (bench/baseline.py).

Both train the same ResNet-68 at batch 64 on the same images for the same number of epochs:
CUDA: 2 epochs of all 50,000 images, the DataLoader with 8 workers; CPU: 1 epoch of a
1,024-image slice with 2 workers (a CPU run takes minutes, not hours). fastres's epoch time
excludes its warm-up (compilation), reported apart as warmup_s; the baseline has none.
images_per_s is over the training epochs; the summary prints fastres's ratio to the baseline.
"""
import pytest

from bench.common import CUDA, DEVICE, MINIMAL

EPOCHS = 1 if MINIMAL or not CUDA else 2
LIMIT = 128 if MINIMAL else (None if CUDA else 1024)
DEPTH = 8 if MINIMAL else 68


def report(benchmark, trainer, epochs: list[dict], **extra):
    s = [e["train_s"] for e in epochs]
    benchmark.extra_info.update(
        trainer=trainer, epochs=len(s), epoch_train_s=sum(s) / len(s), epoch_train_s_each=s, batch_size=64,
        images_per_s=sum(e["images_per_s"] for e in epochs) / len(epochs), depth=DEPTH, device=str(DEVICE), **extra)


@pytest.mark.benchmark(group="baseline")
def test_torchvision_style(benchmark, bench_data):
    from bench.baseline import beton_arrays, train_plain
    from data_prep import read_manifest

    m = read_manifest(bench_data)
    images, labels = beton_arrays(bench_data / "cifar10_train.beton", LIMIT)
    workers = 8 if CUDA else 2
    epochs = benchmark.pedantic(lambda: train_plain(images, labels, m["mean"], m["std"], EPOCHS, DEVICE, workers,
                                                    depth=DEPTH), rounds=1, iterations=1)
    report(benchmark, "torchvision DataLoader, PIL transforms, eager fp32 NCHW", epochs, workers=workers,
           train_loss=epochs[-1]["train_loss"])


@pytest.mark.benchmark(group="baseline")
def test_fastres_default(benchmark, bench_data, tmp_path):
    from fastres.config import make_config
    from fastres.train import train

    cfg = make_config("paper", {"epochs": EPOCHS, "depth": DEPTH, "train_limit": LIMIT or 0, "test_limit": 100 if MINIMAL else 500,
                                "data": str(bench_data), "out": str(tmp_path / "run"), "device": DEVICE.type})
    rec = benchmark.pedantic(lambda: train(cfg, log=lambda *a, **k: None), rounds=1, iterations=1)
    assert rec["status"] == "finished"
    report(benchmark, "fastres (paper preset, default switches)", rec["epochs"], warmup_s=rec["warmup_s"],
           switches=rec["switches"], train_loss=rec["epochs"][-1]["train_loss"])
