#!/usr/bin/env bash
# For a GPU machine without network access: packs what fastres needs there beyond what such a
# machine usually has (torch, Triton) into one folder, ./.offline/ by default (git-ignored):
#   .offline/p0/          the FFCV wheel(s) and their pure-Python dependencies, the checksum and
#                         piece count of the data, and the first piece of the data
#   .offline/p1/ ... pN/  the other pieces of CIFAR-10 (train.npz + test.npz in one tar)
# The data is cut into pieces of at most PIECE_MB so that it fits transfers with a size limit;
# copy the pieces there in any order and by any means (scp, rsync, a USB disk), then run
# scripts/offline_setup.sh on that machine: it installs FFCV, joins and checks the pieces and
# converts the data.
#
# Environment: FASTRES_CIFAR10 (folder with train.npz/test.npz; required), FFCV_WHEELS (folder
# with an ffcv-*.whl built for that machine's Python, plus the wheels FFCV needs; required),
# PIECE_MB (default 44), OFFLINE_DIR (default .offline).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${FASTRES_CIFAR10:-}
WHEELS=${FFCV_WHEELS:-}
PIECE_MB=${PIECE_MB:-44}
DEST=${OFFLINE_DIR:-.offline}
die() { echo "offline_pack: error: $*" >&2; exit 2; }
[ -n "$SRC" ] || die "set FASTRES_CIFAR10 to a folder with train.npz and test.npz"
[ -n "$WHEELS" ] || die "set FFCV_WHEELS to a folder with the ffcv wheel for the offline machine"
for f in train.npz test.npz; do [ -f "$SRC/$f" ] || die "$SRC/$f not found (set FASTRES_CIFAR10)"; done
compgen -G "$WHEELS/ffcv-*.whl" >/dev/null || die "no ffcv-*.whl in $WHEELS (pip wheel ffcv==1.0.2 on a machine like the offline one builds it)"

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
echo "offline_pack: $n pieces in $DEST/p0 ... $DEST/p$((n - 1)); copy them to the same folder on the offline machine and run scripts/offline_setup.sh there"
