"""Data: FFCV loaders that deliver uint8 batches on the training device, and the batched
augmentation that runs there: random crop with zero padding, horizontal flip, normalization, and
optionally cutout, mixup and cutmix.

No per-image Python runs after decoding: FFCV's compiled pipeline fills a uint8 NHWC batch,
and `augment`/`normalize` are a handful of whole-batch tensor ops, identical on CPU and CUDA.
"""
from __future__ import annotations

import contextlib
import functools
import os
import queue
import threading
import weakref
from pathlib import Path

import numpy as np
import torch

from data_prep import MANIFEST_FILE, TEST_FILE, TRAIN_FILE, balanced_indices
from data_prep.convert import DataError, beton_labels, verify
from data_prep.ffcv_import import import_ffcv


def has_data(data_dir: str | os.PathLike) -> bool:
    """Any of the converted files is there (whether they are sound is verify's business)."""
    d = Path(data_dir)
    return any((d / f).exists() for f in (TRAIN_FILE, TEST_FILE, MANIFEST_FILE))


def ensure_data(cfg, dist, log=print) -> None:
    """Convert CIFAR-10 into cfg.data (from $FASTRES_CIFAR10 or the torchvision download, into
    cfg.data/downloads) when none of its files are there; files that are there are verified by
    Batches and never silently rebuilt."""
    if dist.main and not has_data(cfg.data):
        from data_prep.cli import prepare
        log(f"no .beton files in {cfg.data}: converting CIFAR-10 first")
        prepare(None, cfg.data)
    dist.barrier()


