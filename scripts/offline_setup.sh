#!/usr/bin/env bash
# Run on the GPU machine without network, in a checkout of fastres, once the folder made by
# scripts/offline_pack.sh has been copied there (all of it, or piece by piece):
#   1. installs the wheels of .offline/p0/wheels whose packages this Python lacks (FFCV and its
#      pure-Python dependencies, torchinfo, Optuna's chain); what it has already stays as it is;
#   2. unpacks the slice of p0 (2,000 + 500 real images) into .offline/slice: the tests can run
#      on it (FASTRES_CIFAR10=.offline/slice) before the other pieces arrive;
#   3. joins the CIFAR-10 pieces, checks them against the checksum, unpacks them (data_prep/pack.py,
#      which checks each split's SHA-256 once decoded) and converts them to ./data.
# Each step is skipped when already done, and a missing piece is named, so it can be run again
# as pieces arrive. `--slice`: steps 1 and 2 only (p0 is all it needs).
# Environment: PYTHON (default python3), OFFLINE_DIR (default .offline), DATA (default data).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SRC=${OFFLINE_DIR:-.offline}
DATA=${DATA:-data}
die() { echo "offline_setup: error: $*" >&2; exit 2; }
case "${1:-}" in
  "") slice_only=0 ;;
  --slice) slice_only=1 ;;
  *) die "usage: scripts/offline_setup.sh [--slice]" ;;
esac
[ -d "$SRC/p0" ] || die "$SRC/p0 is not here: copy it from the machine that ran scripts/offline_pack.sh first"

# 1. Wheels: a package this Python has already is kept (its version may be what other software
# there needs); the others are installed without dependencies, since the index is out of reach.
compgen -G "$SRC/p0/wheels/*.whl" >/dev/null || die "no wheels in $SRC/p0/wheels: copy $SRC/p0 here first"
missing=$("$PY" - "$SRC"/p0/wheels/*.whl <<'PY'
import importlib.metadata as m
import os
import sys
for w in sys.argv[1:]:
    name = os.path.basename(w).split("-")[0]  # a wheel's file name starts with its normalized name
    try:
        m.version(name)
    except m.PackageNotFoundError:
        print(w)
PY
)
if [ -n "$missing" ]; then
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --no-index --no-deps $missing
  echo "offline_setup: installed $(for w in $missing; do basename "$w" | cut -d- -f1-2; done | tr '\n' ' ')"
fi

# 2. The slice.
if [ -d "$SRC/p0/slice" ] && ! [ -f "$SRC/slice/test.npz" ]; then
  "$PY" -m data_prep.pack unpack "$SRC/p0/slice" "$SRC/slice" >/dev/null
fi
[ -f "$SRC/slice/test.npz" ] && echo "offline_setup: slice ready: FASTRES_CIFAR10=$SRC/slice runs the tests on it"

# 3. The whole set.
if [ "$slice_only" = 0 ] && ! "$PY" -c "import sys; from fastres.data import has_data; sys.exit(not has_data(sys.argv[1]))" "$DATA"; then
  [ -f "$SRC/p0/PIECES" ] || die "$SRC/p0/PIECES missing: copy $SRC/p0 here first"
  n=$(cat "$SRC/p0/PIECES")
  pieces=()
  for ((i = 0; i < n; i++)); do
    f=$(printf "%s/p%d/cifar10.tar.%02d" "$SRC" "$i" "$i")
    [ -f "$f" ] || die "piece $f is not here yet (copy $SRC/p$i; $n pieces in all)"
    pieces+=("$f")
  done
  cat "${pieces[@]}" > "$SRC/cifar10.tar"
  (cd "$SRC" && sha256sum --quiet -c p0/SHA256SUMS) || { rm -f "$SRC/cifar10.tar"; die "the joined pieces do not match the checksum"; }
  rm -rf "$SRC/cifar10"; mkdir -p "$SRC/cifar10"
  tar -C "$SRC/cifar10" -xf "$SRC/cifar10.tar" && rm "$SRC/cifar10.tar"
  "$PY" -m data_prep.pack unpack "$SRC/cifar10" "$SRC/cifar10"
  "$PY" -m data_prep --source "$SRC/cifar10" --out "$DATA"
fi
"$PY" - <<'PY'
import importlib.metadata as m
import torch
import triton

def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return "missing"

import ffcv, torchinfo  # noqa: E401,F401  what every run imports: an error here names the package
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"offline_setup: ready: torch {torch.__version__}, triton {triton.__version__}, ffcv {version('ffcv')}, "
      f"torchinfo {version('torchinfo')}, optuna {version('optuna')} (for sweeps), {gpu}")
PY
