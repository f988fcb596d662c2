#!/usr/bin/env bash
# One-step install of fastres on a fresh Debian/Ubuntu machine (Python >= 3.11).
# Safe to run twice: every step is skipped or a no-op when already done.
#   1. Debian packages that FFCV's C helper builds against (OpenCV, libturbojpeg, pkg-config), and
#      PostgreSQL's server binaries for the sweep tests (not started: the tests start their own).
#   2. A virtual environment in ./.venv (or the one named by $VENV).
#   3. torch/torchvision FIRST: ffcv's build would otherwise pull an arbitrary torch. Which build
#      is chosen from the NVIDIA driver and GPUs (scripts/torch_build.sh says how, and why);
#      FASTRES_TORCH=existing uses the torch python3 already has (a hosted notebook's, a cluster
#      module's or conda environment's): the venv then sees python3's packages.
#   4. fastres itself (editable) with its test extra; this builds ffcv 1.0.2 from source.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

apt_pkgs=""
for p in libopencv-dev libturbojpeg0-dev pkg-config; do
  dpkg -s "$p" >/dev/null 2>&1 || apt_pkgs="$apt_pkgs $p"
done
# The tests start a real PostgreSQL server (the study storage several machines share): its binaries.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || apt_pkgs="$apt_pkgs postgresql"
# A bare Debian/Ubuntu may also lack a C++ compiler, Python headers or venv (ffcv compiles a C helper).
command -v g++ >/dev/null 2>&1 || apt_pkgs="$apt_pkgs build-essential"
python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' \
  || apt_pkgs="$apt_pkgs python3-dev"
python3 -c 'import ensurepip' 2>/dev/null || apt_pkgs="$apt_pkgs python3-venv"
if [ -n "$apt_pkgs" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "installing Debian packages:$apt_pkgs"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $apt_pkgs >/dev/null
fi

source scripts/torch_build.sh
choice=$(torch_build)
build=$(printf '%s\n' "$choice" | sed -n 's/^build=//p')
index=$(printf '%s\n' "$choice" | sed -n 's/^index=//p')
echo "torch build: $build ($(printf '%s\n' "$choice" | sed -n 's/^why=//p'))"
if [ "$build" = existing ]; then
  python3 -c 'import torch, torchvision' 2>/dev/null || {
    echo "FASTRES_TORCH=existing: python3 has no torch and torchvision to use; install them first, or drop FASTRES_TORCH" >&2
    exit 2; }
  [ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages "$VENV"
else
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip setuptools wheel
# torch 2.14.1 is the newest we test; >=2.4 keeps GPU images with torch 2.11 working.
if "$PY" -c 'import torch, torchvision' 2>/dev/null; then
  echo "torch: keeping $("$PY" -c 'import torch; print(torch.__version__, "(CUDA", torch.version.cuda, "build)")')"
elif [ -n "$index" ]; then
  "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1 --index-url "$index" || {
    echo "torch: $index could not be used; installing PyPI's default build instead"
    "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1; }
else
  "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
# (setuptools' "Editable installation" banner is about other projects' layouts: silenced)
PYTHONWARNINGS="ignore:Editable installation" "$PY" -m pip install -q -e '.[test]'
echo "fastres installed in $VENV"
