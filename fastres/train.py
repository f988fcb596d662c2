"""fastres training, top to bottom.

    train(cfg) -> record dict      (the CLI is fastres/cli.py)

1. resolve the performance switches once (runtime.py) and join torchrun's group if launched by it
2. make sure the .beton files exist (converting on demand), build loaders + on-device augmentation
3. build ResNet, SGD, the per-step lr schedule and the (optional) weight EMA
4. warm up (compilation, cuDNN autotuning) on random data, timed apart, then restore the state
5. resume from RUN_DIR/last.pt if asked
6. per epoch: train (progress bar), evaluate, print a table row, write record.json, curves.png
   and last.pt (atomically); stop on a non-finite loss, keeping the last good checkpoint

The run folder is locked while the run writes it, and Ctrl-C stops between two steps; failures
a user can act on raise fastres.errors types (see there for the exit statuses).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import csv
import importlib.metadata
import io
import json
import math
import os
import platform
import random
import signal
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import runtime
from .config import Config, from_dict
from .data import Batches, has_data
from .distributed import Dist
from .errors import BadInput, Diverged, Interrupted, OutputError
from .model import count_params, resnet
from .progress import Progress, duration
from .rundir import (RunLock, StopRequest, atomic_write, latest_run, link_latest, load_checkpoint, new_run_dir,
                     prepare_out, remove_stale_temporaries)
from .step import EpochSums, make_whole_step

CHECKPOINT, RECORD, CURVES, METRICS_CSV = "last.pt", "record.json", "curves.png", "metrics.csv"
# Settings a resumed run may change: they move files or threads around, not the arithmetic.
RESUME_MAY_DIFFER = {"out", "data", "loader_workers", "device", "eval_batch_size", "progress_s", "tensorboard"}


class NonFiniteLoss(Diverged):
    pass


class ResumeError(BadInput):
    pass


# ---------------------------------------------------------------------------------------------
# Pieces the loop uses: schedule, parameter groups, EMA, evaluation, checkpoint I/O
# ---------------------------------------------------------------------------------------------
def peak_lr(cfg: Config) -> float:
    """Peak lr: cfg.lr, scaled linearly by batch_size / lr_ref_batch when lr_ref_batch > 0."""
    return cfg.lr * (cfg.batch_size / cfg.lr_ref_batch if cfg.lr_ref_batch else 1.0)


def lr_factor(cfg: Config, steps_per_epoch: int):
    """Multiplier of the peak lr at optimizer step s (0-based), for LambdaLR stepped every step.

    Linear warm-up over warmup_epochs, then cosine to 0. 'cosine_epoch' holds the lr constant
    within an epoch, exactly like CosineAnnealingLR(T_max=epochs) stepped once per epoch.
    """
    warm = round(cfg.warmup_epochs * steps_per_epoch)
    total = cfg.epochs * steps_per_epoch

    def f(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        if cfg.schedule == "cosine_epoch":
            return 0.5 * (1 + math.cos(math.pi * (s // steps_per_epoch) / cfg.epochs))
        return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))

    return f


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """With no_decay_bn_bias, 1-D parameters (BN weight/bias, linear bias) get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not cfg.no_decay_bn_bias:
        return [{"params": params, "weight_decay": cfg.weight_decay}]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def make_criterion(cfg: Config) -> torch.nn.Module:
    """Cross-entropy; label_smoothing moves that much probability mass to a uniform target."""
    return torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


