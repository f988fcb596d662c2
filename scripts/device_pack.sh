#!/usr/bin/env bash
# Packs what a lent GPU machine (the `device` tool's: no network, no FFCV) needs into
# ./.device/ (git-ignored), cut so that each `run` call carries well under its 64 MiB:
#   .device/p0/          FFCV 1.0.2 portable wheel and its pure-Python dependencies, the checksum
#                        and piece count of the data, and the first piece of the data
#   .device/p1/ ... pN/  the other pieces of CIFAR-10 (train.npz + test.npz in one tar)
# Carry .device/p0 in the first call, .device/p1 in the next, and so on, back to back: the machine
# keeps ignored files only while it stays warm. scripts/device_setup.sh then installs FFCV, joins
# and checks the pieces and converts the data there. The full sequence: bench/results/README.md.
#
# Environment: FASTRES_CIFAR10 (folder with train.npz/test.npz; default ../shared/data/cifar10),
# FFCV_WHEELS (default ../shared/wheels; ../shared/tools/portable-ffcv-wheel.sh DIR rebuilds it),
# PIECE_MB (default 44), DEVICE_DIR (default .device).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${FASTRES_CIFAR10:-../shared/data/cifar10}
WHEELS=${FFCV_WHEELS:-../shared/wheels}
PIECE_MB=${PIECE_MB:-44}
DEST=${DEVICE_DIR:-.device}
die() { echo "device_pack: error: $*" >&2; exit 2; }
for f in train.npz test.npz; do [ -f "$SRC/$f" ] || die "$SRC/$f not found (set FASTRES_CIFAR10)"; done
compgen -G "$WHEELS/ffcv-*.whl" >/dev/null || die "no ffcv-*.whl in $WHEELS (build one with ../shared/tools/portable-ffcv-wheel.sh DIR and set FFCV_WHEELS=DIR)"

tmp="$DEST.partial"  # built beside the destination and renamed at the end: never half-written
rm -rf "$tmp"; trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/p0/wheels"
cp "$WHEELS"/*.whl "$tmp/p0/wheels/"
tar -C "$SRC" -cf "$tmp/cifar10.tar" train.npz test.npz
(cd "$tmp" && sha256sum cifar10.tar > p0/SHA256SUMS)
split -b "${PIECE_MB}M" -d -a 2 "$tmp/cifar10.tar" "$tmp/piece."
rm "$tmp/cifar10.tar"
n=0
for f in "$tmp"/piece.*; do
  mkdir -p "$tmp/p$n"; mv "$f" "$tmp/p$n/cifar10.tar.${f##*.}"; n=$((n + 1))
done
echo "$n" > "$tmp/p0/PIECES"
rm -rf "$DEST"; mv "$tmp" "$DEST"; trap - EXIT
du -sh "$DEST"/p*
echo "device_pack: $n pieces; carry $DEST/p0 in the first call, then $DEST/p1 ... $DEST/p$((n - 1)), one per call"
