"""A run's checkpoint (RUN_DIR/last.pt): what it holds, writing it, reading it back checked, and
the check before a run resumes from it.

    save_checkpoint(parts, cfg, history, out / CHECKPOINT)        # after every epoch, atomically
    ck = checkpoint_to_resume(out / CHECKPOINT, model, cfg, rt, log)   # ResumeError: other settings
    history = restore(parts, ck)                                  # weights, optimizer, EMA, RNGs, ...
    ck = load_checkpoint(path, model)                             # BadInput if damaged or foreign
"""
from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch

from .config import Config, from_dict
from .errors import BadInput
from .rundir import atomic_write

CHECKPOINT_KEYS = ("model", "config", "epoch", "optimizer", "scheduler", "ema", "history", "rng")

# Settings a resumed run may change: they move files or threads around, not the arithmetic.
RESUME_MAY_DIFFER = {"out", "data", "loader_workers", "device", "eval_batch_size", "progress_s", "tensorboard",
                     "max_params"}


class ResumeError(BadInput):
    pass


def load_checkpoint(path: Path, model: torch.nn.Module | None = None, keys=CHECKPOINT_KEYS,
                    map_location="cpu") -> dict:
    """A checkpoint, checked before anything is taken from it: it loads, has `keys`, and (given
    a model) its weights have exactly the model's names and shapes. Raises BadInput otherwise."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: checkpoint not found")
    try:
        # weights_only=False: the checkpoint holds NumPy and Python RNG states. Load only
        # checkpoints you wrote (pickle runs code).
        ck = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip, not a torch file, unpickling errors
        reason = (str(e).splitlines() or [""])[0].split(". ")[0][:160]  # the first sentence
        raise BadInput(f"{path}: not a readable checkpoint, perhaps truncated or not written by fastres "
                       f"({type(e).__name__}: {reason}); delete it to start over, or name another") from None
    missing = [k for k in keys if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise BadInput(f"{path}: not a fastres checkpoint (missing {', '.join(missing)})")
    if model is not None:
        check_weights(path, ck["model"], model)
    return ck


def check_weights(path: Path, state_dict, model: torch.nn.Module) -> None:
    """BadInput unless `state_dict` has exactly the model's tensor names and shapes."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        got = {k: tuple(v.shape) for k, v in state_dict.items()}
    except (AttributeError, TypeError):
        raise BadInput(f"{path}: its weights are not a state dict") from None
    if got != want:
        diff = sorted(set(got) ^ set(want)) or [k for k in want if got[k] != want[k]]
        raise BadInput(f"{path}: its weights do not fit this model ({len(diff)} tensors differ, e.g. "
                       f"{diff[0]}); it was written for another model (--blocks, --widths, --kernel, ...), or is damaged")


def checkpoint_to_resume(ckpt_path: Path, model, cfg: Config, rt, log) -> dict | None:
    """The checkpoint --resume continues from, read onto the CPU (load_state_dict puts each tensor
    where the model's live, and RNG states must stay CPU ByteTensors), or None without one;
    ResumeError if it was written with settings that change the arithmetic."""
    if not ckpt_path.is_file():
        log(f"--resume: no checkpoint at {ckpt_path}; starting from scratch")
        return None
    ck = load_checkpoint(ckpt_path, model)  # BadInput if damaged or foreign
    try:
        old = from_dict(ck["config"])
    except (BadInput, TypeError) as e:
        raise ResumeError(f"{ckpt_path}: its config is not valid ({e})") from None
    diff = {k: (getattr(old, k), getattr(cfg, k)) for k in cfg.to_dict()
            if k not in RESUME_MAY_DIFFER and getattr(old, k) != getattr(cfg, k)}
    # The placement decides the batches' order: what it resolved to must match (auto is device on
    # one GPU and stream on a CPU), however it was asked for
    placed = ck.get("data_placement", old.data_placement)
    diff.pop("data_placement", None)
    if placed != rt.data_placement:
        diff["data_placement"] = (placed, rt.data_placement if cfg.data_placement != "auto" else
                                  f"auto, resolved to {rt.data_placement}")
    # so must the precision: fp16's loss scale is part of the state (a checkpoint from before fp16
    # existed has no "amp": bf16 or off, and no scaler to load)
    written_amp = ck.get("amp", "bf16 or off")
    if written_amp != rt.summary["amp"] and (rt.loss_scaling or "amp" in ck):
        diff["amp"] = (written_amp, f"{cfg.amp}, resolved to {rt.summary['amp']}")
    if diff:
        raise ResumeError(f"{ckpt_path} was written with other settings: " +
                          ", ".join(f"--{k.replace('_', '-')} {a} (now {b})" for k, (a, b) in diff.items()))
    return ck


def restore(p, ck: dict) -> list[dict]:
    """Put a checkpoint's state into the run's parts (fastres.train.Parts); the epochs' history it holds."""
    p.model.load_state_dict(ck["model"]), p.opt.load_state_dict(ck["optimizer"])
    p.sched.load_state_dict(ck["scheduler"]), p.ema.load_state_dict(ck["ema"])
    p.ema.updates = ck.get("ema_updates", 0)
    p.step.load_scaling_state(ck.get("loss_scaling", {}))
    p.step.after_load()
    set_rng_state(ck["rng"])
    return ck["history"]


def save_checkpoint(p, cfg: Config, history: list[dict], path: Path) -> None:
    """Everything a resume needs after the epoch history ends with, written atomically."""
    ck = {"model": p.model.state_dict(), "optimizer": p.opt.state_dict(), "scheduler": p.sched.state_dict(),
          "ema": p.ema.state_dict(), "ema_updates": p.ema.updates, "epoch": history[-1]["epoch"],
          "config": cfg.to_dict(), "data_placement": p.rt.data_placement, "history": history,
          "rng": rng_state(), "amp": p.rt.summary["amp"], "loss_scaling": p.step.scaling_state(),
          "normalization": {k: p.batches.manifest[k] for k in ("mean", "std")}}  # for predict
    # Serialized in memory first (a few MB), so that a failed write reports the OS's reason (disk
    # full, file too large) rather than torch's zip writer's.
    blob = io.BytesIO()
    torch.save(ck, blob)
    atomic_write(path, lambda f: f.write_bytes(blob.getbuffer()))


def rng_state() -> dict:
    """Every RNG a run draws from (torch, numpy, Python, CUDA), for its checkpoint."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"].cpu())
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in s["cuda"]])
