"""`fastres env`: what this machine is and what a run would resolve to on it, with no data needed.

For a user on a new machine (will it use the GPU? in which precision?) and for bug reports; each
run's record.json keeps the same facts under "environment" and the resolution under "switches".
"""
from __future__ import annotations

import json

from . import runtime
from .config import Config
from .errors import BadInput
from .machine import facts


def report(cfg: Config) -> dict:
    """The machine's facts and, for cfg, what each switch resolves to and why (or why the run
    would be refused)."""
    out = {"machine": facts()}
    try:
        runtime.check_before_work(cfg)
        out["switches"] = runtime.resolve(cfg).summary
    except (BadInput, RuntimeError) as e:
        out["refused"] = str(e)
    return out


def text(r: dict, preset: str) -> str:
    m = r["machine"]
    lines = [f"python {m['python']}, torch {m['torch']} "
             f"({'CUDA ' + m['torch_cuda'] if m['torch_cuda'] else 'CPU'} build), "
             + ", ".join(f"{k} {m[k] or '-'}" for k in ("triton", "ffcv", "numba", "optuna")),
             f"CPU: {m['cpu']}, {m['cpu_capability']}, {'with' if runtime.cpu_has_bf16() else 'without'} bf16 units",
             "NVIDIA driver: " + (m["nvidia_gpus"][0]["driver"] if m["nvidia_gpus"] else "none found (no nvidia-smi)")]
    for i, g in enumerate(m["cuda_devices"]):
        lines.append(f"GPU {i}: {g['name']}, capability {g['capability']}, {g['memory_gib']} GiB")
    if not m["cuda_devices"]:
        lines.append("GPUs torch can use: none" + (f" (the driver sees {', '.join(g['name'] for g in m['nvidia_gpus'])})"
                                                   if m["nvidia_gpus"] else ""))
    if m["torch_cuda_problem"]:
        lines.append(f"PROBLEM: {m['torch_cuda_problem']}")
    lines.append(f"\n'fastres train --preset {preset}' here would use:")
    if "refused" in r:
        lines.append(f"  nothing: it is refused: {r['refused']}")
    else:
        for k, v in r["switches"].items():
            if not k.endswith("_why"):
                why = r["switches"].get(f"{k}_why")
                lines.append(f"  {k:<16} {v}" + (f"\n  {'':<16}   ({why})" if why else ""))
    return "\n".join(lines)


def show(cfg: Config, as_json: bool = False) -> None:
    r = report(cfg)
    print(json.dumps(r, indent=2, default=str) if as_json else text(r, cfg.preset))