def make_loader(path, batch_size: int, device: torch.device, train: bool, seed: int = 0,
                limit: int | None = None, num_workers: int = -1, distributed: bool = False,
                shard: tuple[int, int] = (0, 1)):
    """An FFCV Loader yielding (images uint8 (N, 32, 32, 3) NHWC, labels int64 (N,)) on `device`.

    train=True: random order (epoch e's order depends only on seed and e), drop_last.
    train=False: sequential order, keeps the last partial batch.
    limit: a class-balanced subset of that many images (first ones of each class in file order).
    distributed: FFCV's DistributedSampler gives each rank a disjoint share of the random order.
    shard=(rank, world): keep every world-th image from rank on (disjoint sequential test shards).
    The loader is one that an earlier run of this process gave back (IDLE_LOADERS) when one with
    the same file, unchanged, and the same settings waits there.
    """
    import_ffcv()
    if not Path(path).is_file():
        raise DataError(path, ".beton file not found (convert CIFAR-10 with fastres-prep)")
    import numba  # FFCV decodes on numba's threads, which refuses more threads than it has

    # by default as many decoding threads as the process computes with
    workers = min(num_workers if num_workers > 0 else torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    seed = seed if train else 0  # a sequential order has none: one loader serves every seed's evaluation
    f = os.stat(path)  # the file as it is now: one converted again is another file
    key = (os.path.realpath(path), f.st_dev, f.st_ino, f.st_size, f.st_mtime_ns, batch_size, str(device), train,
           seed, limit, workers, distributed, shard)
    loader = IDLE_LOADERS.take(key)
    if loader is None:
        loader = _new_loader(path, batch_size, device, train, seed, limit, workers, distributed, shard)
        loader.idle_key = key
    return loader


def _new_loader(path, batch_size: int, device: torch.device, train: bool, seed: int, limit: int | None,
                workers: int, distributed: bool, shard: tuple[int, int]):
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import OrderOption
    from ffcv.transforms import Squeeze, ToDevice, ToTensor

    to_dev = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
    try:
        indices = balanced_indices(beton_labels(path), limit) if limit else None
    except ValueError as e:  # more images asked than the file (or a class) holds
        raise DataError(path, f"{e} (--train-limit / --test-limit)") from None
    rank, world = shard
    if world > 1:
        indices = (np.arange(len(beton_labels(path))) if indices is None else indices)[rank::world]
    return _thread_keeping_loader()(
        str(path), batch_size=batch_size, num_workers=workers, os_cache=True,
        order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL,
        drop_last=train, seed=seed, indices=indices, distributed=distributed,
        pipelines={
            "image": [SimpleRGBImageDecoder(), ToTensor(), *to_dev],
            "label": [IntDecoder(), ToTensor(), Squeeze(-1), *to_dev],
        })


class IdleLoaders:
    """Loaders that runs of this process gave back, for its next runs. FFCV compiles each Loader's
    pipeline with numba, about 1 s of a run's start on a 2-core CPU, into machine code that lives
    as long as the process (numba frees none: about 8 MB of memory a loader). A process that
    trains run after run (a sweep worker's trials, a run's seeds, a notebook) takes a loader made
    for an earlier run that nothing uses any more, with the same file and settings (make_loader),
    instead of compiling another; runs alive at the same time (a packed group) have their own.
    At most `size` wait, the longest idle leaving first."""

    def __init__(self, size: int):
        self.size, self.idle, self.lock = size, [], threading.Lock()  # idle: (key, loader), oldest first

    def take(self, key: tuple):
        with self.lock:
            for i, (k, loader) in enumerate(self.idle):
                if k == key:
                    del self.idle[i]
                    return loader
        return None

    def give_back(self, *loaders) -> None:
        """Loaders whose last epoch has ended (every reading thread of theirs has finished)."""
        with self.lock:
            self.idle += [(loader.idle_key, loader) for loader in loaders]
            del self.idle[:len(self.idle) - self.size]  # the longest idle (none when size is 0)


IDLE_LOADERS = IdleLoaders(size=16)  # a sweep over 3 batch sizes x 3 seeds keeps 9 + 1 (evaluation)


@functools.cache
def _thread_keeping_loader():
    """FFCV's Loader, with two mends: FFCV sets torch's intra-op thread count to its worker count
    when a loader is made and at every epoch, this one puts the count back, so a process computes
    on the threads it was given (N sweep workers sharing a CPU under OMP_NUM_THREADS) whatever its
    loaders decode with; and an epoch left early ends its reading thread."""
    from ffcv.loader import Loader

    class ThreadKeepingLoader(Loader):
        def __init__(self, *args, **kwargs):
            threads = torch.get_num_threads()
            try:
                super().__init__(*args, **kwargs)
            finally:
                torch.set_num_threads(threads)

        def __iter__(self):
            return self._epoch()

        def _epoch(self):
            """An epoch's batches. Left early (a run stopped mid-epoch, an exception) it stops FFCV's
            reading thread, which would otherwise wait forever, with its buffers, to hand over its
            next batch or the epoch's end."""
            threads = torch.get_num_threads()
            try:
                batches = super().__iter__()
            finally:
                torch.set_num_threads(threads)
            try:
                yield from batches
            finally:
                batches.close()
                while batches.is_alive():  # it sees the stop within 0.5 s, while it waits to hand over a batch,
                    batches.join(timeout=0.6)
                    with contextlib.suppress(queue.Empty):  # but not while it waits to hand over the epoch's
                        batches.output_queue.get_nowait()   # end: a place in its queue (no public way) ends that

    return ThreadKeepingLoader


PAD = 4  # px of zero padding on each side for the random crop (the paper's RandomCrop(32, padding=4))


def sample_crop_flip(n: int, generator: torch.Generator, pad: int = PAD, flip: bool = True):
    """Per-image random offsets dy, dx in [0, 2*pad] (int64 (N, 1)) and mirror flags (bool (N, 1))."""
    dev = generator.device
    dy = torch.randint(0, 2 * pad + 1, (n, 1), device=dev, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), device=dev, generator=generator)
    mirrored = torch.randint(0, 2, (n, 1), device=dev, generator=generator).bool() if flip else \
        torch.zeros(n, 1, dtype=torch.bool, device=dev)
    return dy, dx, mirrored


def crop_flip(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, mirrored: torch.Tensor,
              pad: int = PAD) -> torch.Tensor:
    """Crop each image of uint8 (N, H, W, C) from its zero-padded copy at (dy, dx), mirrored or not.

    One gather of whole pixels: out[n, i, j] = padded[n, i + dy_n, j' + dx_n], with j' = W-1-j for
    mirrored images. Only the final index add and the gather touch N*H*W elements.
    """
    padded = torch.nn.functional.pad(images, (0, 0, pad, pad, pad, pad))  # zero fill H and W
    return crop_flip_from(padded, torch.arange(images.shape[0], device=images.device), dy, dx, mirrored, pad)


