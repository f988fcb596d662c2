"""Where a training step's time goes:  python -m bench.profile_step [--batch 64] [--compile MODE ...]

Profiles STEPS ResNet-68 training steps (forward, backward, SGD, as `fastres train` runs them) with
torch.profiler after a warm-up, per compile mode, and prints a Markdown summary (also written to
--out): wall time per step against GPU busy time per step (the union of the intervals in which
a kernel ran, so overlapping kernels are not counted twice), kernel launches per step (CUDA
runtime launch calls made by the host, a CUDA-graph replay counting as one) against kernels run
per step, and the kernels that took the most GPU time. Wall much above busy means the GPU waits
for the host (launch overhead); the two close means the kernels themselves are the cost.
Needs CUDA.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

STEPS = 20
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch",
            "cudaLaunchCooperativeKernel")


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def profile(mode: str, batch: int, fused: bool, steps: int = STEPS, device: str = "cuda", depth: int = 68,
            whole_step: bool = False) -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from bench.common import step_under_test
    from fastres.config import make_config

    cfg = make_config("paper", {"device": device, "batch_size": batch, "compile": mode, "fused_bn_relu": fused,
                                "depth": depth, "whole_step": whole_step})
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rt, model, step, x, y = step_under_test(cfg)
    t0 = time.perf_counter()
    for _ in range(5):
        step(x, y)
    sync()
    warm = time.perf_counter() - t0
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step(x, y)
        sync()
        wall = time.perf_counter() - t0
    events = prof.events()
    # GPU events, without the ranges that record_function annotations (Optimizer.step#SGD.step)
    # also place on the GPU timeline: those span kernels, they are not kernels.
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    launches = sum(1 for e in events if e.device_type == DeviceType.CPU and e.name in LAUNCHES)
    by_name: dict[str, list] = {}
    for e in kernels:
        d = by_name.setdefault(e.name, [0, 0.0])
        d[0] += 1
        d[1] += e.time_range.elapsed_us()
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:12]
    kernel_total = sum(v[1] for v in by_name.values())
    return {"mode": mode + (" + whole step" if whole_step else ""), "fused_bn_relu": fused, "batch": batch, "steps": steps, "switches": rt.summary,
            "warmup_s": warm, "wall_ms_per_step": 1e3 * wall / steps,
            "busy_ms_per_step": 1e-3 * busy_us([(e.time_range.start, e.time_range.end) for e in kernels]) / steps,
            "kernel_ms_per_step": 1e-3 * kernel_total / steps,
            "launches_per_step": launches / steps, "kernels_per_step": len(kernels) / steps,
            "top": [{"kernel": k, "calls_per_step": c / steps, "ms_per_step": 1e-3 * t / steps,
                     "share": t / kernel_total if kernel_total else 0.0} for k, (c, t) in top]}


def markdown(results: list[dict], gpu: str) -> str:
    lines = [f"# Training-step profile: ResNet-68, {gpu}", "",
             f"torch {torch.__version__}; {results[0]['steps']} profiled steps per row after 5 warm-up steps; "
             "bf16 autocast, channels_last (the defaults). Wall: host clock over the steps, device-synchronized "
             "(profiler overhead included). GPU busy: union of kernel intervals.", "",
             "| compile | fused BN-ReLU | batch | wall ms/step | GPU busy ms/step | busy / wall | host launches/step "
             "| kernels/step |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['mode']} | {'on' if r['fused_bn_relu'] else 'off'} | {r['batch']} | "
                     f"{r['wall_ms_per_step']:.2f} | {r['busy_ms_per_step']:.2f} | "
                     f"{r['busy_ms_per_step'] / r['wall_ms_per_step']:.0%} | {r['launches_per_step']:.0f} | "
                     f"{r['kernels_per_step']:.0f} |")
    for r in results:
        lines += ["", f"## Top kernels: compile {r['mode']}, fused BN-ReLU {'on' if r['fused_bn_relu'] else 'off'}, "
                      f"batch {r['batch']}", "", "| kernel | calls/step | GPU ms/step | share of kernel time |",
                  "| --- | --- | --- | --- |"]
        for t in r["top"]:
            name = t["kernel"].replace("|", "/")
            name = name if len(name) <= 90 else name[:87] + "..."
            lines.append(f"| `{name}` | {t['calls_per_step']:.0f} | {t['ms_per_step']:.3f} | {t['share']:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--compile", nargs="*", default=["default"],
                   help="compile modes to profile, in turn (none: only --whole-step)")
    p.add_argument("--fused-bn-relu", action="store_true")
    p.add_argument("--whole-step", action="store_true", help="also profile --whole-step (compile default inside)")
    p.add_argument("--out", type=Path, default=None, help="also write the Markdown summary (and a .json) here")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.profile_step: error: no CUDA device; this profiles GPU kernels", file=sys.stderr)
        return 2
    results = []
    runs = [(mode, False) for mode in a.compile] + ([("default", True)] if a.whole_step else [])
    for mode, whole in runs:
        results.append(profile(mode, a.batch, a.fused_bn_relu, whole_step=whole))
        print(f"profiled compile {mode}: {results[-1]['wall_ms_per_step']:.2f} ms/step wall, "
              f"{results[-1]['busy_ms_per_step']:.2f} GPU busy", file=sys.stderr, flush=True)
    text = markdown(results, torch.cuda.get_device_name())
    print(text)
    if a.out:
        import json
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
        a.out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