class EMA:
    """Exponential moving average of the weights (buffers copied), used for evaluation.

    The decay warms up with the number of updates n: min(decay, (1 + n) / (10 + n)), as the common
    implementations do (TensorFlow's num_updates, timm), so that a short run's EMA is an average
    of its recent weights rather than of the initial ones (decay 0.999 alone keeps 85% of the
    initial weights after 156 steps). `updates` goes into the checkpoint. decay 0 makes it a
    no-op whose `.model` is the trained model itself.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.source, self.updates = decay, model, 0
        self.model = model
        if decay > 0:
            self.model = copy.deepcopy(model).eval().requires_grad_(False)
            self._ema_p = list(self.model.parameters())
            self._src_p = list(model.parameters())
            self._ema_b, self._src_b = list(self.model.buffers()), list(model.buffers())

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self):
        if self.decay > 0:
            torch._foreach_lerp_(self._ema_p, self._src_p, 1 - self.current_decay())
            self.updates += 1
            for e, s in zip(self._ema_b, self._src_b):
                e.copy_(s)

    def state_dict(self):
        return self.model.state_dict() if self.decay > 0 else None

    def load_state_dict(self, sd):
        if self.decay > 0:
            self.model.load_state_dict(sd)


@torch.no_grad()
def evaluate(model, batches, rt: runtime.Runtime, tta: bool, dist: Dist) -> tuple[float, float, int]:
    """(mean loss, accuracy, images evaluated) on the test set, summed over all ranks; with tta,
    on the mean logits of image and mirror."""
    model.eval()
    loss_sum = torch.zeros((), device=rt.device, dtype=torch.float64)
    correct = torch.zeros((), device=rt.device, dtype=torch.int64)
    count = torch.zeros((), device=rt.device, dtype=torch.int64)
    for x, y in batches.test():
        with rt.autocast():
            logits = model(x).float()
            if tta:
                logits = 0.5 * (logits + model(x.flip(3)).float())
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        count += y.numel()
    dist.sum(loss_sum), dist.sum(correct), dist.sum(count)
    return loss_sum.item() / count.item(), correct.item() / count.item(), count.item()


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"].cpu())
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in s["cuda"]])


def environment(rt: runtime.Runtime) -> dict:
    def version(dist_name):  # the installed distribution's version (ffcv's __version__ is stale)
        try:
            return importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            return None

    # FASTRES_GIT_COMMIT names the commit of a copied tree whose .git is absent or stale (a tree
    # copied to an offline machine); otherwise git says.
    commit = os.environ.get("FASTRES_GIT_COMMIT")
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                          capture_output=True, text=True, timeout=5).stdout.strip() or None
    except Exception:
        commit = None
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": version("triton"),
            "ffcv": version("ffcv"), "numpy": version("numpy"), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": str(rt.device), "device_name": rt.summary.get("device_name", platform.processor() or "cpu"),
            "git_commit": commit}


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
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
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


METRICS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "train_s", "eval_s", "images_per_s")


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


class TrainStep(EpochSums):
    """step(x, y) -> (loss, logits), detached: one optimizer step on a batch, its loss and
    correct predictions added to the epoch's device-side sums (EpochSums). fastres.step.WholeStep
    has the same interface."""

    def __init__(self, model, opt, sched, ema, criterion, rt: runtime.Runtime):
        super().__init__(rt.device)
        self.model, self.opt, self.sched, self.ema, self.criterion, self.rt = model, opt, sched, ema, criterion, rt
        self.step_begin = rt.step_begin

    def after_load(self):
        """WholeStep re-syncs its device copies of the state here; this step holds none."""

    def __call__(self, x, y):
        self.step_begin()
        with self.rt.autocast():
            logits = self.model(x)
            loss = self.criterion(logits, y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        self.ema.update()
        loss, logits = loss.detach(), logits.detach()
        self.count(loss, logits, y)
        return loss, logits


def build_step(cfg: Config, rt: runtime.Runtime, model, train_model, opt, sched, ema, criterion, steps_per_epoch: int):
    """The training step: with --whole-step, forward, backward, SGD and EMA as one CUDA graph
    (fastres/step.py, over `model` compiled without CUDA graphs of its own); else the usual step
    over `train_model` (compiled or not, DDP-wrapped under torchrun)."""
    if rt.whole_step:
        return make_whole_step(rt.compile_in_graph(model), opt, sched, ema, criterion, rt,
                               lr_factor(cfg, steps_per_epoch), peak_lr(cfg), cfg.epochs * steps_per_epoch)
    return TrainStep(train_model, opt, sched, ema, criterion, rt)


def build_model(cfg: Config, rt: runtime.Runtime) -> torch.nn.Module:
    return resnet(cfg.depth, cfg.widths, norm=rt.norm).to(rt.device, memory_format=rt.memory_format)


def ensure_data(cfg: Config, dist: Dist, log=print) -> None:
    """Convert CIFAR-10 into cfg.data (from $FASTRES_CIFAR10 or the torchvision download, into
    cfg.data/downloads) when none of its files are there; files that are there are verified by
    Batches and never silently rebuilt."""
    if dist.main and not has_data(cfg.data):
        from data_prep.cli import prepare
        log(f"no .beton files in {cfg.data}: converting CIFAR-10 first")
        prepare(None, cfg.data)
    dist.barrier()


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
ROW = "{epoch:>5} {lr:>9.5f} {train_loss:>10.4f} {train_acc:>9.2%} {test_loss:>9.4f} {test_acc:>8.2%} " \
      "{train_s:>9.2f} {images_per_s:>9.0f}"
HEAD = f"{'epoch':>5} {'lr':>9} {'train_loss':>10} {'train_acc':>9} {'test_loss':>9} {'test_acc':>8} " \
       f"{'train_s':>9} {'img/s':>9}"


def train(cfg: Config, resume: bool = False, log=print) -> dict:
    t_start = time.perf_counter()
    dist = Dist.from_env(cfg.device)
    log = log if dist.main else (lambda *a, **k: None)
    if not cfg.out:  # a new runs/PRESET/DATE-TIME (resuming: the latest run), the same on every rank
        out = latest_run() if resume else new_run_dir(cfg.preset)
        cfg = dataclasses.replace(cfg, out=dist.broadcast_str(str(out)))
    with contextlib.ExitStack() as held:
        out = Path(cfg.out)
        if dist.main:  # before any heavy work: the folder is writable and no other run holds it
            prepare_out(out)
            held.enter_context(RunLock(out, log))
            remove_stale_temporaries(out, log)
            link_latest(out)
        stop = held.enter_context(StopRequest(log))
        return _train(cfg, resume, log, dist, out, stop, t_start)


def _train(cfg: Config, resume: bool, log, dist: Dist, out: Path, stop: StopRequest, t_start: float) -> dict:
    rt = runtime.resolve(cfg, dist.local_rank, dist.world)
    if cfg.batch_size % dist.world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the {dist.world} processes")
    rank_batch = cfg.batch_size // dist.world

    log(f"fastres: preset {cfg.preset!r}, resolved config:")
    log("\n".join(f"  {k:<18} = {json.dumps(v)}" for k, v in cfg.to_dict().items()))
    # One line of what each switch became; the reasons below it (a fallback's reason once).
    log("switches: " + ", ".join(f"{k}={str(v).split(':')[0]}" for k, v in rt.summary.items()
                                 if not k.endswith("_why")))
    for k, v in rt.summary.items():
        if k.endswith("_why") or (k == "fused_bn_relu" and v.startswith("off:")):
            log(f"  {k}: {v}")
    if dist.world > 1:
        log(f"distributed: world {dist.world}, backend {dist.backend}, per-rank batch {rank_batch}")

    # --- data --------------------------------------------------------------------------------
    ensure_data(cfg, dist, log)
    batches = Batches(cfg.data, rank_batch, cfg.eval_batch_size, rt.device, cfg.seed,
                      train_limit=cfg.train_limit or None, test_limit=cfg.test_limit or None,
                      channels_last=rt.channels_last, augment=cfg.augment, num_workers=cfg.loader_workers,
                      distributed=dist.world > 1, rank=dist.rank, world=dist.world,
                      compile_augment=cfg.compile_augment, placement=rt.data_placement)
    steps = len(batches)
    if steps == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} exceeds the {batches.num_train} training images")

    # --- model, optimizer, schedule, EMA -------------------------------------------------------
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, rt)
    n_params = count_params(model)
    log(f"model: resnet{cfg.depth} widths {list(cfg.widths)}, {n_params:,} trainable parameters; "
        f"data: {batches.num_train:,} train / {batches.num_test:,} test images, {steps} steps/epoch")
    opt = torch.optim.SGD(param_groups(model, cfg), lr=peak_lr(cfg), momentum=cfg.momentum,
                          nesterov=cfg.nesterov)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, steps))
    ema = EMA(model, cfg.ema)
    criterion = make_criterion(cfg)
    train_model = rt.compile(dist.wrap(model, rt.device))
    # Evaluation runs on each rank's own test shard without DDP (whose forward would broadcast
    # buffers in lockstep); a single process without EMA reuses the training graph.
    eval_model = train_model if (cfg.ema == 0 and dist.world == 1) else rt.compile(ema.model)

    step = build_step(cfg, rt, model, train_model, opt, sched, ema, criterion, steps)

    # --- the checkpoint to resume from, checked now rather than after a long warm-up ------------
    ckpt_path, ck = out / CHECKPOINT, None
    if resume:
        if ckpt_path.is_file():
            # Read onto the CPU: load_state_dict puts each tensor where the model's live, and the RNG
            # states must stay CPU ByteTensors (mapped to the GPU, torch refuses to restore them).
            ck = load_checkpoint(ckpt_path, model)  # BadInput if damaged or foreign
            try:
                old = from_dict(ck["config"])
            except (BadInput, TypeError) as e:
                raise ResumeError(f"{ckpt_path}: its config is not valid ({e})") from None
            diff = {k: (getattr(old, k), getattr(cfg, k)) for k in cfg.to_dict()
                    if k not in RESUME_MAY_DIFFER and getattr(old, k) != getattr(cfg, k)}
            # The placement decides the batches' order: what it resolved to must match (auto is
            # device on one GPU and stream on a CPU), however it was asked for
            placed = ck.get("data_placement", old.data_placement)
            diff.pop("data_placement", None)
            if placed != rt.data_placement:
                diff["data_placement"] = (placed, rt.data_placement if cfg.data_placement != "auto" else
                                          f"auto, resolved to {rt.data_placement}")
            if diff:
                raise ResumeError(f"{ckpt_path} was written with other settings: " +
                                  ", ".join(f"--{k.replace('_', '-')} {a} (now {b})" for k, (a, b) in diff.items()))
        else:
            log(f"--resume: no checkpoint at {ckpt_path}; starting from scratch")

    start_epoch = ck["epoch"] if ck is not None else 0

    # --- warm-up: compile and autotune on random data, then put everything back ----------------
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict(), ema.state_dict(), ema.updates))
    g = torch.Generator(device=rt.device).manual_seed(12345)
    x = torch.randn(rank_batch, 3, 32, 32, generator=g, device=rt.device).to(memory_format=rt.memory_format)
    y = torch.randint(0, 10, (rank_batch,), generator=g, device=rt.device)
    x_eval = torch.randn(cfg.eval_batch_size, 3, 32, 32, generator=g, device=rt.device).to(memory_format=rt.memory_format)
    rt_sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)

    def eval_forward():
        with torch.no_grad(), rt.autocast():
            eval_model.eval()
            eval_model(x_eval)
            if cfg.tta:
                eval_model(x_eval.flip(3))

    t0 = time.perf_counter()
    model.train()
    step(x, y)  # the first call compiles and autotunes
    eval_forward()
    batches.warmup()  # compiles the fused augmentation for this batch shape
    rt_sync()
    warmup_s = time.perf_counter() - t0
    # For the estimate: the median of 5 timed steps (the first ones after compiling vary), and one
    # evaluation batch.
    step_times = []
    for _ in range(5):
        t1 = time.perf_counter()
        step(x, y)
        rt_sync()
        step_times.append(time.perf_counter() - t1)
    step_s = statistics.median(step_times)
    t1 = time.perf_counter()
    eval_forward()
    rt_sync()
    eval_est_s = (time.perf_counter() - t1) * batches.test_batches
    model.load_state_dict(saved[0]), opt.load_state_dict(saved[1]), sched.load_state_dict(saved[2])
    ema.load_state_dict(saved[3])
    ema.updates = saved[4]
    step.after_load()
    del saved
    epochs_left = cfg.epochs - start_epoch
    estimate_s = (step_s * steps + eval_est_s) * epochs_left
    log(f"warm-up (compile/autotune) {warmup_s:.1f} s; estimated time for {epochs_left} epoch(s): "
        f"{duration(estimate_s)} (training at a median {step_s * 1000:.0f} ms/step of 5 timed steps, "
        f"evaluation {duration(eval_est_s)} per epoch)")
    if rt.device.type == "cpu" and estimate_s > 30 * 60:
        log(f"NOTE: no GPU; this run will take about {estimate_s / 3600:.1f} h on this CPU (estimate). "
            "For a run of a few minutes use --preset smoke.")
    if stop.signum:  # Ctrl-C during the warm-up: nothing of this run was written yet
        raise Interrupted("stopped before training started; nothing was written", stop.signum)

    # --- resume ------------------------------------------------------------------------------
    history = []
    if ck is not None:
        model.load_state_dict(ck["model"]), opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"]), ema.load_state_dict(ck["ema"])
        ema.updates = ck.get("ema_updates", 0)
        step.after_load()
        set_rng_state(ck["rng"])
        history = ck["history"]
        log(f"resumed from {ckpt_path} after epoch {start_epoch}")
        del ck

    record = {"config": cfg.to_dict(), "switches": rt.summary, "environment": environment(rt),
              "parameters": n_params, "num_train": batches.num_train, "num_test": batches.num_test,
              "steps_per_epoch": steps, "world_size": dist.world, "backend": dist.backend,
              "per_rank_batch": rank_batch, "warmup_s": round(warmup_s, 3), "status": "running"}

    def save_record(status: str):
        if not dist.main:
            return
        record.update(status=status, epochs=history, resumed_at_epoch=start_epoch if resume else None,
                      train_s_total=round(sum(h["train_s"] for h in history), 3),
                      eval_s_total=round(sum(h["eval_s"] for h in history), 3),
                      wall_s_this_process=round(time.perf_counter() - t_start, 3))
        if history:
            record.update(final_test_acc=history[-1]["test_acc"], final_test_loss=history[-1]["test_loss"],
                          best_test_acc=max(h["test_acc"] for h in history),
                          mean_epoch_train_s=round(record["train_s_total"] / len(history), 4))
        atomic_write(out / RECORD, lambda p: p.write_text(json.dumps(record, indent=2, default=str)))

    def interrupted(where: str) -> Interrupted:
        save_record("interrupted")
        kept = (f"{ckpt_path} holds epoch {history[-1]['epoch']} and resumes from there" if history
                else "no checkpoint of this run was written yet")
        e = Interrupted(f"stopped {where}; {kept}", stop.signum or signal.SIGINT)
        e.run_dir = out
        return e

    def diverged(what: str) -> NonFiniteLoss:
        save_record("diverged")
        kept = (f"the last good checkpoint {ckpt_path} (after epoch {history[-1]['epoch']}) is kept" if history
                else "no checkpoint of this run was written")
        return NonFiniteLoss(f"{what}; stopped: {kept}. Lower --lr or check the data.")

    def status(bar: Progress, epoch: int) -> str:
        """images/s so far in this epoch; time left in it and in the run (estimates)."""
        per_step = (time.perf_counter() - bar.t0) / max(1, bar.n)
        eval_s = history[-1]["eval_s"] if len(history) > start_epoch else eval_est_s
        epoch_left = per_step * (steps - bar.n)
        run_left = epoch_left + eval_s + (cfg.epochs - epoch - 1) * (per_step * steps + eval_s)
        return (f"{rank_batch * dist.world / per_step:,.0f} img/s, epoch ETA {duration(epoch_left)}, "
                f"run ETA {duration(run_left)}")

    tb = TensorBoard(cfg, out, dist.main, log)

    # A stop request is honoured between steps: every step in a single process; every 25 steps,
    # agreed over all ranks, under torchrun (so that all ranks stop at the same step).
    def stop_now(synced: bool) -> bool:
        if dist.world == 1:
            return stop.signum != 0
        return synced and dist.sum(torch.tensor(int(stop.signum != 0), device=rt.device)).item() > 0

    # --- epochs ------------------------------------------------------------------------------
    log(HEAD)
    for h in history:
        log(ROW.format(**h))
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            lr = opt.param_groups[0]["lr"]
            step.reset()  # the epoch's loss and accuracy sums, kept on the device by the step
            seen = 0
            rt_sync()
            t0 = time.perf_counter()
            # A live bar on a terminal; in a log, a line every cfg.progress_s seconds.
            bar = Progress(batches.train_epoch(epoch), steps, f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress_s,
                           status=lambda: status(bar, epoch), log=log, enabled=dist.main)
            for i, (x, y) in enumerate(bar):
                step(x, y)
                seen += y.numel()
                synced = (i + 1) % 25 == 0 or i + 1 == steps  # one host sync per 25 steps
                if stop_now(synced):
                    raise interrupted(f"in epoch {epoch + 1} after step {i + 1} of {steps}")
                if synced and not torch.isfinite(step.loss_sum):
                    raise diverged(f"non-finite training loss at epoch {epoch + 1}, step {i + 1} (lr {lr:g})")
            rt_sync()
            train_s = time.perf_counter() - t0
            # A finite loss can hide overflowed state (bf16 activations whose variance overflows
            # BN's running_var to inf): no checkpoint is written of a model that is not finite.
            state = [t for t in model.state_dict().values() if t.is_floating_point()]
            if not torch.stack([torch.isfinite(t).all() for t in state]).all():  # one host sync
                raise diverged(f"non-finite weights or BN statistics after epoch {epoch + 1} (lr {lr:g})")
            seen_t = dist.sum(torch.tensor(seen, device=rt.device))
            loss_sum, correct = step.loss_sum.clone(), step.correct.clone()
            dist.sum(loss_sum), dist.sum(correct)
            t0 = time.perf_counter()
            # num_test: the images evaluated (all ranks), not what the config or manifest says
            test_loss, test_acc, record["num_test"] = evaluate(eval_model, batches, rt, cfg.tta, dist)
            eval_s = time.perf_counter() - t0
            n = seen_t.item()
            h = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum.item() / n, "train_acc": correct.item() / n,
                 "test_loss": test_loss, "test_acc": test_acc, "train_s": round(train_s, 4),
                 "eval_s": round(eval_s, 4), "images_per_s": round(n / train_s, 1)}
            history.append(h)
            log(ROW.format(**h))
            if len(history) == start_epoch + 1 and epoch + 1 < cfg.epochs:  # the first epoch of this process
                left = (cfg.epochs - epoch - 1) * (train_s + eval_s)
                log(f"measured {train_s + eval_s:.1f} s per epoch with evaluation: about {duration(left)} left "
                    f"(estimate, ends about {time.strftime('%H:%M', time.localtime(time.time() + left))})")
            if dist.main:
                ck = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                      "ema": ema.state_dict(), "ema_updates": ema.updates, "epoch": epoch + 1,
                      "config": cfg.to_dict(), "data_placement": rt.data_placement, "history": history,
                      "rng": rng_state()}
                # Serialized in memory first (a few MB), so that a failed write reports the OS's
                # reason (disk full, file too large) rather than torch's zip writer's.
                blob = io.BytesIO()
                torch.save(ck, blob)
                atomic_write(ckpt_path, lambda p: p.write_bytes(blob.getbuffer()))
                save_record("running" if epoch + 1 < cfg.epochs else "finished")
                write_metrics_csv(history, out / METRICS_CSV)
                plot_curves(history, out / CURVES, f"resnet{cfg.depth}, preset {cfg.preset}")
                tb.add(h)
            dist.barrier()
    except KeyboardInterrupt:  # Ctrl-C pressed twice: stop at once (a checkpoint write in flight is dropped)
        raise interrupted(f"during epoch {epoch + 1}") from None
    except OutputError:
        with contextlib.suppress(OutputError):
            save_record("output_error")
        raise

    tb.close()
    if dist.main:
        save_record("finished")
        log(f"final test accuracy {history[-1]['test_acc']:.2%}; training {record['train_s_total']:.1f} s, "
            f"evaluation {record['eval_s_total']:.1f} s, warm-up {warmup_s:.1f} s; record: {out / RECORD}")
    dist.close()
    return record

