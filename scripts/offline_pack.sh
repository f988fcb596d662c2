#!/usr/bin/env bash
# For a GPU machine without network access: packs what fastres needs there beyond what such a
# machine usually has (torch, Triton, numpy) into one folder, ./.offline/ by default (git-ignored):
#   .offline/p0/          the wheels to install there (FFCV and its pure-Python dependencies,
#                         torchinfo, Optuna's chain: scripts/offline_wheels.sh downloads the ones
#                         besides FFCV), a class-balanced slice of the data (2,000 + 500 images,
#                         4 MiB) for the tests, the checksum and piece count of the data, and the
#                         first piece of the data
#   .offline/p1/ ... pN/  the other pieces of CIFAR-10
# The data travels losslessly compressed (data_prep/pack.py: 98 MiB for all 60,000 images, where
# the .npz files take 161 MiB) and cut so that no folder pN exceeds PIECE_MB, wheels included,
# to fit transfers with a size limit; copy the folders there in any order and by any means (scp,
# rsync, a USB disk), then run scripts/offline_setup.sh on that machine: it installs the wheels,
# joins and checks the pieces, unpacks and converts the data. With p0 alone there,
# `scripts/offline_setup.sh --slice` installs the wheels and unpacks the slice, so the machine
# can run the tests (FASTRES_CIFAR10=.offline/slice) while the other pieces are on their way.
#
# Environment: FASTRES_CIFAR10 (folder with train.npz/test.npz; required), WHEELS (folder with the
# wheels for the offline machine's Python: an ffcv-*.whl built for it, the wheels FFCV needs, and
# what scripts/offline_wheels.sh downloads; required; FFCV_WHEELS is read where WHEELS is unset),
# PIECE_MB (MiB per folder, default 60), SLICE (train,test images of the slice, default 2000,500;
# 0 for none), OFFLINE_DIR (default .offline), PYTHON (default: the virtual environment's, else
# python3).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${FASTRES_CIFAR10:-}
WHEELS=${WHEELS:-${FFCV_WHEELS:-}}
PIECE_MB=${PIECE_MB:-60}
SLICE=${SLICE:-2000,500}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
DEST=${OFFLINE_DIR:-.offline}
die() { echo "offline_pack: error: $*" >&2; exit 2; }
[ -n "$SRC" ] || die "set FASTRES_CIFAR10 to a folder with train.npz and test.npz"
[ -n "$WHEELS" ] || die "set WHEELS to a folder with the ffcv wheel for the offline machine (and what scripts/offline_wheels.sh downloads)"
for f in train.npz test.npz; do [ -f "$SRC/$f" ] || die "$SRC/$f not found (set FASTRES_CIFAR10)"; done
compgen -G "$WHEELS/ffcv-*.whl" >/dev/null || die "no ffcv-*.whl in $WHEELS (pip wheel ffcv==1.0.2 on a machine like the offline one builds it)"
[[ "$SLICE" =~ ^(0|[0-9]+,[0-9]+)$ ]] || die "SLICE=$SLICE: give TRAIN,TEST image counts (default 2000,500) or 0"
compgen -G "$WHEELS/torchinfo-*.whl" >/dev/null ||
  echo "offline_pack: note: no torchinfo wheel in $WHEELS: fastres needs it (scripts/offline_wheels.sh $WHEELS downloads it and Optuna's chain), unless the offline machine has it" >&2

tmp="$DEST.partial"  # built beside the destination and renamed at the end: never half-written
rm -rf "$tmp"; trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/p0/wheels"
cp "$WHEELS"/*.whl "$tmp/p0/wheels/"
"$PY" -m data_prep.pack pack "$SRC" "$tmp/packed" >/dev/null
if [ "$SLICE" != 0 ]; then
  "$PY" -m data_prep.pack pack "$SRC" "$tmp/p0/slice" --limit-train "${SLICE%,*}" --limit-test "${SLICE#*,}" >/dev/null
fi
tar -C "$tmp/packed" -cf "$tmp/cifar10.tar" train.fpk test.fpk
rm -rf "$tmp/packed"
(cd "$tmp" && sha256sum cifar10.tar > p0/SHA256SUMS)
# Piece 0 shares its folder with the wheels and the slice, so it is smaller by their size.
piece=$((PIECE_MB * 1024 * 1024))
first=$((piece - $(du -sb "$tmp/p0" | cut -f1) - 4096))
[ "$first" -gt 0 ] || die "PIECE_MB=$PIECE_MB is smaller than the wheels and the slice"
total=$(stat -c %s "$tmp/cifar10.tar")
n=0; off=0
while [ "$off" -lt "$total" ]; do
  size=$([ "$n" -eq 0 ] && echo "$first" || echo "$piece")
  mkdir -p "$tmp/p$n"
  dd if="$tmp/cifar10.tar" of="$(printf "%s/p%d/cifar10.tar.%02d" "$tmp" "$n" "$n")" bs=1M status=none \
     iflag=skip_bytes,count_bytes skip="$off" count="$size"
  off=$((off + size)); n=$((n + 1))
done
rm "$tmp/cifar10.tar"
echo "$n" > "$tmp/p0/PIECES"
rm -rf "$DEST"; mv "$tmp" "$DEST"; trap - EXIT
du -sh "$DEST"/p*
echo "offline_pack: $n pieces in $DEST/p0 ... $DEST/p$((n - 1)); copy them to the same folder on the offline machine and run scripts/offline_setup.sh there"