def crop_flip_from(padded: torch.Tensor, index: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
                   mirrored: torch.Tensor, pad: int = PAD) -> torch.Tensor:
    """crop_flip(images[index], ...) for images held zero-padded once: padded is uint8
    (N_all, H+2*pad, W+2*pad, C). The batch's pixels are read straight from the whole set in one
    gather, without first copying the batch out and padding it (the two passes crop_flip makes)."""
    n = index.shape[0]
    _, hp, wp, c = padded.shape
    h, w = hp - 2 * pad, wp - 2 * pad
    dev = padded.device
    cols = torch.arange(w, device=dev).expand(n, w)
    cols = torch.where(mirrored, cols.flip(1), cols)
    rows = (index[:, None] * hp + dy + torch.arange(h, device=dev)) * wp
    flat = (rows[:, :, None] + (cols + dx)[:, None, :]).view(-1)
    return padded.view(-1, c).index_select(0, flat).view(n, h, w, c)


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = PAD, flip: bool = True) -> torch.Tensor:
    """Random crop (zero padding `pad` px on each side) and random horizontal flip, per image.

    images: uint8 (N, H, W, C) NHWC on any device; returns a new tensor of the same shape. Each
    image is shifted by (dy, dx) in [-pad, pad]^2, uniformly (81 offsets for pad=4), and mirrored
    with probability 1/2.
    """
    return crop_flip(images, *sample_crop_flip(images.shape[0], generator, pad, flip), pad)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype,
              channels_last: bool = True) -> torch.Tensor:
    """uint8 NHWC -> (x/255 - mean) / std as `dtype`, NCHW shape, channels_last memory if asked.

    mean/std: float32 (C,) of pixel/255 on the same device. One fused pass: x * scale + shift,
    with scale = 1/(255 std) and shift = -mean/std per channel.
    """
    x = torch.addcmul(-mean / std, images, 1 / (255 * std))  # (N, H, W, C) float32
    x = x.permute(0, 3, 1, 2).to(dtype)  # NCHW view of NHWC memory = channels_last
    return x if channels_last else x.contiguous()


def augment_normalize(images, dy, dx, mirrored, mean, std, dtype: torch.dtype, channels_last: bool,
                      pad: int = PAD) -> torch.Tensor:
    """crop_flip then normalize: what a training batch goes through. Batches compiles it (one
    fused gather-and-scale loop; 1.1-1.4x the eager images/s on the 2-core CPU, two runs)."""
    return normalize(crop_flip(images, dy, dx, mirrored, pad), mean, std, dtype, channels_last)


def gather_augment_normalize(padded, index, dy, dx, mirrored, mean, std, dtype: torch.dtype, channels_last: bool,
                             pad: int = PAD) -> torch.Tensor:
    """augment_normalize(images[index], ...) from the zero-padded resident set (crop_flip_from).
    Compiled, one pass from the resident set to the batch: 2.0-2.7x the images/s of copying the
    batch out and running the compiled augment_normalize on it (2-core CPU, batch 512, three runs)."""
    return normalize(crop_flip_from(padded, index, dy, dx, mirrored, pad), mean, std, dtype, channels_last)


def sample_cutout(n: int, generator: torch.Generator, image: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image square centres cy, cx, uniform over the image's pixels (int64 (N, 1))."""
    dev = generator.device
    cy = torch.randint(0, image, (n, 1), device=dev, generator=generator)
    cx = torch.randint(0, image, (n, 1), device=dev, generator=generator)
    return cy, cx


def cutout(x: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, size: int) -> torch.Tensor:
    """Cutout (DeVries and Taylor 2017): in each image of x (N, C, H, W, normalized), zero the
    size x size square with rows cy - size//2 ... cy - size//2 + size - 1 (columns likewise),
    clipped at the borders; zero is the mean pixel after normalization. x's memory format is kept."""
    h, w = x.shape[-2:]
    lo_y, lo_x = cy - size // 2, cx - size // 2
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows >= lo_y) & (rows < lo_y + size)  # (N, H)
    in_cols = (cols >= lo_x) & (cols < lo_x + size)  # (N, W)
    # clone keeps x's memory format (an out-of-place masked_fill would return NCHW)
    return x.clone().masked_fill_((in_rows[:, :, None] & in_cols[:, None, :])[:, None], 0)


