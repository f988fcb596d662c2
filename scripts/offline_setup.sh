#!/usr/bin/env bash
# Run on the GPU machine without network, in a checkout of fastres, once the folder made by
# scripts/offline_pack.sh has been copied there (all of it, or piece by piece):
#   1. installs FFCV and its pure-Python dependencies from .offline/p0/wheels;
#   2. joins the CIFAR-10 pieces, checks them against the checksum, unpacks them (data_prep/pack.py,
#      which checks each split's SHA-256 once decoded) and converts them to ./data.
# Each step is skipped when already done, and a missing piece is named, so it can be run again
# as pieces arrive. Environment: PYTHON (default python3), OFFLINE_DIR (default .offline), DATA
# (default data).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SRC=${OFFLINE_DIR:-.offline}
DATA=${DATA:-data}
die() { echo "offline_setup: error: $*" >&2; exit 2; }

if ! "$PY" -c "import ffcv" 2>/dev/null; then
  compgen -G "$SRC/p0/wheels/*.whl" >/dev/null || die "no wheels in $SRC/p0/wheels: copy $SRC/p0 here first"
  "$PY" -m pip install -q --no-index --no-deps "$SRC"/p0/wheels/*.whl
fi

if ! "$PY" -c "import sys; from fastres.data import has_data; sys.exit(not has_data(sys.argv[1]))" "$DATA"; then
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
import importlib.metadata, torch, triton
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"offline_setup: ready: torch {torch.__version__}, triton {triton.__version__}, ffcv {importlib.metadata.version('ffcv')}, {gpu}")
PY
