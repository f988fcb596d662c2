"""fastres training, top to bottom.

    train(cfg) -> record dict      (the CLI is fastres/cli.py)

1. resolve the performance switches once (runtime.py) and join torchrun's group if launched by it
2. make sure the .beton files exist (converting on demand), build loaders + on-device augmentation
3. build the ResNet of the config's design (refused first if over --max-params), the optimizer
   (SGD, Adam or AdamW), the per-step lr schedule and the (optional) weight EMA
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
import functools
import signal
import statistics
import time
from pathlib import Path

import torch

from . import runtime
from .config import Config, describe
from .data import Batches, ensure_data
from .checkpoint import checkpoint_to_resume, restore, save_checkpoint
from .design import build_model, check_budget, describe_model, summarize
from .distributed import Dist
from .errors import Diverged, Interrupted, OutputError
from .evaluate import evaluate
from .optim import EMA, lr_factor, make_criterion, make_optimizer
from .progress import Progress, duration
from .record import (CHECKPOINT, CURVES, METRICS_CSV, RECORD, RunRecord, TensorBoard, environment, epoch_metrics,
                     plot_curves, table_head, table_row, write_metrics_csv)
from .results import test_set_results
from .rundir import open_run_dir
from .signals import StopRequest
from .step import build_step

class NonFiniteLoss(Diverged):
    pass


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def warm_up(step, state, batches, rt, batch: int, eval_batch: int, eval_forward,
            timed_steps: int = 5) -> tuple[float, float, float]:
    """Compile and autotune on random data (a training step, an evaluation batch, the compiled
    augmentation), time `timed_steps` more steps and an evaluation batch for the estimate, then
    put the state (model, optimizer, schedule, EMA, loss scaler) back as it was. Returns seconds:
    the warm-up, a step (the median of those timed), and one epoch's evaluation."""
    model, opt, sched, ema = state
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict(), ema.state_dict(), ema.updates,
                           step.scaling_state()))
    g = torch.Generator(device=rt.device).manual_seed(12345)
    x = torch.randn(batch, 3, 32, 32, generator=g, device=rt.device).to(memory_format=rt.memory_format)
    y = torch.randint(0, 10, (batch,), generator=g, device=rt.device)
    x, y = batches.cutout_mixup_cutmix(x, y, g, 0, 0)  # targets as training's (probabilities under mixup/cutmix)
    # an evaluation batch as large as the largest the test set gives (a 100-image test set is never
    # evaluated 1,000 at a time)
    x_eval = torch.randn(eval_batch, 3, 32, 32, generator=g, device=rt.device).to(memory_format=rt.memory_format)
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    model.train()
    step(x, y)  # the first call compiles and autotunes
    eval_forward(x_eval)
    batches.warmup()  # compiles the fused augmentation for this batch shape
    sync()
    warmup_s = time.perf_counter() - t0
    step_times = []  # the first steps after compiling vary: their median
    for _ in range(timed_steps):
        t1 = time.perf_counter()
        step(x, y)
        sync()
        step_times.append(time.perf_counter() - t1)
    t1 = time.perf_counter()
    eval_forward(x_eval)
    sync()
    eval_est_s = (time.perf_counter() - t1) * batches.test_batches
    model.load_state_dict(saved[0]), opt.load_state_dict(saved[1]), sched.load_state_dict(saved[2])
    ema.load_state_dict(saved[3])
    ema.updates = saved[4]
    step.load_scaling_state(saved[5])
    step.after_load()
    return warmup_s, statistics.median(step_times), eval_est_s


