"""What a model's predictions say, beyond one accuracy figure: class probabilities of one model or
an ensemble (their mean softmax), with flip TTA; per-class accuracy; the confusion matrix as CSV
and as a heatmap; the test images it got wrong most confidently, as a grid.

    logp = log_probabilities(models, images, mean, std, rt, tta)   # (N, classes), float32, CPU
    summary = write_results(folder, logp, labels, images)          # confusion.csv/.png, mistakes.png

Used at the end of every run (on the run's evaluated model), by `fastres eval` (one checkpoint or
an ensemble) and by `fastres predict` (images without labels).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from data_prep.sources import CLASSES

from .data import normalize
from .rundir import atomic_write

CONFUSION_CSV, CONFUSION_PNG, MISTAKES_PNG = "confusion.csv", "confusion.png", "mistakes.png"


@torch.no_grad()
def log_probabilities(models: list, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, rt, tta: bool = False,
                      batch: int = 1000, wrap=lambda batches: batches) -> torch.Tensor:
    """log of the class probabilities of uint8 NHWC `images` (on any device), float32 (N, classes)
    on the CPU. One model: log_softmax of its logits (with tta, of the mean logits of each image and
    its mirror, as training's evaluation does). Several: log of the mean of their softmaxes.
    wrap: around the batches' start indices (a progress bar)."""
    out = []
    for i in wrap(range(0, len(images), batch)):
        x = normalize(images[i:i + batch].to(rt.device), mean.to(rt.device), std.to(rt.device), torch.float32,
                      rt.channels_last)
        members = []
        for m in models:
            m.eval()
            with rt.autocast():
                logits = m(x).float()
                if tta:
                    logits = 0.5 * (logits + m(x.flip(3)).float())
            members.append(torch.log_softmax(logits.float(), 1))
        out.append(ensemble(members).cpu())
    return torch.cat(out)


def ensemble(member_logps: list) -> torch.Tensor:
    """log of the mean of the members' probabilities (the identity for one member)."""
    if len(member_logps) == 1:
        return member_logps[0]
    return torch.logsumexp(torch.stack(member_logps), 0) - math.log(len(member_logps))


def nll_and_accuracy(logp: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean negative log-likelihood of the true labels, and the share predicted right."""
    labels = labels.cpu()
    nll = -logp.gather(1, labels[:, None]).double().sum().item() / len(labels)
    return nll, (logp.argmax(1) == labels).double().mean().item()


def confusion(labels, predicted, classes: int) -> np.ndarray:
    """counts[t, p]: images of true class t predicted as p."""
    labels, predicted = np.asarray(labels, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    return np.bincount(labels * classes + predicted, minlength=classes * classes).reshape(classes, classes)


def per_class_accuracy(counts: np.ndarray, names) -> dict:
    """Accuracy of each class that has test images (right / its images), by name."""
    rows = counts.sum(1)
    return {n: float(counts[i, i] / rows[i]) for i, n in enumerate(names) if rows[i]}


def write_results(folder: Path, logp: torch.Tensor, labels: torch.Tensor, images: torch.Tensor,
                  names=CLASSES, title: str = "") -> dict:
    """confusion.csv (a row per true class: its counts per predicted class and its accuracy),
    confusion.png and mistakes.png in `folder`; returns the per-class accuracy and the matrix."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = confusion(labels.cpu().numpy(), logp.argmax(1).numpy(), len(names))
    acc = per_class_accuracy(counts, names)
    lines = ["true\\predicted," + ",".join(names) + ",accuracy"]
    for i, n in enumerate(names):
        lines.append(f"{n}," + ",".join(map(str, counts[i])) + f",{acc.get(n, float('nan')):.4f}")
    atomic_write(folder / CONFUSION_CSV, lambda p: p.write_text("\n".join(lines) + "\n"))
    plot_confusion(counts, names, folder / CONFUSION_PNG, title)
    plot_mistakes(images, labels, logp, names, folder / MISTAKES_PNG, title)
    return {"per_class_acc": acc, "confusion": counts.tolist()}


def test_set_results(folder: Path, models: list, test_set: tuple, mean, std, rt, tta: bool, title: str = "",
                     batch: int = 1000) -> dict:
    """write_results for `models` on test_set = (uint8 images, labels), as Batches.test_set()
    gives it."""
    images, labels = test_set
    logp = log_probabilities(models, images, mean, std, rt, tta, batch)
    return write_results(folder, logp, labels, images, title=title)


def plot_confusion(counts: np.ndarray, names, path: Path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)  # each true class's row sums to 1
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    fig.subplots_adjust(left=0.17, right=0.92, bottom=0.17, top=0.94)  # fixed: room for the class names
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for t in range(len(names)):
        for p in range(len(names)):
            ax.text(p, t, str(counts[t, p]), ha="center", va="center", fontsize=7,
                    color="white" if share[t, p] > 0.5 else "black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted"), ax.set_ylabel("true")
    ax.set_title(f"confusion matrix{': ' + title if title else ''} (colour: share of the true class)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def plot_mistakes(images: torch.Tensor, labels: torch.Tensor, logp: torch.Tensor, names, path: Path,
                  title: str = "", count: int = 32) -> None:
    """The `count` wrong predictions made with the highest probability, each image with its true
    and predicted class and that probability."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf, pred = logp.exp().max(1)
    wrong = (pred != labels.cpu()).nonzero().flatten()
    worst = wrong[conf[wrong].argsort(descending=True)[:count]]
    cols = 8
    rows = max(1, math.ceil(len(worst) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 1.9 + 0.6), squeeze=False)
    # fixed margins, and labels as text rather than axes titles: matplotlib lays out 32 titled
    # axes in about a second, most of this plot's time
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.75 / (rows * 1.9 + 0.6), hspace=0.45,
                        wspace=0.1)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, worst.tolist()):
        ax.imshow(images[i].cpu().numpy())
        ax.text(0.5, 1.03, f"{names[labels[i]]}\n-> {names[pred[i]]} {conf[i]:.0%}", fontsize=7,
                ha="center", va="bottom", transform=ax.transAxes)
    fig.suptitle(f"most confident mistakes{': ' + title if title else ''} (true -> predicted, probability)"
                 + ("" if len(worst) else ": none"), fontsize=9)
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
