"""The training steps: TrainStep (the usual one) and WholeStep (`--whole-step`, one CUDA graph).

At batch 64 a ResNet-68 step is ~1,080 small kernels. Launching them one by one from Python
keeps the GPU busy 12% of the time (torch.compile default); `reduce-overhead` replays the
forward and backward as CUDA graphs (50%), but the optimizer update, the learning-rate schedule
and the EMA still run from the host between replays (bench/results/2026-11-26-nvidia-h200-profile.md).
WholeStep captures everything a step does into one graph, replayed with one launch:

  forward + loss (bf16/fp16)       the model, compiled without CUDA graphs of its own
  backward                         gradients land in tensors the graph owns; under fp16 the loss
                                   is scaled first and the gradients unscaled and checked after
                                   (torch.amp.GradScaler, whose scale and found-inf flag are
                                   device tensors), and a step with a non-finite gradient leaves
                                   weights, optimizer state and EMA as they were
  SGD, Adam or AdamW               torch.optim's update written as foreach ops, with the lr read
                                   from a device table of the run's whole schedule at a step
                                   counter the graph advances (Adam's bias corrections from the
                                   same counter), so a per-step schedule needs no recapture
  EMA                              decay min(d, (1+n)/(10+n)) from a device update counter
  metrics                          the epoch's loss and correct-prediction sums

Host work per step: copying the batch into the graph's input tensors, one replay, and the
schedule's and EMA's host counters (Python integers, for checkpoints and the console table).

The same arithmetic runs uncaptured on a CPU (or with capture off), which is how the tests check
it against torch.optim's SGD / Adam / AdamW + LambdaLR + fastres.optim.EMA. torch's own optimizers
cannot be captured with a schedule: with an lr tensor they read the value back to the host.

Checkpoints are unchanged: the momentum and moment buffers the graph updates are the optimizer's
own state tensors, and `after_load()` copies loaded state back into them (a load replaces tensors).
"""
from __future__ import annotations

import torch

from .optim import lr_factor, peak_lr


def sgd_update(params, grads, bufs, lr, wd: float, mom: float, nesterov: bool):
    """torch.optim.SGD's update (dampening 0) with lr a 0-d device tensor:
    d = g + wd * p;  buf = mom * buf + d;  d = d + mom * buf (Nesterov) or buf;  p -= lr * d.
    (torch's first step sets buf = d; with buf starting at 0 that is the same.)"""
    d_p = torch._foreach_add(grads, params, alpha=wd) if wd else list(grads)
    if mom:
        torch._foreach_mul_(bufs, mom)
        torch._foreach_add_(bufs, d_p)
        d_p = torch._foreach_add(d_p, bufs, alpha=mom) if nesterov else bufs
    torch._foreach_add_(params, torch._foreach_mul(d_p, -lr))


def adam_update(params, grads, exp_avgs, exp_avg_sqs, lr, t, wd: float, beta1: float, beta2: float, eps: float,
                decoupled: bool):
    """torch.optim.Adam's update (AdamW's with decoupled=True; no amsgrad) with lr and the step
    number t (1 at the first step) as 0-d float64 device tensors:
    p *= 1 - lr * wd (AdamW) or g += wd * p (Adam);  m = lerp(m, g, 1 - b1);  v = b2 v + (1 - b2) g^2;
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)."""
    if wd and decoupled:
        torch._foreach_mul_(params, 1 - lr * wd)
    elif wd:
        grads = torch._foreach_add(grads, params, alpha=wd)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    step_size = lr / (1 - beta1 ** t)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, torch.sqrt(1 - beta2 ** t))
    torch._foreach_add_(denom, eps)
    upd = torch._foreach_div(exp_avgs, denom)
    torch._foreach_mul_(upd, -step_size)
    torch._foreach_add_(params, upd)


def ema_update(ema_p, src_p, ema_b, src_b, n, decay, keep=None):
    """fastres.optim.EMA.update with the update count n and the decay as 0-d device tensors:
    ema += (1 - min(decay, (1 + n) / (10 + n))) * (src - ema); buffers copied. The caller
    advances n (compiled by torch 2.11, an `n += 1` in here gave wrong EMA weights). keep: a 0-d
    0./1. tensor under loss scaling, 0 on a skipped step (the EMA then stays as it was)."""
    w = 1 - torch.minimum((1 + n) / (10 + n), decay)
    diff = torch._foreach_sub(src_p, ema_p)
    torch._foreach_mul_(diff, w if keep is None else w * keep)
    torch._foreach_add_(ema_p, diff)
    if keep is None:
        torch._foreach_copy_(ema_b, src_b)
    else:
        for e, b in zip(ema_b, src_b):
            e.copy_(torch.where(keep > 0, b, e))