def train(cfg: Config, resume: bool = False, log=print, on_epoch=None) -> dict:
    """One run of cfg into its run folder; returns its record (also RUN_DIR/record.json).

    on_epoch(row) -> None | str: called after each epoch's checkpoint and record are written, with
    that epoch's table row (a dict); a string it returns ends the run there with that status in
    the record (a sweep's pruner returns "pruned"). None (the default): every epoch runs."""
    t_start = time.perf_counter()
    check_budget(cfg)  # an over-budget model is refused before any folder or data is touched
    dist = Dist.from_env(cfg.device)
    runtime.check_before_work(cfg, dist.local_rank)  # so is what this torch or device cannot run
    log = log if dist.main else (lambda *a, **k: None)
    with contextlib.ExitStack() as held:
        cfg, out = open_run_dir(cfg, resume, dist, held, log)
        stop = held.enter_context(StopRequest(log))
        return run_to_end(run(cfg, resume, log, dist, out, stop, t_start, on_epoch))


def run_to_end(steps) -> dict:
    """Advance a run (the generator run() returns) to its end; its record. A second Ctrl-C that
    lands between two steps, outside the run, is handed into it, so it stops as it would inside."""
    pending = None
    while True:
        try:
            steps.throw(pending) if pending is not None else next(steps)
        except StopIteration as done:
            return done.value
        except KeyboardInterrupt as k:
            if pending is not None:  # the run did not take it: it had not started its epochs
                raise
            pending = k


@dataclasses.dataclass
class Parts:
    """What set_up builds for a run: the resolved switches, the data, the model and what trains and
    evaluates it (eval_model: the EMA's weights when there is an EMA, compiled as the switches say)."""
    rt: runtime.Runtime
    rank_batch: int        # images per step in this process
    batches: Batches
    design: dict           # parameters and multiply-adds (design.summarize)
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    ema: EMA
    step: object           # TrainStep or WholeStep
    eval_model: torch.nn.Module

    @property
    def steps(self) -> int:
        return len(self.batches)


def set_up(cfg: Config, dist: Dist, log, shared_data: dict | None) -> Parts:
    """Switches, data, model, optimizer, schedule, EMA and the training step; the config and what
    each switch resolved to are printed first."""
    rt = runtime.resolve(cfg, dist.local_rank, dist.world)
    if cfg.batch_size % dist.world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the {dist.world} processes")
    rank_batch = cfg.batch_size // dist.world
    log(f"fastres: preset {cfg.preset!r}, resolved config:")
    log(describe(cfg))
    # One line of what each switch became; the reasons below it (a fallback's reason once).
    log("switches: " + ", ".join(f"{k}={str(v).split(':')[0]}" for k, v in rt.summary.items()
                                 if not k.endswith("_why")))
    for k, v in rt.summary.items():
        if k.endswith("_why") or (k == "fused_bn_relu" and v.startswith("off:")):
            log(f"  {k}: {v}")
    if dist.world > 1:
        log(f"distributed: world {dist.world}, backend {dist.backend}, per-rank batch {rank_batch}")
    ensure_data(cfg, dist, log)
    batches = Batches(cfg.data, rank_batch, cfg.eval_batch_size, rt.device, cfg.seed,
                      train_limit=cfg.train_limit or None, test_limit=cfg.test_limit or None,
                      channels_last=rt.channels_last, augment=cfg.augment, num_workers=cfg.loader_workers,
                      distributed=dist.world > 1, rank=dist.rank, world=dist.world,
                      compile_augment=rt.compile_augment, placement=rt.data_placement,
                      cutout=cfg.cutout, mixup=cfg.mixup, cutmix=cfg.cutmix, shared=shared_data)
    steps = len(batches)
    if steps == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} exceeds the {batches.num_train} training images")
    design = summarize(cfg)  # parameters and multiply-accumulates per image (torchinfo, on the CPU)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, rt)
    log(f"model: {describe_model(cfg)}, {design['trainable_parameters']:,} trainable parameters, "
        f"{design['macs'] / 1e6:,.1f} M multiply-adds per image; data: {batches.num_train:,} train / "
        f"{batches.num_test:,} test images, {steps} steps/epoch")
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, steps))
    ema = EMA(model, cfg.ema)
    train_model = rt.compile(dist.wrap(model, rt.device))
    # Evaluation runs on each rank's own test shard without DDP (whose forward would broadcast
    # buffers in lockstep); a single process without EMA reuses the training graph.
    eval_model = train_model if (cfg.ema == 0 and dist.world == 1) else rt.compile(ema.model)
    step = build_step(cfg, rt, model, train_model, opt, sched, ema, make_criterion(cfg), steps)
    return Parts(rt, rank_batch, batches, design, model, opt, sched, ema, step, eval_model)


