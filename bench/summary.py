"""The compact summary printed at the end of `pytest bench/` (see conftest.py's hooks).

Per group, one line per case: its rate (images/s where the case reports it, else calls/s of its
round), the ratio to the group's baseline, and for `epoch` the epoch seconds next to the test
accuracy, and a label on a case whose switch this CPU only emulates (bf16 without bf16 units). With
--benchmark-compare, the change of each case against the saved run, and a check
that no `epoch` case lost more than --accuracy-drop-fail points of test accuracy. A case whose
rounds spread widely is flagged: its numbers are from a noisy machine.
"""
from __future__ import annotations

# Baseline case of each group: a case whose name contains the word, with the same batch size.
BASELINES = {"step": "eager_baseline", "loader": "torchvision", "kernel_host": "custom_op", "kernels": "eager",
             "epoch": "[stream]", "pack": "[k1]", "startup": "[plain]", "rerun": "[new]",
             "baseline": "torchvision"}
NOISY = 0.25  # (max - min) / median of the rounds above which a case is flagged


def case(b: dict) -> dict:
    """What the summary needs of one benchmark (a pytest-benchmark dict with 'stats')."""
    st, info = b["stats"], b.get("extra_info", {})
    median = st["median"]
    return {"name": b["name"], "group": b["group"] or "", "fullname": b.get("fullname", b["name"]),
            "rate": info.get("images_per_s") or (1 / median if median else 0.0),
            "unit": "img/s" if info.get("images_per_s") else "rounds/s", "median": median,
            "spread": (st["max"] - st["min"]) / median if median and st.get("rounds", 1) > 1 else 0.0,
            "batch": info.get("batch_size"), "epoch_s": info.get("epoch_train_s"), "acc": info.get("test_acc"),
            "emulated": info.get("emulated", False)}


def lines(benchmarks: list[dict], compared: dict[str, dict] | None = None) -> list[str]:
    """The summary's lines; `compared` maps fullname -> the saved run's benchmark dict."""
    cases = [case(b) for b in benchmarks]
    out = []
    for group in sorted({c["group"] for c in cases}):
        members = [c for c in cases if c["group"] == group]
        out.append(f"[{group}]")
        for c in members:
            rate = f"{c['rate']:>12,.1f}" if c["rate"] >= 10 else f"{c['rate']:>12.3f}"  # slow rounds: 3 decimals
            text = f"  {c['name']:<58} {rate} {c['unit']}"
            base = [b for b in members if BASELINES.get(group, "\0") in b["name"] and b["batch"] == c["batch"]]
            if base and base[0] is not c and base[0]["rate"]:
                text += f"  {c['rate'] / base[0]['rate']:5.2f}x baseline"
            if c["epoch_s"] is not None:
                text += f"  epoch {c['epoch_s']:.2f} s" + (f", test acc {c['acc']:.2%}" if c["acc"] is not None else "")
            if c["emulated"]:
                text += "  (emulated: bf16 on a CPU without bf16 units, one short round)"
            if c["spread"] > NOISY:
                text += f"  (noisy: rounds spread {c['spread']:.0%} of the median)"
            out.append(text)
    if compared:
        out.append("[change against the saved run]")
        for c in cases:
            old = compared.get(c["fullname"])
            if old is None:
                continue
            o = case(old)
            text = f"  {c['name']:<58} {c['unit']} {o['rate']:,.1f} -> {c['rate']:,.1f} ({c['rate'] / o['rate'] - 1:+.1%})"
            if c["acc"] is not None and o["acc"] is not None:
                text += f"; test acc {o['acc']:.2%} -> {c['acc']:.2%} ({100 * (c['acc'] - o['acc']):+.2f} points)"
            out.append(text)
    return out


def accuracy_drops(benchmarks: list[dict], compared: dict[str, dict], points: float) -> list[str]:
    """Cases whose test accuracy fell by more than `points` percentage points against the saved run."""
    bad = []
    for b in map(case, benchmarks):
        old = compared.get(b["fullname"])
        if b["acc"] is not None and old is not None and case(old)["acc"] is not None:
            drop = 100 * (case(old)["acc"] - b["acc"])
            if drop > points:
                bad.append(f"{b['name']}: test accuracy {case(old)['acc']:.2%} -> {b['acc']:.2%} "
                           f"(-{drop:.2f} points, allowed {points:g})")
    return bad
