"""The plain-PyTorch way to train the seed paper's model: what fastres is measured against.

This is how the paper's authors would have trained ResNet-68 (and how most CIFAR-10 tutorials
do): a torchvision `CIFAR10`-style dataset over the uint8 arrays (PIL image per sample),
`RandomCrop(32, padding=4)`, `RandomHorizontalFlip`, `ToTensor`, `Normalize` run per image in
DataLoader worker processes, `pin_memory=True`, and an eager fp32 NCHW training step with SGD
(lr 0.01, momentum 0.9, weight decay 5e-4) at batch 64. The model is fastres's own ResNet-68,
so only the way it is fed and stepped differs. bench/test_baseline.py times its epochs next to
fastres's default.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from PIL import Image

from fastres.data import make_loader
from fastres.model import resnet


class TorchvisionCIFAR(torch.utils.data.Dataset):
    """torchvision.datasets.CIFAR10's __getitem__, over arrays already in memory."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def beton_arrays(path, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 32, 32, 3) images and labels of a .beton, in file order."""
    loader = make_loader(path, 1000, torch.device("cpu"), train=False, num_workers=2, limit=limit)
    xs, ys = zip(*[(x.numpy().copy(), y.numpy().copy()) for x, y in loader])
    return np.concatenate(xs), np.concatenate(ys)


def train_plain(images, labels, mean, std, epochs: int, device: torch.device, workers: int,
                batch_size: int = 64, depth: int = 68, seed: int = 0) -> list[dict]:
    """Train as above; per epoch: wall seconds (data loading included, device-synchronized),
    images/s, mean training loss and accuracy."""
    import torchvision.transforms as T

    torch.manual_seed(seed)
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    dl = torch.utils.data.DataLoader(TorchvisionCIFAR(images, labels, tf), batch_size=batch_size, shuffle=True,
                                     num_workers=workers, pin_memory=device.type == "cuda", drop_last=True)
    model = resnet(depth).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loss_fn = torch.nn.CrossEntropyLoss()
    out = []
    for _ in range(epochs):
        model.train()
        loss_sum, correct, n = 0.0, 0, 0
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for x, y in dl:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            loss = loss_fn(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(y)  # the per-step .item() most training scripts have
            correct += (logits.argmax(1) == y).sum().item()
            n += len(y)
        sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        s = time.perf_counter() - t0
        out.append({"train_s": s, "images_per_s": n / s, "train_loss": loss_sum / n, "train_acc": correct / n})
    return out