def warm_up_and_estimate(p: Parts, cfg: Config, epochs_left: int, log) -> tuple[float, float]:
    """warm_up, then print the run's estimated duration; (warm-up s, one epoch's evaluation s)."""
    def eval_forward(x_eval):
        with torch.no_grad(), p.rt.autocast():
            p.eval_model.eval()
            p.eval_model(x_eval)
            if cfg.tta:
                p.eval_model(x_eval.flip(3))

    timed = max(1, min(5, p.steps * epochs_left))  # timing never costs more steps than the run trains
    warmup_s, step_s, eval_est_s = warm_up(p.step, (p.model, p.opt, p.sched, p.ema), p.batches, p.rt, p.rank_batch,
                                           min(cfg.eval_batch_size, p.batches.num_test), eval_forward, timed)
    estimate_s = (step_s * p.steps + eval_est_s) * epochs_left
    log(f"warm-up (compile/autotune) {warmup_s:.1f} s; estimated time for {epochs_left} epoch(s): "
        f"{duration(estimate_s)} (training at a median {step_s * 1000:.0f} ms/step of {timed} timed steps, "
        f"evaluation {duration(eval_est_s)} per epoch)")
    if p.rt.device.type == "cpu" and estimate_s > 30 * 60:
        log(f"NOTE: no GPU; this run will take about {estimate_s / 3600:.1f} h on this CPU (estimate). "
            "For a run of a few minutes use --preset smoke.")
    return warmup_s, eval_est_s


class Stops:
    """How a run stops early: interrupted (Ctrl-C, SIGTERM) or diverged, each recorded in
    record.json with a message that says which checkpoint is kept."""

    def __init__(self, record: RunRecord, history: list[dict], out: Path, stop: StopRequest):
        self.record, self.history, self.out, self.stop = record, history, out, stop

    def interrupted(self, where: str) -> Interrupted:
        self.record.save("interrupted", self.history)
        kept = (f"{self.out / CHECKPOINT} holds epoch {self.history[-1]['epoch']} and resumes from there"
                if self.history else "no checkpoint of this run was written yet")
        e = Interrupted(f"stopped {where}; {kept}", self.stop.signum or signal.SIGINT)
        e.run_dir = self.out
        return e

    def diverged(self, what: str) -> NonFiniteLoss:
        self.record.save("diverged", self.history)
        kept = (f"the last good checkpoint {self.out / CHECKPOINT} (after epoch {self.history[-1]['epoch']}) is "
                "kept" if self.history else "no checkpoint of this run was written")
        return NonFiniteLoss(f"{what}; stopped: {kept}. Lower --lr or check the data.")


