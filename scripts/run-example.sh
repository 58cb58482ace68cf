#!/usr/bin/env bash
# README command 1: installs what is missing, builds, and runs the main
# example. Arguments go to the example (try --help).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
build="$("$root/scripts/configure.sh")"
cmake --build "$build" --parallel --target device_report
exec "$build/examples/device_report" "$@"