class CutoutMixupCutmix:
    """What a training batch goes through after crop, flip and normalization: cutout (its centres
    from the epoch's generator, after the crop's draws) and mixup / cutmix (torchvision.transforms.v2's
    MixUp and CutMix: one Beta(alpha, alpha) coefficient per batch, the batch paired with itself
    rolled by one; with both, one of the two per batch at random). The targets become (N, classes)
    probabilities. v2 draws from torch's global generator, so each batch's draw runs under a
    generator seeded from (seed, epoch, step) and the global state is left as it was: a seed
    reproduces its batches and a resumed run draws what an uninterrupted one would. All off: the
    batch passes unchanged."""

    def __init__(self, seed: int, cutout_px: int = 0, mixup: float = 0.0, cutmix: float = 0.0, num_classes: int = 10):
        self.seed, self.cutout_px = seed, cutout_px
        mixes = []
        if mixup or cutmix:
            from torchvision.transforms import v2
            mixes = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup else []) + \
                    ([v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix else [])
        self.mix = None if not mixes else mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)

    def __call__(self, x, y, generator: torch.Generator, epoch: int, step: int):
        if self.cutout_px:
            x = cutout(x, *sample_cutout(x.shape[0], generator, x.shape[-1]), self.cutout_px)
        if self.mix is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(np.random.SeedSequence([self.seed, epoch, step, 2]).generate_state(1)[0]))
                x, y = self.mix(x, y)
        return x, y


