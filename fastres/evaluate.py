"""Test accuracy: evaluate() for a model during training, and `fastres eval CHECKPOINT...` for
saved ones (one, or an ensemble; optionally with flip TTA), with per-class results."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from . import runtime
from .config import from_dict
from .data import ensure_data
from .design import build_model
from .distributed import Dist
from .errors import BadInput
from .checkpoint import check_weights, load_checkpoint


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



def load_member(path, device: str = "auto", data=None) -> tuple:
    """(config, weights, checkpoint) of a checkpoint written by `fastres train`, read onto the CPU:
    the weights are what the run evaluated (its EMA, when it kept one). BadInput if damaged or
    foreign."""
    path = Path(path)
    ck = load_checkpoint(path, keys=("model", "config", "epoch"))
    overrides = {"device": device, "compile": "off"}
    if data:
        overrides["data"] = str(data)
    try:
        cfg = from_dict({**ck["config"], **overrides})
    except (BadInput, TypeError, AttributeError) as e:
        raise BadInput(f"{path}: its config is not valid ({e})") from None
    weights = ck["ema"] if ck.get("ema") is not None else ck["model"]
    return cfg, weights, ck


def build_members(paths, device: str = "auto", data=None) -> tuple:
    """(runtime, models, configs, checkpoints) of one or several checkpoints, on the device the
    first one's settings resolve to; refused (BadInput) if their class counts differ."""
    loaded = [load_member(p, device, data) for p in paths]
    rt = runtime.resolve(loaded[0][0])
    models = []
    for path, (cfg, weights, _) in zip(paths, loaded):
        model = build_model(cfg, rt)
        check_weights(Path(path), weights, model)
        model.load_state_dict(weights)
        models.append(model.eval())
    classes = {m.fc.out_features for m in models}
    if len(classes) > 1:
        raise BadInput(f"the checkpoints predict different numbers of classes ({sorted(classes)}); an ensemble "
                       "needs one set of classes")
    return rt, models, [c for c, _, _ in loaded], [ck for _, _, ck in loaded]


def evaluate_checkpoints(paths, data=None, tta=False, device="auto", out=None, log=print) -> dict:
    """`fastres eval CKPT...`: each checkpoint's test loss and accuracy (and with flip TTA, if
    asked), and with several the ensemble's (their mean softmax); per-class accuracy, confusion
    matrix and most confident mistakes of the last line (the ensemble's, TTA if asked) into `out`."""
    from data_prep import TEST_FILE
    from data_prep.convert import verify

    from .data import read_all
    from .results import ensemble, log_probabilities, nll_and_accuracy, write_results

    paths = [Path(p) for p in paths]
    rt, models, cfgs, cks = build_members(paths, device, data)
    ensure_data(cfgs[0], Dist(), log)
    d = Path(cfgs[0].data)
    manifest = verify(d)
    mean, std = (torch.tensor(manifest[k], dtype=torch.float32) for k in ("mean", "std"))
    images, labels = read_all(d / TEST_FILE, torch.device("cpu"), cfgs[0].test_limit or None)
    variants = (False, True) if tta else (False,)
    logps = {t: [] for t in variants}
    for path, model, ck in zip(paths, models, cks):
        for t in variants:
            logps[t].append(log_probabilities([model], images, mean, std, rt, t, cfgs[0].eval_batch_size))
            loss, acc = nll_and_accuracy(logps[t][-1], labels)
            log(f"{path}: epoch {ck['epoch']}, {len(labels)} test images, test loss {loss:.4f}, "
                f"test accuracy {acc:.2%}" + (" (flip TTA)" if t else ""))
    result = {"tta": tta, "epoch": cks[0]["epoch"], "checkpoints": [str(p) for p in paths]}
    for t in variants:
        logp = ensemble(logps[t])
        result["test_loss"], result["test_acc"] = nll_and_accuracy(logp, labels)
        if len(paths) > 1:
            log(f"ensemble of {len(paths)} (mean softmax): test loss {result['test_loss']:.4f}, "
                f"test accuracy {result['test_acc']:.2%}" + (" (flip TTA)" if t else ""))
    folder = Path(out) if out else (paths[0].parent / "eval" if len(paths) == 1 else Path("eval-ensemble"))
    what = f"ensemble of {len(paths)}" if len(paths) > 1 else paths[0].parent.name
    result.update(write_results(folder, logp, labels, images, title=what + (", flip TTA" if tta else "")))
    worst = sorted(result["per_class_acc"].items(), key=lambda kv: kv[1])[:3]
    log("per class: " + ", ".join(f"{n} {a:.1%}" for n, a in result["per_class_acc"].items()))
    log(f"weakest: {', '.join(n for n, _ in worst)}; confusion matrix and mistakes in {folder}/")
    return result