def found_inf(scaler: torch.amp.GradScaler, opt) -> torch.Tensor | None:
    """This step's found-inf flag (a 0-d float tensor on the device, 1. when a gradient is not
    finite) once scaler.unscale_(opt) or scaler.step(opt) ran; None when loss scaling is off.
    GradScaler keeps it per optimizer and device and has no public getter (step() only reads it
    on the host), hence the private method."""
    if not scaler.is_enabled():
        return None
    flags = list(scaler._found_inf_per_device(opt).values())
    return flags[0] if len(flags) == 1 else torch.stack(flags).sum().clamp(max=1)


def restore_if(found: torch.Tensor, tensors: list, before: list):
    """t = before where found (a skipped step), else t as updated: selection, not arithmetic, so a
    non-finite update leaves nothing behind and a kept one is exact."""
    for t, b in zip(tensors, before):
        t.copy_(torch.where(found > 0, b, t))


class EpochSums:
    """The epoch's summed loss and correct predictions, kept on the device by a training step
    (TrainStep, WholeStep): the loop zeroes them with reset() at an epoch's start
    and reads them only every 25 steps (the non-finite check) and at the epoch's end, so no step
    waits for the host. Also the run's loss scaler and its count of skipped steps (fp16)."""

    def __init__(self, device: torch.device, scaler: torch.amp.GradScaler):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.scaler = scaler
        self.skipped = torch.zeros((), dtype=torch.float32, device=device)  # steps skipped: non-finite gradients

    def scaling_state(self) -> dict:
        """The loss scaler's state and the steps skipped so far (for checkpoints; {} when off)."""
        if not self.scaler.is_enabled():
            return {}
        return {"scaler": self.scaler.state_dict(), "skipped_steps": int(self.skipped.item())}

    def load_scaling_state(self, state: dict):
        if self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
            self.skipped.fill_(state["skipped_steps"])

    def scaling_report(self) -> dict | None:
        """For the record: {'skipped_steps', 'final_scale'} under fp16, else None."""
        state = self.scaling_state()
        return {"skipped_steps": state["skipped_steps"], "final_scale": state["scaler"]["scale"]} if state else None

    def reset(self):
        self.loss_sum.zero_(), self.correct.zero_()

    def count(self, loss, logits, y):
        """y: labels (N,), or mixed targets (N, classes) under mixup/cutmix, where a prediction
        counts as correct when it names the target's largest share."""
        label = y if y.ndim == 1 else y.argmax(1)
        self.loss_sum += loss * label.numel()
        self.correct += (logits.argmax(1) == label).sum()


