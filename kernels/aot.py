"""Compile every Triton kernel of kernels/bn_relu.py for an NVIDIA GPU, on a machine without one.

    python -m kernels.aot [--arch 90] [--all] [--ptx-dir DIR]

The launchers in bn_relu.py (`_fwd`, `_bwd`) run on CPU tensors of the ResNet-68's shapes with
each kernel swapped for a recorder, so argument types, block sizes and flags are exactly those
of a real launch. Each distinct launch is then compiled by `triton.compile` for the target
(Triton's own ptxas builds the cubin), with the specialization a launch on the GPU would get
(pointers 16-byte aligned, ints divisible by 16 marked so, ints equal to 1 made constant), and
ptxas reports registers and spills per kernel.

This catches what the interpreter tests cannot: the compiled GPU path's type errors, loop-carried
values, layouts and register spills. It does not run anything: the arithmetic is checked by
tests/test_kernels.py under TRITON_INTERPRET=1, the speed only on a GPU (bench/test_kernels.py).
Default: the training setting (bf16 channels_last) and fp32 NCHW; --all adds the other two.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import bn_relu

KERNELS = ("_stats_kernel", "_finalize_kernel", "_apply_kernel", "_bwd_reduce_kernel", "_bwd_dx_kernel")
# The ResNet-68's BN inputs at batch 64 and 512, and an odd shape that makes G == 1.
SHAPES = [(b, c, s, s) for b in (64, 512) for c, s in ((16, 32), (32, 16), (64, 8))] + [(3, 17, 5, 5)]
TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16"}


@contextlib.contextmanager
def stubbed_kernels():
    """Within: bn_relu's kernels are not launched; each launch is appended, as (kernel, args,
    kwargs), to the list this yields. The launchers' own host work runs as usual."""
    calls = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.fn, args, kwargs))

    saved = {name: getattr(bn_relu, name) for name in KERNELS}
    try:
        for name in KERNELS:
            setattr(bn_relu, name, Recorder(saved[name]))
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(bn_relu, name, fn)


def record_launches(settings) -> list[tuple]:
    """(kernel, positional args, keyword args) of every launch the launchers make, deduplicated later."""
    with stubbed_kernels() as calls:
        for shape in SHAPES:
            for dtype, channels_last in settings:
                for training in (True, False):
                    for residual in (False, True):
                        fmt = torch.channels_last if channels_last else torch.contiguous_format
                        x = torch.empty(shape, dtype=dtype).contiguous(memory_format=fmt)
                        C = shape[1]
                        w, b, rm, rv = torch.ones(C), torch.zeros(C), torch.zeros(C), torch.ones(C)
                        y, mean, invstd = bn_relu._fwd(x, torch.empty_like(x) if residual else None, w, b, rm, rv,
                                                       training, 0.1, 1e-5)
                        bn_relu._bwd(torch.empty_like(x), y, x, w, mean, invstd, training, residual)
    return calls


def specialize(fn, args, kwargs):
    """signature, constexprs, attrs and options as a GPU launch of fn(*args, **kwargs) would have them."""
    bound = dict(zip(fn.arg_names, args))
    options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
    bound.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    signature, constexprs, attrs = {}, {}, {}
    for i, (param, name) in enumerate(zip(fn.params, fn.arg_names)):
        v = bound[name]
        if param.is_constexpr or (isinstance(v, int) and not isinstance(v, bool) and v == 1):
            signature[name], constexprs[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[name] = "*" + TYPE[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # allocations are 16-byte aligned
        elif isinstance(v, int):
            signature[name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(v).__name__}")
    return signature, constexprs, attrs, options


def ptxas_usage(ptx: str, arch: str) -> tuple[int, int]:
    """(registers, spill-store bytes) that Triton's bundled ptxas reports for the kernel."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([str(ptxas), f"-arch={arch}", "-v", str(src), "-o", str(Path(d) / "k.cubin")],
                           capture_output=True, text=True, check=True)
    text = r.stdout + r.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores", text)
    return int(regs.group(1)) if regs else -1, int(spills.group(1)) if spills else 0


def compile_all(settings, arch_cc: int, ptx_dir=None, log=print) -> list[dict]:
    """Compile each distinct launch; one row per launch: kernel, dtype, constants, regs, spills, error."""
    target = GPUTarget("cuda", arch_cc, 32)
    arch = f"sm_{arch_cc}a" if arch_cc >= 90 else f"sm_{arch_cc}"
    rows, seen = [], set()
    log(f"{'kernel':<20} {'first pointer, constants':<72} {'regs':>4} {'spill B':>7} {'s':>5}")
    for fn, args, kwargs in record_launches(settings):
        signature, constexprs, attrs, options = specialize(fn, args, kwargs)
        key = (fn.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())), tuple(sorted(attrs)))
        if key in seen:
            continue
        seen.add(key)
        row = {"kernel": fn.__name__, "arch": arch, "dtype": next(t[1:] for t in signature.values() if t.startswith("*")),
               "constants": {k: int(v) if isinstance(v, bool) else v for k, v in constexprs.items()},
               "registers": None, "spill_bytes": None, "error": None}
        desc = row["dtype"] + " " + " ".join(f"{k}={v}" for k, v in row["constants"].items())
        t0 = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)
            row["registers"], row["spill_bytes"] = ptxas_usage(compiled.asm["ptx"], arch)
        except Exception as e:  # report every failure, not just the first
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
            row["error"] = f"{type(e).__name__}: {lines[0]} {lines[-1] if len(lines) > 1 else ''}"[:300]
            log(f"{fn.__name__:<20} {desc[:72]:<72} FAILED: {row['error']}")
        else:
            if ptx_dir:
                Path(ptx_dir).mkdir(parents=True, exist_ok=True)
                (Path(ptx_dir) / f"{len(rows):03d}{fn.__name__}.ptx").write_text(compiled.asm["ptx"])
            log(f"{fn.__name__:<20} {desc[:72]:<72} {row['registers']:>4} {row['spill_bytes']:>7} "
                f"{time.perf_counter() - t0:>5.1f}")
        rows.append(row)
    failed = sum(r["error"] is not None for r in rows)
    spilled = sum(bool(r["spill_bytes"]) for r in rows)
    log(f"{len(rows)} distinct launches compiled for {arch} with Triton {triton.__version__}: "
        f"{failed} failed, {spilled} spilled registers")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.aot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability x10: 90 = H100/H200, 80 = A100")
    p.add_argument("--all", action="store_true", help="also bf16 NCHW and fp32 channels_last")
    p.add_argument("--ptx-dir", help="also write each kernel's PTX here")
    p.add_argument("--json", help="also write the rows (kernel, dtype, constants, registers, spills, error) here")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("kernels.aot: error: unset TRITON_INTERPRET; the interpreter replaces the compiler", file=sys.stderr)
        return 2
    settings = [(torch.bfloat16, True), (torch.float32, False)]
    if a.all:
        settings += [(torch.bfloat16, False), (torch.float32, True)]
    rows = compile_all(settings, a.arch, a.ptx_dir)
    if a.json:
        Path(a.json).write_text(json.dumps({"triton": triton.__version__, "rows": rows}, indent=1))
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
