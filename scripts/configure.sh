#!/usr/bin/env bash
# Configures the build tree (default: build/ at the top of the repository)
# with multigpu's defaults, against the LibTorch that scripts/find-torch.sh
# chooses (MULTIGPU_TORCH, Torch_DIR, CMAKE_PREFIX_PATH: see there); extra
# arguments go to cmake. Prints the build folder. Used by run-example.sh and
# test.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${MULTIGPU_BUILD_DIR:-$root/build}"

# A -DTorch_DIR=... among the arguments is the user pointing at a LibTorch.
for argument in "$@"; do
  case "$argument" in
    -DTorch_DIR=* | -DTorch_DIR:PATH=*) export Torch_DIR="${argument#*=}" ;;
  esac
done
torch_dir="$("$root/scripts/find-torch.sh")"

# A build folder configured against another LibTorch keeps that one's cached
# libraries and flags: start it afresh.
if [[ -f "$build/CMakeCache.txt" ]]; then
  cached="$(sed -n 's/^Torch_DIR:[A-Z]*=//p' "$build/CMakeCache.txt")"
  if [[ -n "$cached" && "$(cd "$cached" 2>/dev/null && pwd)" != "$torch_dir" ]]; then
    echo "multigpu setup: $build was configured against $cached; configuring it afresh" >&2
    rm -rf "$build/CMakeCache.txt" "$build/CMakeFiles"
  fi
fi

generator=()
if command -v ninja >/dev/null 2>&1 && [[ ! -f "$build/CMakeCache.txt" ]]; then
  generator=(-G Ninja)
fi
cmake -S "$root" -B "$build" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE="${MULTIGPU_BUILD_TYPE:-Release}" \
  -DMULTIGPU_WARNINGS_AS_ERRORS=ON \
  -DTorch_DIR="$torch_dir" \
  "$@" >&2
echo "$build"