def train_epoch(p: Parts, cfg: Config, epoch: int, dist: Dist, stops: Stops, bar_status, progress: bool, log):
    """One epoch's training steps, yielding after each (train_packed advances other runs then);
    returns (lr, loss sum, correct predictions, images, seconds), summed over all processes. A stop
    request is honoured between steps: every step in one process; every 25 steps, agreed over all
    ranks, under torchrun (so that all ranks stop at the same step)."""
    def stop_now(synced: bool) -> bool:
        if dist.world == 1:
            return stops.stop.signum != 0
        return synced and dist.sum(torch.tensor(int(stops.stop.signum != 0), device=p.rt.device)).item() > 0

    sync = torch.cuda.synchronize if p.rt.device.type == "cuda" else (lambda: None)
    p.model.train()
    lr = p.opt.param_groups[0]["lr"]
    p.step.reset()  # the epoch's loss and accuracy sums, kept on the device by the step
    seen = 0
    sync()
    t0 = time.perf_counter()
    # A live bar on a terminal; in a log, a line every cfg.progress_s seconds.
    bar = Progress(p.batches.train_epoch(epoch), p.steps, f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress_s,
                   status=lambda: bar_status(bar), log=log, enabled=dist.main and progress)
    for i, (x, y) in enumerate(bar):
        p.step(x, y)
        yield  # the step is queued: another run may take its turn (train_packed)
        seen += y.shape[0]  # images (y is (N, classes) under mixup/cutmix)
        synced = (i + 1) % 25 == 0 or i + 1 == p.steps  # one host sync per 25 steps
        if stop_now(synced):
            raise stops.interrupted(f"in epoch {epoch + 1} after step {i + 1} of {p.steps}")
        if synced and not torch.isfinite(p.step.loss_sum):
            raise stops.diverged(f"non-finite training loss at epoch {epoch + 1}, step {i + 1} (lr {lr:g})")
    sync()
    train_s = time.perf_counter() - t0
    # A finite loss can hide overflowed state (bf16 activations whose variance overflows BN's
    # running_var to inf): no checkpoint is written of a model that is not finite.
    state = [t for t in p.model.state_dict().values() if t.is_floating_point()]
    if not torch.stack([torch.isfinite(t).all() for t in state]).all():  # one host sync
        raise stops.diverged(f"non-finite weights or BN statistics after epoch {epoch + 1} (lr {lr:g})")
    seen_t = dist.sum(torch.tensor(seen, device=p.rt.device))
    loss_sum, correct = p.step.loss_sum.clone(), p.step.correct.clone()
    dist.sum(loss_sum), dist.sum(correct)
    return lr, loss_sum.item(), correct.item(), seen_t.item(), train_s


def status_line(bar: Progress, epoch: int, steps: int, epochs: int, images_per_step: int, eval_s: float) -> str:
    """images/s so far in this epoch; time left in it and in the run (estimates)."""
    per_step = (time.perf_counter() - bar.t0) / max(1, bar.n)
    epoch_left = per_step * (steps - bar.n)
    run_left = epoch_left + eval_s + (epochs - epoch - 1) * (per_step * steps + eval_s)
    return f"{images_per_step / per_step:,.0f} img/s, epoch ETA {duration(epoch_left)}, run ETA {duration(run_left)}"


def finish(p: Parts, cfg: Config, out: Path, record: RunRecord, history: list[dict], warmup_s: float, log) -> None:
    """Per-class accuracy, confusion matrix and mistakes of the model the run evaluated; the last lines."""
    per_class = test_set_results(out, [p.eval_model], p.batches.test_set(), p.batches.mean, p.batches.std, p.rt,
                                 cfg.tta, describe_model(cfg), cfg.eval_batch_size)["per_class_acc"]
    record["per_class_acc"] = per_class
    record.save("finished", history)
    log("per class: " + ", ".join(f"{n} {a:.1%}" for n, a in per_class.items()) +
        f" (confusion matrix and mistakes: {out / 'confusion.png'}, {out / 'mistakes.png'})")
    log(f"final test accuracy {history[-1]['test_acc']:.2%}; training {record['train_s_total']:.1f} s, "
        f"evaluation {record['eval_s_total']:.1f} s, warm-up {warmup_s:.1f} s; record: {out / RECORD}")


