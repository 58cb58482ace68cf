#!/usr/bin/env bash
# Installs the Debian packages that multigpu's build, tests and examples need,
# when some are missing. Called by the README's two commands; safe to rerun.
# LibTorch itself is chosen (and installed when missing) by
# scripts/find-torch.sh, which scripts/configure.sh calls.
# MULTIGPU_SKIP_APT=1 skips it (bring CMake, fmt, doctest, CLI11 and
# nlohmann-json yourself).
set -euo pipefail

packages=(
  cmake ninja-build g++ pkg-config
  python3-venv          # the project's virtual environment with pip's torch (scripts/find-torch.sh)
  libgloo-dev           # Gloo's headers, for multi-process training over c10d's ProcessGroupGloo
  iproute2              # `ip netns`: the tests that make hosts out of network namespaces
  libfmt-dev            # messages
  doctest-dev           # tests
  libcli11-dev          # command-line programs (examples, multigpu-run)
  nlohmann-json3-dev    # summaries and benchmark results
  dataset-fashion-mnist # the quickstart's data
  clang libclang-rt-14-dev  # the fuzz stage of the tests (libFuzzer)
  doxygen               # the API reference (docs/Doxyfile), checked by the docs test
  ccache                # compiler cache shared by every clone (scripts/configure.sh)
  parallel              # GNU parallel, the yardstick of benchmarks/scheduler_vs_parallel.sh
  slurmctld slurmd slurm-client munge  # a Slurm of the tests' own, for multigpu-run --slurm (tests/tools/slurm_cluster.sh)
)

if [[ "${MULTIGPU_SKIP_APT:-0}" == "1" ]]; then
  exit 0
fi
if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  echo "multigpu setup: no apt-get here; install these (or their equivalents) yourself: ${packages[*]}" >&2
  exit 0
fi

missing=()
for package in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi

sudo=()
if [[ "$(id -u)" != "0" ]]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
  else
    echo "multigpu setup: missing packages ${missing[*]}, and no root or sudo to install them" >&2
    exit 1
  fi
fi
echo "multigpu setup: installing ${missing[*]}"
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
