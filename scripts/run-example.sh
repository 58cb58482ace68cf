#!/usr/bin/env bash
# README command 1: installs what is missing, builds, and runs the main
# example: the Fashion-MNIST quickstart. Arguments go to it (try --help).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
build="$("$root/scripts/configure.sh")"
cmake --build "$build" --parallel --target quickstart
exec "$build/examples/quickstart" "$@"
