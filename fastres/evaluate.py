"""`fastres eval CHECKPOINT`: test accuracy of a saved model (optionally with flip TTA)."""
from __future__ import annotations

from pathlib import Path

import torch

from . import runtime
from .config import from_dict
from .data import Batches
from .distributed import Dist
from .train import build_model, ensure_data, evaluate


def evaluate_checkpoint(path, data=None, tta=False, device="auto", log=print) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    ck = torch.load(path, map_location="cpu", weights_only=False)
    overrides = {"device": device, "compile": "off"}
    if data:
        overrides["data"] = str(data)
    cfg = from_dict({**ck["config"], **overrides})
    rt = runtime.resolve(cfg)
    ensure_data(cfg, Dist(), log)
    batches = Batches(cfg.data, cfg.batch_size, cfg.eval_batch_size, rt.device, cfg.seed,
                      test_limit=cfg.test_limit or None, channels_last=rt.channels_last,
                      num_workers=cfg.loader_workers)
    model = build_model(cfg, rt)
    # The EMA weights, when the run kept them, are what the run evaluated.
    model.load_state_dict(ck["ema"] if ck.get("ema") is not None else ck["model"])
    loss, acc = evaluate(model, batches, rt, tta, Dist())
    log(f"{path}: epoch {ck['epoch']}, {batches.num_test} test images, "
        f"test loss {loss:.4f}, test accuracy {acc:.2%}" + (" (flip TTA)" if tta else ""))
    return {"test_loss": loss, "test_acc": acc, "epoch": ck["epoch"], "tta": tta}