def run(cfg: Config, resume: bool, log, dist: Dist, out: Path, stop: StopRequest, t_start: float,
        on_epoch=None, progress: bool = True, shared_data: dict | None = None):
    """The run, top to bottom, as a generator that yields once set up and warmed up, then after
    every training step (so that several runs can be advanced in turn: train_packed), and returns
    the record: set up; check the checkpoint to resume (before a long warm-up); warm up; resume;
    per epoch train, evaluate, checkpoint, record; finish. progress=False: no bar or progress
    lines (a packed group shows one line for all its runs); shared_data: resident data already
    on the device, shared by the runs of a packed group (see Batches)."""
    on_epoch = on_epoch or (lambda row: None)
    p = set_up(cfg, dist, log, shared_data)
    checkpoint = checkpoint_to_resume(out / CHECKPOINT, p.model, cfg, p.rt, log) if resume else None
    start_epoch = checkpoint["epoch"] if checkpoint is not None else 0
    warmup_s, eval_est_s = warm_up_and_estimate(p, cfg, cfg.epochs - start_epoch, log)
    if stop.signum:  # Ctrl-C during the warm-up: nothing of this run was written yet
        raise Interrupted("stopped before training started; nothing was written", stop.signum)
    history = restore(p, checkpoint) if checkpoint is not None else []
    if checkpoint is not None:
        log(f"resumed from {out / CHECKPOINT} after epoch {start_epoch}")
        del checkpoint  # its tensors: freed before training
    record = RunRecord(out / RECORD, dist.main, {
        "config": cfg.to_dict(), "switches": p.rt.summary, "environment": environment(p.rt),
        "parameters": p.design["trainable_parameters"], "macs": p.design["macs"], "num_train": p.batches.num_train,
        "num_test": p.batches.num_test, "steps_per_epoch": p.steps, "world_size": dist.world,
        "backend": dist.backend, "per_rank_batch": p.rank_batch, "warmup_s": round(warmup_s, 3)},
        p.step, p.rt.device, t_start, start_epoch if resume else None)
    stops, tb = Stops(record, history, out, stop), TensorBoard(cfg, out, dist.main, log)
    yield  # set up, warmed up and resumed: a packed group brings all its runs here before any
    # starts its epochs (so that no run's first epoch is timed over another's warm-up)
    log(table_head())
    for h in history:
        log(table_row(h))
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, cfg.epochs):
            eval_s = history[-1]["eval_s"] if len(history) > start_epoch else eval_est_s  # for the ETA
            bar_status = functools.partial(status_line, epoch=epoch, steps=p.steps, epochs=cfg.epochs,
                                           images_per_step=cfg.batch_size, eval_s=eval_s)
            lr, loss_sum, correct, images, train_s = yield from train_epoch(p, cfg, epoch, dist, stops, bar_status,
                                                                            progress, log)
            t0 = time.perf_counter()
            # num_test: the images evaluated (all ranks), not what the config or manifest says
            test_loss, test_acc, record["num_test"] = evaluate(p.eval_model, p.batches, p.rt, cfg.tta, dist)
            h = epoch_metrics(epoch + 1, lr, loss_sum, correct, images, test_loss, test_acc, train_s,
                              time.perf_counter() - t0)
            history.append(h)
            log(table_row(h))
            if len(history) == start_epoch + 1 and epoch + 1 < cfg.epochs:  # the first epoch of this process
                left = (cfg.epochs - epoch - 1) * (train_s + h["eval_s"])
                log(f"measured {train_s + h['eval_s']:.1f} s per epoch with evaluation: about {duration(left)} "
                    f"left (estimate, ends about {time.strftime('%H:%M', time.localtime(time.time() + left))})")
            p.step.sync_host()  # host counters the device kept (the EMA's, under loss scaling)
            if dist.main:
                save_checkpoint(p, cfg, history, out / CHECKPOINT)
                record.save("running" if epoch + 1 < cfg.epochs else "finished", history)
                write_metrics_csv(history, out / METRICS_CSV)
                plot_curves(history, out / CURVES, f"{describe_model(cfg)}, preset {cfg.preset}")
                tb.add(h)
            dist.barrier()
            ended = on_epoch(h)
            if ended:  # asked to end here (a pruned sweep trial): the checkpoint of this epoch stays
                record.save(ended, history)
                log(f"ended after epoch {epoch + 1} of {cfg.epochs}: {ended}")
                tb.close()
                dist.close()
                return record
    except KeyboardInterrupt:  # Ctrl-C pressed twice: stop at once (a checkpoint write in flight is dropped)
        raise stops.interrupted(f"during epoch {epoch + 1}") from None
    except OutputError:
        with contextlib.suppress(OutputError):
            record.save("output_error", history)
        raise
    tb.close()
    if dist.main:
        finish(p, cfg, out, record, history, warmup_s, log)
    dist.close()
    return record