def read_all(path, device: torch.device, limit: int | None = None, shard: tuple[int, int] = (0, 1),
             num_workers: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image (uint8 (N, 32, 32, 3)) and label (int64 (N,)) of a .beton, in file order (with
    `limit` and `shard` as make_loader takes them), read once through FFCV and put on `device`."""
    xs, ys = [], []
    loader = make_loader(path, 1000, torch.device("cpu"), False, limit=limit, num_workers=num_workers, shard=shard)
    for x, y in loader:
        xs.append(x.clone()), ys.append(y.to(torch.int64).clone())
    IDLE_LOADERS.give_back(loader)
    return torch.cat(xs).to(device), torch.cat(ys).to(device)


class Batches:
    """Training and test data for one run: uint8 batches from the .beton files + on-device augmentation.

    for x, y in data.train_epoch(e): x is normalized, augmented, `dtype`, channels_last.
    for x, y in data.test():          x is normalized only.

    Two loaders behind this one interface, chosen by `placement` (Batches(..., placement=P) makes
    the right one): StreamedBatches ("stream": FFCV's Loader reads and shuffles each epoch) and
    ResidentBatches ("device": both splits held on the training device). Either way the order and
    the augmentation are pure functions of (seed, epoch), which is what makes resume exact.
    """

    def __new__(cls, *args, placement: str = "stream", **kwargs):
        if cls is Batches:  # Batches(...) makes the loader its placement names
            cls = ResidentBatches if placement == "device" else StreamedBatches
        return super().__new__(cls)

    def __init__(self, data_dir, batch_size: int, eval_batch_size: int, device: torch.device, seed: int,
                 train_limit: int | None = None, test_limit: int | None = None, dtype=torch.float32,
                 channels_last: bool = True, augment: bool = True, num_workers: int = -1,
                 distributed: bool = False, rank: int = 0, world: int = 1, compile_augment: bool = False,
                 placement: str = "stream", cutout: int = 0, mixup: float = 0.0, cutmix: float = 0.0,
                 shared: dict | None = None):
        d = Path(data_dir)
        self.data_dir, self.test_limit, self.placement = d, test_limit, placement
        # Sizes, image and label counts and SHA-256 of both files against the manifest, before
        # FFCV maps them: a damaged file is one clear message, not an error from inside FFCV.
        self.manifest = verify(d)
        self.device, self.seed, self.dtype = device, seed, dtype
        self.channels_last, self.do_augment = channels_last, augment
        self.batch_size, self.eval_batch_size, self.rank, self.world = batch_size, eval_batch_size, rank, world
        self.cutout_mixup_cutmix = CutoutMixupCutmix(seed, cutout, mixup, cutmix)
        self.mean = torch.tensor(self.manifest["mean"], dtype=torch.float32, device=device)
        self.std = torch.tensor(self.manifest["std"], dtype=torch.float32, device=device)
        self.steps = self._load(d, train_limit, test_limit, num_workers, distributed, shared)
        # Compiled once per batch shape (training batches all share one: drop_last).
        self.prepare = torch.compile(self.AUGMENT, dynamic=False) if compile_augment else self.AUGMENT
        # Whole-dataset counts (over all ranks), not this rank's share.
        self.num_train = train_limit or self.manifest["counts"]["train"]
        self.num_test = test_limit or self.manifest["counts"]["test"]

    def __len__(self):
        return self.steps

    def epoch_generator(self, epoch: int, stream: int = 0) -> torch.Generator:
        # Augmentation randomness (stream 0) and the resident order (stream 1) are pure functions
        # of (seed, epoch), like FFCV's order, so a resumed run sees exactly the batches an
        # uninterrupted one would.
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed * 1_000_003 + epoch + stream * 7_919_000)
        return g

    def warmup(self):
        """Run the (compiled) augmentation once on a dummy batch, so compilation is not timed in epoch 1."""
        if self.do_augment:
            n = self.batch_size
            g = torch.Generator(device=self.device).manual_seed(0)
            self.prepare(*self._dummy_source(n), *sample_crop_flip(n, g), self.mean, self.std, self.dtype,
                         self.channels_last)

    def train_epoch(self, epoch: int):
        g = self.epoch_generator(epoch)
        for step, (x, y) in enumerate(self._augmented(epoch, g)):
            yield self.cutout_mixup_cutmix(x, y, g, epoch, step)

    def _augmented(self, epoch: int, g: torch.Generator):
        """Epoch `epoch`'s batches cropped, flipped (their draws from g) and normalized."""
        for images, labels in self._train_raw(epoch):
            if self.do_augment:
                x = self.prepare(images, *sample_crop_flip(images.shape[0], g), self.mean, self.std, self.dtype,
                                 self.channels_last)
            else:
                x = normalize(images, self.mean, self.std, self.dtype, self.channels_last)
            yield x, labels

    def test(self):
        for images, labels in self._test_raw():
            yield normalize(images, self.mean, self.std, self.dtype, self.channels_last), labels

    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole test set as uint8 images and labels in file order (the same images test()
        yields, all ranks' together), read from the file."""
        return read_all(self.data_dir / TEST_FILE, torch.device("cpu"), self.test_limit)


class StreamedBatches(Batches):
    """FFCV's Loader reads and shuffles each epoch (its order: permutation(seed + e), each rank a
    disjoint share); batches are augmented on the device as they arrive."""
    AUGMENT = staticmethod(augment_normalize)

    def _load(self, d: Path, train_limit, test_limit, num_workers: int, distributed: bool, shared) -> int:
        self.train_loader = make_loader(d / TRAIN_FILE, self.batch_size, self.device, True, self.seed, train_limit,
                                        num_workers, distributed)
        self.test_loader = make_loader(d / TEST_FILE, self.eval_batch_size, self.device, False, self.seed,
                                       test_limit, num_workers, distributed=False, shard=(self.rank, self.world))
        # Given back for the next run of this process once this one is gone (its epochs with it).
        weakref.finalize(self, IDLE_LOADERS.give_back, self.train_loader, self.test_loader).atexit = False
        return len(self.train_loader)

    @property
    def test_batches(self) -> int:
        """Evaluation batches on this rank."""
        return len(self.test_loader)

    def _dummy_source(self, n: int) -> tuple:
        return (torch.zeros(n, 32, 32, 3, dtype=torch.uint8, device=self.device),)

    def _train_raw(self, epoch: int):
        """uint8 images and int64 labels of epoch `epoch`, in this rank's order."""
        self.train_loader.next_epoch = epoch  # FFCV's order for epoch e: permutation(seed + e)
        for images, labels in self.train_loader:
            yield images, _own(labels)

    def _test_raw(self):
        return ((images, _own(labels)) for images, labels in self.test_loader)

    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One process: read through the evaluation's own loader (a Loader of its own would compile
        FFCV's pipeline again, about 1 s of every run); ranks' shards: from the file."""
        if self.world > 1:
            return super().test_set()
        xs, ys = zip(*((x.to("cpu", copy=True), y.cpu()) for x, y in self._test_raw()))  # FFCV reuses x's memory
        return torch.cat(xs), torch.cat(ys)


class ResidentBatches(Batches):
    """Both splits read once into uint8 tensors on the training device (CIFAR-10's training set is
    154 MB, 240 MB held zero-padded for the crop); each epoch's order is a permutation drawn there
    from (seed, epoch), each rank taking its own contiguous share, and each batch is cropped out of
    the padded set in one gather, so no per-batch work leaves the device. `shared`: one copy on
    the device for several runs of one process (a packed group), keyed by what it holds."""
    AUGMENT = staticmethod(gather_augment_normalize)

    def _load(self, d: Path, train_limit, test_limit, num_workers: int, distributed: bool, shared) -> int:
        key = (str(d.resolve()), str(self.device), train_limit, test_limit, self.rank, self.world)
        if shared is None or key not in shared:
            train_x, train_y = read_all(d / TRAIN_FILE, self.device, train_limit, num_workers=num_workers)
            # Held zero-padded by PAD, so a batch is cropped straight out of it
            # (gather_augment_normalize); train_x is the unpadded view of the same memory.
            padded = torch.nn.functional.pad(train_x, (0, 0, PAD, PAD, PAD, PAD))
            del train_x
            test = read_all(d / TEST_FILE, self.device, test_limit, (self.rank, self.world), num_workers)
            if shared is not None:
                shared[key] = (padded, train_y, *test)
        else:
            padded, train_y, *test = shared[key]
        self.train_padded, self.train_y = padded, train_y
        self.train_x = self.train_padded[:, PAD:-PAD, PAD:-PAD]
        self.test_x, self.test_y = test
        return len(self.train_y) // self.world // self.batch_size  # drop_last, per rank

    @property
    def test_batches(self) -> int:
        """Evaluation batches on this rank."""
        return -(-len(self.test_y) // self.eval_batch_size)

    def _dummy_source(self, n: int) -> tuple:
        return self.train_padded, torch.zeros(n, dtype=torch.int64, device=self.device)

    def _batch_indices(self, epoch: int):
        """Indices into the resident training set of each batch of epoch `epoch`, this rank's share."""
        n = len(self.train_y)
        order = torch.randperm(n, generator=self.epoch_generator(epoch, stream=1), device=self.device)
        share = n // self.world
        order = order[self.rank * share:(self.rank + 1) * share]
        for s in range(self.steps):
            yield order[s * self.batch_size:(s + 1) * self.batch_size]

    def _train_raw(self, epoch: int):
        """uint8 images and int64 labels of epoch `epoch`, in this rank's order."""
        for idx in self._batch_indices(epoch):
            yield self.train_x[idx], self.train_y[idx]

    def _augmented(self, epoch: int, g: torch.Generator):
        """Cropped straight out of the padded set, flipped and normalized in one gather."""
        if not self.do_augment:
            yield from super()._augmented(epoch, g)
            return
        for idx in self._batch_indices(epoch):
            x = self.prepare(self.train_padded, idx, *sample_crop_flip(idx.shape[0], g), self.mean, self.std,
                             self.dtype, self.channels_last)
            yield x, self.train_y[idx]

    def _test_raw(self):
        b = self.eval_batch_size
        return ((self.test_x[i:i + b], self.test_y[i:i + b]) for i in range(0, len(self.test_y), b))

    def test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The resident tensors when they hold all of the test set (one process), else read."""
        return (self.test_x, self.test_y) if self.world == 1 else super().test_set()


def _own(labels: torch.Tensor) -> torch.Tensor:
    # FFCV reuses its output buffers a few batches later; a copy (N int64s) keeps ours valid.
    return labels.to(torch.int64, copy=True)