class WholeStep(EpochSums):
    """step(x, y) -> (loss, logits): the step's outputs, valid until the next call (graph-owned)."""

    def __init__(self, model, opt: torch.optim.Optimizer, sched, ema, criterion, rt, lr_table: list[float],
                 capture: bool, scaler: torch.amp.GradScaler | None = None):
        self.model, self.opt, self.sched, self.ema, self.criterion, self.rt = model, opt, sched, ema, criterion, rt
        dev = rt.device
        self.capture = capture and dev.type == "cuda"
        self.lrs = torch.tensor(lr_table, dtype=torch.float64, device=dev)  # lr at optimizer step s, as
        # the host's Python floats (a 0-d float64 scales float32 weights without promoting them)
        self.step_t = torch.zeros((), dtype=torch.int64, device=dev)  # steps taken (the schedule's)
        self.opt_t = torch.zeros((), dtype=torch.float64, device=dev)  # updates made (Adam's t): fewer
        # than steps when fp16's loss scaling skipped some
        self.ema_n = torch.zeros((), dtype=torch.float64, device=dev)  # EMA updates made
        self.ema_decay = torch.tensor(float(ema.decay), dtype=torch.float64, device=dev)  # made here: no
        # host-to-device copy in the graph; float64 as the host's EMA computes its decay
        # Adam's per-parameter 'step' in the optimizer's state (checkpoints, and torch's Adam after a
        # resume without the whole step): float32 counters as torch keeps them, one per parameter
        # (torch's Adam advances each in place), advanced by the graph
        self.opt_steps = []
        super().__init__(dev, scaler if scaler is not None else rt.grad_scaler())
        # With compilation on, the update and the EMA are compiled too: each becomes a few fused
        # passes over the weights instead of one foreach pass per operation.
        compiled = rt.compile_mode is not None
        compile_fn = (lambda f: torch.compile(f, dynamic=False)) if compiled else (lambda f: f)
        self.ema_update = compile_fn(ema_update)
        self.updates = [self._group_update(g, compile_fn) for g in opt.param_groups]
        # what a skipped step must leave as it was: weights and the optimizer's buffers
        self.guarded = [t for u in self.updates for t in [*u["params"], *(b for bs in u["state"].values() for b in bs)]]
        self.graph, self.static = None, None
        # The update is ours, so opt.step() never runs; LambdaLR would then warn on every run that
        # its step came before the optimizer's. This is the flag its wrapper of opt.step sets.
        opt._opt_called = True
        self.after_load()

    def _group_update(self, g: dict, compile_fn) -> dict:
        """One parameter group: its update (params, lr, t) and the state tensors it owns, by the
        names torch.optim keeps them under."""
        params = [p for p in g["params"] if p.requires_grad]
        new = lambda: [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        grads = lambda: [p.grad for p in params]
        if isinstance(self.opt, torch.optim.SGD):
            if g.get("dampening", 0) != 0:
                raise ValueError("WholeStep implements SGD without dampening (as fastres configures it)")
            update, bufs = compile_fn(sgd_update), new()
            state = {"momentum_buffer": bufs} if g["momentum"] else {}
            fn = lambda lr, t: update(params, grads(), bufs, lr, g["weight_decay"], g["momentum"], g["nesterov"])
        elif isinstance(self.opt, torch.optim.Adam):  # AdamW too (its subclass)
            if g.get("amsgrad") or g.get("maximize"):
                raise ValueError("WholeStep implements Adam without amsgrad or maximize (as fastres configures it)")
            update, m, v = compile_fn(adam_update), new(), new()
            state = {"exp_avg": m, "exp_avg_sq": v}
            fn = lambda lr, t: update(params, grads(), m, v, lr, t, g["weight_decay"], *g["betas"], g["eps"],
                                      g["decoupled_weight_decay"])
        else:
            raise ValueError(f"WholeStep has no update for {type(self.opt).__name__}")
        return {"params": params, "state": state, "fn": fn, "update": update, "adam": "exp_avg" in state}

    # --- the step's arithmetic, captured or not --------------------------------------------------
    def _body(self, x, y):
        with torch.autocast(self.rt.device.type, dtype=self.rt.amp_dtype or torch.bfloat16, enabled=self.rt.amp,
                            cache_enabled=False):
            logits = self.model(x)
            loss = self.criterion(logits, y)
        self.scaler.scale(loss).backward()  # the loss times the scale under fp16, else the loss
        loss, logits = loss.detach(), logits.detach()
        with torch.no_grad():
            self.scaler.unscale_(self.opt)  # no host sync; a no-op without loss scaling
            found = found_inf(self.scaler, self.opt)  # None without loss scaling
            before = [t.clone() for t in self.guarded] if found is not None else None
            # index_select, not lrs[t]: indexing with a tensor may read it back to the host
            lr = self.lrs.index_select(0, self.step_t.clamp(max=len(self.lrs) - 1).view(1)).squeeze()
            t = self.opt_t + 1  # this update's number, from 1 (Adam's bias corrections)
            for u in self.updates:
                u["fn"](lr, t)
            keep = 1.0
            if found is not None:  # a non-finite gradient: this step's update is undone, the scale backs off
                restore_if(found, self.guarded, before)
                keep = 1 - found
                self.skipped += found
                self.scaler.update()
            self.step_t += 1  # the schedule advances either way, as with GradScaler and LambdaLR
            self.opt_t += keep
            if self.opt_steps:
                torch._foreach_add_(self.opt_steps, keep)
            if self.ema.decay > 0:
                self.ema_update(self.ema._ema_p, self.ema._src_p, self.ema._ema_b, self.ema._src_b, self.ema_n,
                                self.ema_decay, None if found is None else keep)
                self.ema_n += keep
            self.count(loss, logits, y)  # the epoch's sums, inside the graph too
        return loss, logits

    def _capture(self, x, y):
        """Warm up on a side stream (compilation, cuDNN's choices, lazy allocations), then capture.
        The warm-up steps change the weights: callers restore their state afterwards (as the
        training loop's warm-up does) and call after_load()."""
        self.static = (x.clone(), y.clone())
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                self.opt.zero_grad(set_to_none=True)
                self._body(*self.static)
        torch.cuda.current_stream().wait_stream(s)
        self.opt.zero_grad(set_to_none=True)  # the graph's backward allocates (and then owns) the grads
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._body(*self.static)

    def __call__(self, x, y):
        if not self.capture:
            self.opt.zero_grad(set_to_none=True)
            out = self._body(x, y)
        else:
            if self.graph is None:
                self._capture(x, y)
            self.static[0].copy_(x, non_blocking=True)
            self.static[1].copy_(y, non_blocking=True)
            self.graph.replay()
            out = self.out
        self.sched.step()  # host side only: keeps param_groups' lr (console, checkpoint) in step
        if not self.scaler.is_enabled():  # else counted on the device (skipped steps do not count)
            self.ema.updates += self.ema.decay > 0
        return out

    def sync_host(self):
        """Bring the host's EMA count up to date with the device's (before a checkpoint): under
        loss scaling only the device knows which steps were skipped."""
        if self.scaler.is_enabled():
            self.ema.updates = int(self.ema_n.item())

    @torch.no_grad()
    def after_load(self):
        """After the optimizer, scheduler or EMA state was loaded (or restored after warm-up):
        copy the momentum / moment buffers into the graph's tensors, point the optimizer's state
        at them, and set the device counters from the host ones."""
        for u in self.updates:
            for i, p in enumerate(u["params"]):
                for name, bufs in u["state"].items():
                    loaded = self.opt.state.get(p, {}).get(name)
                    if loaded is None:
                        bufs[i].zero_()  # no step taken yet: torch's first step starts from zeros too
                    elif loaded is not bufs[i]:
                        bufs[i].copy_(loaded)
                    self.opt.state[p][name] = bufs[i]
        self.step_t.fill_(self.sched.last_epoch)  # LambdaLR counts steps in last_epoch
        # Adam's updates made: as loaded (fewer than the schedule's steps when some were skipped)
        adam = [p for u in self.updates if u["adam"] for p in u["params"]]
        loaded = self.opt.state.get(adam[0], {}).get("step") if adam else None
        made = 0.0 if loaded is None else float(loaded)
        if not self.opt_steps:
            self.opt_steps = [torch.zeros((), dtype=torch.float32, device=self.step_t.device) for _ in adam]
        for p, t in zip(adam, self.opt_steps):
            self.opt.state[p]["step"] = t
            t.fill_(made)
        self.opt_t.fill_(made)
        self.ema_n.fill_(self.ema.updates)


def make_whole_step(model, opt, sched, ema, criterion, rt, lr_factor, peak_lr: float, total_steps: int,
                    scaler: torch.amp.GradScaler | None = None):
    """WholeStep over `model` (already compiled as rt.compile_in_graph does, or not), with the lr
    table peak_lr * lr_factor(s) for s = 0 .. total_steps (the last entry holds past the end),
    captured on CUDA."""
    table = [peak_lr * lr_factor(s) for s in range(total_steps + 1)]
    return WholeStep(model, opt, sched, ema, criterion, rt, table, capture=True, scaler=scaler)


class TrainStep(EpochSums):
    """step(x, y) -> (loss, logits), detached: one optimizer step on a batch, its loss and
    correct predictions added to the epoch's device-side sums (EpochSums). WholeStep has the same
    interface."""

    def __init__(self, model, opt, sched, ema, criterion, rt, scaler: torch.amp.GradScaler | None = None):
        super().__init__(rt.device, scaler if scaler is not None else rt.grad_scaler())
        self.model, self.opt, self.sched, self.ema, self.criterion, self.rt = model, opt, sched, ema, criterion, rt
        self.step_begin = rt.step_begin
        if self.scaler.is_enabled():
            # fp16's first steps are often skipped (the scale starts high), so LambdaLR would warn
            # that it stepped before the optimizer; the schedule counts steps, taken or not. This
            # is the flag its wrapper of opt.step sets (as WholeStep does).
            opt._opt_called = True

    def after_load(self):
        """WholeStep re-syncs its device copies of the state here; this step holds none."""

    def sync_host(self):
        """WholeStep brings host counters up to date here; this step keeps them on the host."""

    def __call__(self, x, y):
        self.step_begin()
        with self.rt.autocast():
            logits = self.model(x)
            loss = self.criterion(logits, y)
        self.scaler.scale(loss).backward()  # the loss times the scale under fp16, else the loss
        self.scaler.step(self.opt)  # unscales; skips opt.step() on a non-finite gradient (fp16)
        found = found_inf(self.scaler, self.opt)  # None without loss scaling
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        if found is None or not found.item():  # step() has read the flag already: no extra wait
            self.ema.update()
        else:
            self.skipped += found
        loss, logits = loss.detach(), logits.detach()
        self.count(loss, logits, y)
        return loss, logits


def build_step(cfg, rt, model, train_model, opt, sched, ema, criterion, steps_per_epoch: int):
    """The training step: with --whole-step, forward, backward, the optimizer and EMA as one CUDA
    graph (WholeStep, over `model` compiled without CUDA graphs of its own); else the usual step
    over `train_model` (compiled or not, DDP-wrapped under torchrun). Either drives its own loss
    scaler (rt.grad_scaler(): a no-op unless fp16)."""
    if rt.whole_step:
        return make_whole_step(rt.compile_in_graph(model), opt, sched, ema, criterion, rt,
                               lr_factor(cfg, steps_per_epoch), peak_lr(cfg), cfg.epochs * steps_per_epoch)
    return TrainStep(train_model, opt, sched, ema, criterion, rt)
