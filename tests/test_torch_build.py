"""scripts/torch_build.sh (what scripts/install.sh installs): the torch build a machine's NVIDIA
driver and GPUs can run, chosen from nvidia-smi's answer (faked here: a script on PATH answering
as the real one does), overridable, and said with its reason. Nothing is downloaded."""
import os
import stat
import subprocess

import pytest

from conftest import REPO

CU126 = "https://download.pytorch.org/whl/cu126"
CPU = "https://download.pytorch.org/whl/cpu"


def choose(tmp_path, smi: str | None, **env) -> tuple[int, dict, str]:
    """Run the script with PATH holding only an nvidia-smi that prints `smi` (None: no nvidia-smi;
    'FAIL': one that fails as it does when the driver is not loaded) and the basic tools."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if smi is not None:
        exe = bin_dir / "nvidia-smi"
        body = ("echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'; exit 9"
                if smi == "FAIL" else f"printf '%s\\n' '{smi}'")
        exe.write_text(f"#!/bin/sh\n{body}\n")
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    r = subprocess.run(["bash", str(REPO / "scripts" / "torch_build.sh")], capture_output=True, text=True, timeout=60,
                       env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env})
    fields = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    return r.returncode, fields, r.stderr


@pytest.mark.parametrize("smi,build,index,reason", [
    # (driver_version, compute_cap per GPU) -> build, index, words in the reason
    ("580.82.07, 9.0", "cu130", "", "580"),                      # H100, current driver
    ("580.65.06, 7.5", "cu130", "", "7.5"),                      # T4 on a current driver
    ("550.54.15, 7.5", "cu126", CU126, "older than 580"),        # T4 on a hosted notebook's driver
    ("535.104.05, 9.0", "cu126", CU126, "older than 580"),       # H100 on a cluster's older driver
    ("580.82.07, 7.0", "cu126", CU126, "no kernels below 7.5"),  # V100 on a current driver
    ("535.104.05, 7.0", "cu126", CU126, "capability 7.0"),       # V100 on a cluster
    ("550.54.15, 6.0", "cu126", CU126, "capability 6.0"),        # P100 (Kaggle)
    ("580.82.07, 9.0\n580.82.07, 7.0", "cu126", CU126, "7.0"),   # mixed cards: the oldest decides
    ("470.256.02, 7.5", "cpu", CPU, "update the NVIDIA driver"),  # too old for any current build
    (None, "cpu", CPU, "no NVIDIA driver"),
    ("FAIL", "cpu", CPU, "no NVIDIA driver"),
])
def test_build_follows_driver_and_capability(tmp_path, smi, build, index, reason):
    rc, got, err = choose(tmp_path, smi)
    assert rc == 0, err
    assert (got["build"], got["index"]) == (build, index) and reason in got["why"], got


def test_a_choice_can_be_forced_or_the_existing_torch_used(tmp_path):
    rc, got, _ = choose(tmp_path, "535.104.05, 7.0", FASTRES_TORCH="cpu")
    assert (got["build"], got["index"], got["why"]) == ("cpu", CPU, "FASTRES_TORCH=cpu")
    rc, got, _ = choose(tmp_path, "580.82.07, 9.0", FASTRES_TORCH="existing")
    assert got["build"] == "existing" and got["index"] == ""
    rc, got, _ = choose(tmp_path, "550.54.15, 7.5", TORCH_INDEX_URL="https://mirror.example/whl/cu126")
    assert got["build"] == "cu126" and got["index"] == "https://mirror.example/whl/cu126"
    rc, got, err = choose(tmp_path, None, FASTRES_TORCH="cuda")
    assert rc == 2 and "FASTRES_TORCH" in err and not got


def test_install_with_existing_torch_refuses_a_python_without_one(tmp_path):
    """FASTRES_TORCH=existing where python3 has no torch: one line and exit 2, no environment made
    (rather than a venv that would download another torch)."""
    bare = tmp_path / "bare"
    subprocess.run(["python3", "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    r = subprocess.run(["bash", str(REPO / "scripts" / "install.sh")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PATH": f"{bare / 'bin'}:{os.environ['PATH']}", "FASTRES_TORCH": "existing",
                            "VENV": str(tmp_path / "venv")})
    assert r.returncode == 2 and "python3 has no torch" in r.stderr, r.stdout + r.stderr
    assert "torch build: existing (FASTRES_TORCH=existing)" in r.stdout
    assert not (tmp_path / "venv").exists()
