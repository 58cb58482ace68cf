#!/usr/bin/env bash
# Configures the build tree (default: build/ at the top of the repository)
# with multigpu's defaults; extra arguments go to cmake.
# Used by run-example.sh and test.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${MULTIGPU_BUILD_DIR:-$root/build}"
generator=()
if command -v ninja >/dev/null 2>&1 && [[ ! -f "$build/CMakeCache.txt" ]]; then
  generator=(-G Ninja)
fi
cmake -S "$root" -B "$build" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE="${MULTIGPU_BUILD_TYPE:-Release}" \
  -DMULTIGPU_WARNINGS_AS_ERRORS=ON \
  "$@" >&2
echo "$build"
