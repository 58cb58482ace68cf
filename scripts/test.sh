#!/usr/bin/env bash
# README command 2: installs what is missing, builds everything and runs the
# whole test suite with ctest. Arguments go to ctest (e.g. -R device).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
build="$("$root/scripts/configure.sh")"
cmake --build "$build" --parallel
ctest --test-dir "$build" --output-on-failure --parallel "$(nproc)" "$@"
