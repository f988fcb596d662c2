#!/usr/bin/env bash
# Which torch build this machine's NVIDIA driver and GPUs can run; sourced by install.sh, or run
# alone to see the choice (it downloads nothing). Prints three lines:
#   build=cu130|cu126|cpu|existing
#   index=URL        (empty: PyPI's default wheel)
#   why=the reason, in words
# FASTRES_TORCH=auto (default) decides from `nvidia-smi --query-gpu=driver_version,compute_cap`:
#   - driver 580+ and every GPU at capability 7.5 or newer: cu130, PyPI's default build (CUDA 13
#     needs the 580 driver series and carries kernels from Turing, 7.5, on);
#   - driver 525+ otherwise (an older driver, or a P100/V100-class GPU): cu126, torch's CUDA 12.6
#     build, the one that still carries kernels for capability 5.0-7.0 and runs on 525+ drivers;
#   - no NVIDIA driver, or one older than 525: cpu, torch's CPU build.
# FASTRES_TORCH=cu130|cu126|cpu forces a build; FASTRES_TORCH=existing uses the torch that python3
# already has (a hosted notebook's, a cluster module's). TORCH_INDEX_URL overrides the index.
set -euo pipefail

torch_build() {
  local want=${FASTRES_TORCH:-auto} build why rows driver cap
  case "$want" in
    existing|cu130|cu126|cpu) build=$want; why="FASTRES_TORCH=$want" ;;
    auto)
      rows=$(nvidia-smi --query-gpu=driver_version,compute_cap --format=csv,noheader 2>/dev/null) || rows=""
      if [ -z "$rows" ]; then
        build=cpu; why="no NVIDIA driver found (nvidia-smi missing or answering nothing)"
      else
        # the oldest GPU decides; all GPUs share one driver
        driver=$(printf '%s\n' "$rows" | head -n 1 | cut -d, -f1 | tr -d ' ')
        cap=$(printf '%s\n' "$rows" | cut -d, -f2 | tr -d ' ' | sort -t. -k1,1n -k2,2n | head -n 1)
        local major=${driver%%.*} cap10
        cap10=$(( ${cap%%.*} * 10 + ${cap#*.} ))
        if [ "$major" -ge 580 ] && [ "$cap10" -ge 75 ]; then
          build=cu130; why="driver $driver (580 or newer) and capability $cap (7.5 or newer) run the CUDA 13 build"
        elif [ "$major" -ge 525 ] && [ "$cap10" -ge 50 ]; then
          build=cu126
          if [ "$cap10" -lt 75 ]; then
            why="capability $cap: the CUDA 13 build has no kernels below 7.5; the CUDA 12.6 build has (driver $driver)"
          else
            why="driver $driver is older than 580, which the CUDA 13 build needs; the CUDA 12.6 build runs on 525 and newer"
          fi
        else
          build=cpu; why="driver $driver with capability $cap: no current torch build runs on it (CUDA 12.6 needs driver 525 and capability 5.0); update the NVIDIA driver to use the GPU"
        fi
      fi ;;
    *) echo "FASTRES_TORCH: expected auto, existing, cu130, cu126 or cpu; got '$want'" >&2; return 2 ;;
  esac
  local index=""
  case "$build" in
    cu126) index=https://download.pytorch.org/whl/cu126 ;;
    cpu) index=https://download.pytorch.org/whl/cpu ;;
  esac
  index=${TORCH_INDEX_URL:-$index}
  printf 'build=%s\nindex=%s\nwhy=%s\n' "$build" "$index" "$why"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  torch_build
fi
