"""What this machine is, as fastres sees it: the NVIDIA driver and GPUs (from nvidia-smi), whether
the installed torch can use them, and the versions that matter. `fastres env` prints it; every
run's record.json keeps the same facts (fastres.record.environment).

    problem = torch_cuda_problem()   # None, or one line saying why torch cannot use the GPU and the fix
"""
from __future__ import annotations

import importlib.metadata
import platform
import shutil
import subprocess

import torch

INSTALL_FIX = "reinstall with 'bash scripts/install.sh', which picks the torch build this driver and GPU run"
CUDA13_DRIVER = 580  # the oldest driver series that runs torch's CUDA 13 builds


def nvidia_smi(*query: str) -> list[list[str]]:
    """nvidia-smi's CSV answer to --query-gpu=QUERY, a row per GPU; [] without a driver."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, f"--query-gpu={','.join(query)}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return [[v.strip() for v in line.split(",")] for line in out.stdout.strip().splitlines() if line.strip()]


def nvidia_gpus() -> list[dict]:
    """Each GPU the driver sees: name, driver version, compute capability, memory in MiB."""
    rows = nvidia_smi("name", "driver_version", "compute_cap", "memory.total")
    return [{"name": r[0], "driver": r[1], "capability": r[2], "memory_mib": r[3]} for r in rows if len(r) == 4]


def version(dist_name: str) -> str | None:
    """The installed distribution's version (a package's __version__ can be stale: ffcv's is)."""
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def arch_supported(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a torch built for arch_list (torch.cuda.get_arch_list()) runs on this capability:
    a cubin of the same major version and no newer minor, or PTX (compute_XY) it can JIT."""
    major, minor = capability
    for arch in arch_list:
        kind, _, num = arch.partition("_")
        num = num.rstrip("af")  # sm_90a, sm_100f: family-specific builds
        if not num.isdigit():
            continue
        a_major, a_minor = int(num[:-1]), int(num[-1])
        if kind == "sm" and a_major == major and a_minor <= minor:
            return True
        if kind == "compute" and (a_major, a_minor) <= (major, minor):
            return True
    return False


def torch_cuda_problem() -> str | None:
    """One line when an NVIDIA GPU is here but this torch cannot use it (a CPU build, a CUDA build
    the driver is too old for, or one without kernels for this GPU), naming the fix; else None."""
    build = f"torch {torch.__version__} ({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU'} build)"
    if torch.cuda.is_available():
        archs = torch.cuda.get_arch_list()
        for i in range(torch.cuda.device_count()):
            cap = tuple(torch.cuda.get_device_capability(i))
            if archs and not arch_supported(cap, archs):
                return (f"{build} has no kernels for the {torch.cuda.get_device_name(i)} (capability "
                        f"{cap[0]}.{cap[1]}; it carries {' '.join(archs)}): {INSTALL_FIX}")
        return None
    gpus = nvidia_gpus()
    if not gpus:
        return None
    g = gpus[0]
    if torch.version.cuda is None:
        why = "is a CPU build"
    else:
        need = f" (CUDA 13 builds need driver {CUDA13_DRIVER} or newer)" if torch.version.cuda.startswith("13") else ""
        why = f"cannot use driver {g['driver']}{need}"
    return (f"the {g['name']} (driver {g['driver']}) is here but {build} {why}: {INSTALL_FIX}, "
            "or train on the CPU with --device cpu")


def facts() -> dict:
    """The versions and hardware a bug report or a record needs, without resolving a run."""
    return {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "torch_arch_list": torch.cuda.get_arch_list() if torch.cuda.is_available() else [],
            "triton": version("triton"), "ffcv": version("ffcv"), "numba": version("numba"),
            "optuna": version("optuna"), "numpy": version("numpy"), "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "nvidia_gpus": nvidia_gpus(),
            "cuda_devices": [{"name": torch.cuda.get_device_name(i),
                              "capability": "%d.%d" % torch.cuda.get_device_capability(i),
                              "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
                             for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else [],
            "torch_cuda_problem": torch_cuda_problem()}
