"""What a run writes besides its checkpoint: record.json (RunRecord), the environment it ran in,
metrics.csv, curves.png and TensorBoard scalars."""
from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from .config import Config
from .rundir import CHECKPOINT, CURVES, METRICS_CSV, RECORD, atomic_write  # noqa: F401 (the run's file names)


def environment(rt) -> dict:
    """The machine's facts (fastres.machine.facts(), as `fastres env` shows them) with the run's
    device, threads and commit."""
    from .machine import facts

    # FASTRES_GIT_COMMIT names the commit of a copied tree whose .git is absent or stale (a tree
    # copied to an offline machine); otherwise git says.
    commit = os.environ.get("FASTRES_GIT_COMMIT")
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                          capture_output=True, text=True, timeout=5).stdout.strip() or None
    except Exception:
        commit = None
    return {**facts(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": str(rt.device), "device_name": rt.summary.get("device_name", platform.processor() or "cpu"),
            "git_commit": commit}


class RunRecord(dict):
    """record.json of a run, as a dict: what the run is (`fields`, known at its start), then its
    epochs so far, their totals, its final figures and its status. save() writes it (atomically,
    from the main process only) at every change of status and after every epoch."""

    def __init__(self, path: Path, main: bool, fields: dict, step, device, t_start: float, resumed_at_epoch):
        super().__init__(fields, status="running")
        self.path, self.main, self.step, self.device = path, main, step, device
        self.t_start, self.resumed_at_epoch = t_start, resumed_at_epoch

    def save(self, status: str, history: list) -> None:
        if not self.main:
            return
        self.update(status=status, epochs=history, resumed_at_epoch=self.resumed_at_epoch,
                    train_s_total=round(sum(h["train_s"] for h in history), 3),
                    eval_s_total=round(sum(h["eval_s"] for h in history), 3),
                    wall_s_this_process=round(time.perf_counter() - self.t_start, 3))
        self["loss_scaling"] = self.step.scaling_report()  # fp16: steps skipped, final scale; else None
        if self.device.type == "cuda":  # this process's peak (a packed group's: all its runs together)
            self["device_memory_peak_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        if history:
            self.update(final_test_acc=history[-1]["test_acc"], final_test_loss=history[-1]["test_loss"],
                        best_test_acc=max(h["test_acc"] for h in history),
                        mean_epoch_train_s=round(self["train_s_total"] / len(history), 4))
        atomic_write(self.path, lambda p: p.write_text(json.dumps(self, indent=2, default=str)))


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    # fixed margins: tight_layout would measure every label again each epoch (a third of the plot's time)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.84, wspace=0.25)
    a1.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    a1.plot(ep, [h["test_loss"] for h in history], "s-", label="test")
    a1.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    a2.plot(ep, [100 * h["train_acc"] for h in history], "o-", label="train")
    a2.plot(ep, [100 * h["test_acc"] for h in history], "s-", label="test")
    a2.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
        a.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    fig.suptitle(title)
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


# The per-epoch metrics, written once: (key, the console table's header, width, format; None: not
# in the table). The table, metrics.csv, TensorBoard and record.json's epochs all take these keys.
COLUMNS = (("epoch", "epoch", 5, ""), ("lr", "lr", 9, ".5f"), ("train_loss", "train_loss", 10, ".4f"),
           ("train_acc", "train_acc", 9, ".2%"), ("test_loss", "test_loss", 9, ".4f"),
           ("test_acc", "test_acc", 8, ".2%"), ("train_s", "train_s", 9, ".2f"), ("eval_s", None, 0, ""),
           ("images_per_s", "img/s", 9, ".0f"))  # accuracies are fractions, times seconds
METRICS = tuple(key for key, *_ in COLUMNS)


def table_head() -> str:
    return " ".join(f"{head:>{width}}" for _, head, width, _ in COLUMNS if head)


def table_row(h: dict) -> str:
    return " ".join(f"{h[key]:>{width}{fmt}}" for key, head, width, fmt in COLUMNS if head)


def epoch_metrics(epoch: int, lr: float, loss_sum: float, correct: float, images: int, test_loss: float,
                  test_acc: float, train_s: float, eval_s: float) -> dict:
    """One epoch's row of METRICS: training sums over `images` as means, times in seconds."""
    return {"epoch": epoch, "lr": lr, "train_loss": loss_sum / images, "train_acc": correct / images,
            "test_loss": test_loss, "test_acc": test_acc, "train_s": round(train_s, 4),
            "eval_s": round(eval_s, 4), "images_per_s": round(images / train_s, 1)}


def write_metrics_csv(history: list[dict], path: Path) -> None:
    """One row per epoch: the columns of the console table, with eval seconds (accuracies as fractions)."""
    def write(p):
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRICS, extrasaction="ignore")
            w.writeheader()
            w.writerows(history)
    atomic_write(path, write)


class TensorBoard:
    """Scalars per epoch under RUN_DIR/tensorboard when --tensorboard is on and the package is
    installed; otherwise a no-op (with one message saying why)."""

    def __init__(self, cfg: Config, out: Path, enabled: bool, log=print):
        self.writer = None
        if not (cfg.tensorboard and enabled):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log("--tensorboard: the tensorboard package is not installed (pip install tensorboard); "
                "metrics.csv and record.json hold the same numbers")
            return
        self.writer = SummaryWriter(str(out / "tensorboard"))

    def add(self, h: dict) -> None:
        if self.writer is not None:
            for k in METRICS[1:]:
                self.writer.add_scalar(k, h[k], h["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
