"""Test accuracy: evaluate() for a model during training, and `fastres eval CHECKPOINT` for a
saved one (optionally with flip TTA)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from . import runtime
from .config import from_dict
from .data import Batches, ensure_data
from .design import build_model
from .distributed import Dist
from .errors import BadInput
from .rundir import check_weights, load_checkpoint


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



def evaluate_checkpoint(path, data=None, tta=False, device="auto", log=print) -> dict:
    path = Path(path)
    ck = load_checkpoint(path, keys=("model", "config", "epoch"))  # BadInput if damaged or foreign
    overrides = {"device": device, "compile": "off"}
    if data:
        overrides["data"] = str(data)
    try:
        cfg = from_dict({**ck["config"], **overrides})
    except (BadInput, TypeError, AttributeError) as e:
        raise BadInput(f"{path}: its config is not valid ({e})") from None
    rt = runtime.resolve(cfg)
    ensure_data(cfg, Dist(), log)
    batches = Batches(cfg.data, cfg.batch_size, cfg.eval_batch_size, rt.device, cfg.seed,
                      test_limit=cfg.test_limit or None, channels_last=rt.channels_last,
                      num_workers=cfg.loader_workers)
    model = build_model(cfg, rt)
    # The EMA weights, when the run kept them, are what the run evaluated.
    weights = ck["ema"] if ck.get("ema") is not None else ck["model"]
    check_weights(path, weights, model)
    model.load_state_dict(weights)
    loss, acc, n = evaluate(model, batches, rt, tta, Dist())
    log(f"{path}: epoch {ck['epoch']}, {n} test images, "
        f"test loss {loss:.4f}, test accuracy {acc:.2%}" + (" (flip TTA)" if tta else ""))
    return {"test_loss": loss, "test_acc": acc, "epoch": ck["epoch"], "tta": tta}
