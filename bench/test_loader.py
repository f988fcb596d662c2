"""Group 'loader': images/s of the training input path, fastres vs. a torchvision DataLoader.

Both deliver the same images, augmented (random crop 32 with padding 4, horizontal flip) and
normalized, as float32 batches of BATCH on the training device. A round pulls ROUND_BATCHES
batches from an already-running stream, so worker start-up and JIT compilation are excluded
(they are reported as warmup_s).
"""
import pytest
import torch

from bench.common import CUDA, DEVICE, MINIMAL, median_s, sync, timed
from bench.baseline import TorchvisionCIFAR, beton_arrays
from fastres.data import Batches

BATCH = 512
ROUND_BATCHES = 2 if MINIMAL else 20
ROUNDS = 1 if MINIMAL else 5


def stream(epoch_iter):
    """Endless batches across epochs."""
    e = 0
    while True:
        yield from epoch_iter(e)
        e += 1


def report(benchmark, warmup_s):
    benchmark.extra_info.update(batch_size=BATCH, images_per_round=BATCH * ROUND_BATCHES, warmup_s=warmup_s,
                                images_per_s=BATCH * ROUND_BATCHES / median_s(benchmark), device=str(DEVICE))


def pull(it):
    for _ in range(ROUND_BATCHES):
        x, y = next(it)
    sync()
    return x


@pytest.mark.benchmark(group="loader")
@pytest.mark.parametrize("placement", ["stream", "device"])
def test_ffcv_device_aug(benchmark, bench_data, placement):
    """stream: FFCV reads every batch; device: the split held on the device, batches sliced there."""
    b = Batches(bench_data, BATCH, 1000, DEVICE, seed=0, compile_augment=True, placement=placement)  # as in training
    it = stream(b.train_epoch)
    _, warm = timed(pull, it)
    x = benchmark.pedantic(pull, args=(it,), rounds=ROUNDS, iterations=1)
    assert x.shape == (BATCH, 3, 32, 32) and x.dtype == torch.float32
    report(benchmark, warm)


@pytest.mark.benchmark(group="loader")
def test_torchvision_dataloader(benchmark, bench_data):
    import torchvision.transforms as T
    from data_prep import read_manifest

    m = read_manifest(bench_data)
    images, labels = beton_arrays(bench_data / "cifar10_train.beton")
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(m["mean"], m["std"])])
    dl = torch.utils.data.DataLoader(TorchvisionCIFAR(images, labels, tf), batch_size=BATCH, shuffle=True,
                                     num_workers=2, drop_last=True, persistent_workers=True, pin_memory=CUDA)

    def epoch(_):
        for x, y in dl:
            yield x.to(DEVICE, non_blocking=True), y.to(DEVICE, non_blocking=True)

    it = stream(epoch)
    _, warm = timed(pull, it)
    x = benchmark.pedantic(pull, args=(it,), rounds=ROUNDS, iterations=1)
    assert x.shape == (BATCH, 3, 32, 32)
    report(benchmark, warm)
