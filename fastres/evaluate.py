"""`fastres eval CHECKPOINT`: test accuracy of a saved model (optionally with flip TTA)."""
from __future__ import annotations

from pathlib import Path

from . import runtime
from .config import from_dict
from .data import Batches
from .distributed import Dist
from .errors import BadInput
from .rundir import check_weights, load_checkpoint
from .train import build_model, ensure_data, evaluate


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
