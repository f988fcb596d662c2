#!/usr/bin/env bash
# On a machine with network, for a GPU machine without it: downloads into DIR the wheels of what
# fastres needs there besides torch, Triton, numpy, tqdm, matplotlib, PyYAML and FFCV (which a
# GPU image usually has, or which scripts/offline_pack.sh carries as its own wheel):
#   torchinfo                                   the model summary (every `fastres train`)
#   optuna alembic colorlog sqlalchemy mako     `fastres sweep` (Optuna and what it imports)
# each at the version this checkout's environment runs, built for the offline machine's Python
# (TARGET_PYTHON, default 3.12) on Linux x86-64. Then scripts/offline_pack.sh with WHEELS=DIR
# carries them, and scripts/offline_setup.sh installs those the offline machine lacks.
#
# usage: scripts/offline_wheels.sh DIR     environment: TARGET_PYTHON (default 3.12), PYTHON
#        (the environment whose versions are taken; default: the virtual environment's, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "offline_wheels: error: $*" >&2; exit 2; }
[ $# -eq 1 ] || die "usage: scripts/offline_wheels.sh DIR"
DIR=$1
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
TARGET=${TARGET_PYTHON:-3.12}
[[ "$TARGET" =~ ^3\.[0-9]+$ ]] || die "TARGET_PYTHON=$TARGET: give MAJOR.MINOR, such as 3.12"
# name==version of each, as installed here: the versions fastres's tests ran with
pins=$("$PY" - <<'PY'
import importlib.metadata as m
import sys
names = ["torchinfo", "optuna", "alembic", "colorlog", "sqlalchemy", "mako"]
missing, pins = [], []
for n in names:
    try:
        pins.append(f"{n}=={m.version(n)}")
    except m.PackageNotFoundError:
        missing.append(n)
if missing:
    sys.exit(f"offline_wheels: error: {', '.join(missing)} not installed in this environment "
             "(install fastres first: bash scripts/install.sh)")
print(" ".join(pins))
PY
)
mkdir -p "$DIR"
# --no-deps: exactly these; what they need besides is among what such a machine has (above)
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DIR" $pins
echo "offline_wheels: $pins for Python $TARGET in $DIR"
