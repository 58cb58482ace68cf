#!/usr/bin/env bash
# Chooses the LibTorch that multigpu builds against, installing one when
# none is at hand, and prints its CMake folder (what Torch_DIR takes) on
# standard output; what it chose, and why, goes to standard error.
#
# MULTIGPU_TORCH says which one (default: auto):
#   auto     the first of: the LibTorch you point at (Torch_DIR, or
#            CMAKE_PREFIX_PATH, in the environment); the torch of the python3
#            on PATH; the project's virtual environment with pip's torch
#            (torch-cuda where an NVIDIA driver is present, else torch-cpu;
#            made here when missing); Debian's libtorch-dev
#   cpu      the project's virtual environment with pip's CPU torch (torch-cpu)
#   cuda     the project's virtual environment with pip's CUDA torch (torch-cuda)
#   python   the torch of the python3 on PATH
#   debian   Debian's libtorch-dev (LibTorch 1.13, CPU), installed with apt-get
#   PATH     a LibTorch folder (the archive's libtorch/, or a folder holding TorchConfig.cmake)
# MULTIGPU_TORCH_PIP_CPU / MULTIGPU_TORCH_PIP_CUDA: what pip installs into
# those environments (defaults: torch==2.13.0 and torch==2.14.1, the versions
# CI tests; add --index-url ... to take them from another index).
# MULTIGPU_VENV_DIR: where the environments live. Default: venv/ in the
# per-user cache folder, MULTIGPU_CACHE_DIR (default
# ${XDG_CACHE_HOME:-~/.cache}/multigpu), so that every clone of the
# repository shares them (a CUDA torch is several GB, and minutes to install);
# a clone's own .venv/torch-cpu or .venv/torch-cuda, made by an older
# version of this script, is still used where it exists.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
choice="${MULTIGPU_TORCH:-auto}"
home="${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}"
cache_root="${MULTIGPU_CACHE_DIR:-${XDG_CACHE_HOME:-$home/.cache}/multigpu}"
venv_root="${MULTIGPU_VENV_DIR:-$cache_root/venv}"
pip_cpu="${MULTIGPU_TORCH_PIP_CPU:-torch==2.13.0}"
pip_cuda="${MULTIGPU_TORCH_PIP_CUDA:-torch==2.14.1}"

say() { echo "multigpu setup: $*" >&2; }
fail() { say "$*"; exit 1; }

have_driver() { [[ -e /proc/driver/nvidia/version ]] || nvidia-smi -L >/dev/null 2>&1; }

# Why pip's CUDA torch cannot be built against here ("" when it can): it is
# built for CUDA 13, which needs a driver for CUDA 13 or newer, and a CUDA
# LibTorch's CMake package needs a CUDA toolkit.
why_not_cuda() {
  local driver_cuda toolkit=""
  driver_cuda="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\..*/\1/p' | head -n1 || true)"
  if [[ -n "$driver_cuda" && "$driver_cuda" -lt 13 ]]; then
    echo "the NVIDIA driver supports CUDA up to $driver_cuda.x, and pip's $pip_cuda is built for CUDA 13"
    return
  fi
  for candidate in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
    [[ -n "$candidate" && -f "$candidate/include/cuda_runtime_api.h" ]] && toolkit="$candidate"
  done
  [[ -z "$toolkit" ]] && echo "no CUDA toolkit was found (CUDA_HOME, /usr/local/cuda), which a CUDA LibTorch needs to build against"
  return 0
}

# The folder holding TorchConfig.cmake under (or at) $1; nothing if none.
torch_cmake_dir() {
  local base="$1" candidate
  for candidate in "$base" "$base/Torch" "$base/share/cmake/Torch" "$base/lib/cmake/Torch" \
                   "$base/lib/x86_64-linux-gnu/cmake/Torch" "$base/torch/share/cmake/Torch"; do
    if [[ -f "$candidate/TorchConfig.cmake" ]]; then
      (cd "$candidate" && pwd)
      return 0
    fi
  done
  return 1
}

# LibTorch's version, from the version file next to its CMake config.
torch_version() {
  sed -n 's/^set(PACKAGE_VERSION "\(.*\)")$/\1/p' "$1/TorchConfigVersion.cmake" 2>/dev/null | head -n1 || true
}

# "CUDA" or "CPU": a CUDA LibTorch has libtorch_cuda.so.
torch_flavour() {
  local lib
  for lib in "$1/../../../lib" "$1/../../.."; do
    if compgen -G "$lib/libtorch_cuda.so*" >/dev/null; then
      echo CUDA
      return
    fi
  done
  echo CPU
}

# The torch of a python interpreter: its CMake folder, or nothing.
python_torch() {
  "$1" -c 'import os, torch; print(os.path.join(torch.utils.cmake_prefix_path, "Torch"))' 2>/dev/null
}

# The folder of the project's virtual environment $1 (cpu or cuda): the
# clone's own .venv/torch-$1 where one is there and MULTIGPU_VENV_DIR is unset
# (made by an older version of this script), else $venv_root/torch-$1.
venv_path() {
  if [[ -z "${MULTIGPU_VENV_DIR:-}" && -x "$root/.venv/torch-$1/bin/python" ]]; then
    echo "$root/.venv/torch-$1"
  else
    echo "$venv_root/torch-$1"
  fi
}

# The project's virtual environment $1 (cpu or cuda), made with pip's torch when missing.
# It is shared by every clone (see the top), so it is trusted only when its
# marker names exactly the spec asked for now: a changed pin, or a pip install
# that was interrupted (the marker is written last), makes it anew, under a
# lock, so that two clones never build into one folder. An environment
# made before the marker existed is adopted when its torch is the pinned
# version and its CMake package is there.
venv_torch() {
  local kind="$1" venv spec dir marker lock
  venv="$(venv_path "$kind")"
  spec="$pip_cpu"
  [[ "$kind" == cuda ]] && spec="$pip_cuda"
  marker="$venv/.multigpu-pip-spec"
  if [[ -f "$marker" && "$(cat "$marker")" == "$spec" ]] && dir="$(python_torch "$venv/bin/python")" && [[ -n "$dir" ]]; then
    echo "$dir"
    return 0
  fi
  if [[ ! -f "$marker" && "$spec" == torch==* ]] && dir="$(python_torch "$venv/bin/python")" && [[ -n "$dir" ]] &&
     [[ "$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null)" == "${spec#torch==}" ]]; then
    echo "$spec" > "$marker" 2>/dev/null || true
    echo "$dir"
    return 0
  fi
  command -v python3 >/dev/null 2>&1 || { say "no python3 to make $venv with"; return 1; }
  mkdir -p "$(dirname "$venv")" 2>/dev/null && [[ -w "$(dirname "$venv")" ]] ||
    { say "cannot write $(dirname "$venv") for pip's torch (MULTIGPU_VENV_DIR or MULTIGPU_CACHE_DIR name another folder)"; return 1; }
  lock="$(dirname "$venv")/.lock-$(basename "$venv")"
  (
    flock 9
    # Another clone may have made it while this one waited.
    if [[ -f "$marker" && "$(cat "$marker")" == "$spec" ]] && python_torch "$venv/bin/python" >/dev/null; then exit 0; fi
    say "making the virtual environment $venv with pip's $spec (once; a CUDA build is several GB)"
    rm -rf "$venv"
    python3 -m venv "$venv" >&2 || { say "python3 -m venv failed (on Debian: apt-get install python3-venv)"; exit 1; }
    # shellcheck disable=SC2086  # the spec may carry pip options
    "$venv/bin/pip" install --disable-pip-version-check -q $spec >&2 || { say "pip install $spec failed"; exit 1; }
    echo "$spec" > "$marker"  # last: without it the environment counts as half-made
  ) 9>"$lock" || return 1
  python_torch "$venv/bin/python"
}

debian_torch() {
  local dir=/usr/lib/x86_64-linux-gnu/cmake/Torch
  if [[ ! -f "$dir/TorchConfig.cmake" ]]; then
    command -v apt-get >/dev/null 2>&1 || { say "no apt-get here to install Debian's libtorch-dev"; return 1; }
    local sudo=()
    [[ "$(id -u)" != 0 ]] && sudo=(sudo)
    say "installing Debian's libtorch-dev (LibTorch 1.13, CPU)"
    "${sudo[@]}" apt-get update -qq >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libtorch-dev >/dev/null
  fi
  dir="$(dpkg -L libtorch-dev 2>/dev/null | grep '/TorchConfig.cmake$' | head -n1)"
  [[ -n "$dir" ]] && dirname "$dir"
}

dir=""
how=""
case "$choice" in
  auto)
    if [[ -n "${Torch_DIR:-}" ]]; then
      dir="$(torch_cmake_dir "$Torch_DIR")" ||
        fail "Torch_DIR is '$Torch_DIR', which holds no TorchConfig.cmake; it must be the folder with that file" \
             "(<libtorch>/share/cmake/Torch), or unset"
      how="Torch_DIR"
    else
      IFS=: read -r -a prefixes <<<"${CMAKE_PREFIX_PATH:-}"
      for prefix in "${prefixes[@]}"; do
        if [[ -n "$prefix" ]] && dir="$(torch_cmake_dir "$prefix")"; then
          how="CMAKE_PREFIX_PATH"
          break
        fi
        dir=""
      done
    fi
    if [[ -z "$dir" ]] && command -v python3 >/dev/null 2>&1 && dir="$(python_torch python3)" && [[ -n "$dir" ]]; then
      how="the torch of $(command -v python3)"
    fi
    if [[ -z "$dir" ]]; then
      kind=cpu
      if have_driver; then
        why="$(why_not_cuda)"
        if [[ -z "$why" ]]; then
          kind=cuda
        else
          say "warning: this machine has an NVIDIA driver, but $why: using pip's CPU torch." \
              "Mend that and run again with MULTIGPU_TORCH=cuda, or point Torch_DIR at a LibTorch for your CUDA"
        fi
      fi
      if dir="$(venv_torch "$kind")"; then
        how="the project's virtual environment $(venv_path "$kind")"
      else
        say "no pip torch could be installed; falling back to Debian's LibTorch 1.13 (CPU only)"
        dir="$(debian_torch)" || fail "no LibTorch found or installable: point Torch_DIR at one"
        how="Debian's libtorch-dev"
      fi
    fi
    ;;
  cpu | cuda)
    dir="$(venv_torch "$choice")" || fail "MULTIGPU_TORCH=$choice: could not install pip's torch into $(venv_path "$choice")"
    how="the project's virtual environment $(venv_path "$choice")"
    ;;
  python)
    dir="$(python_torch python3)" && [[ -n "$dir" ]] || fail "MULTIGPU_TORCH=python, but python3 ($(command -v python3 || echo none)) cannot import torch"
    how="the torch of $(command -v python3)"
    ;;
  debian)
    dir="$(debian_torch)" || fail "MULTIGPU_TORCH=debian: Debian's libtorch-dev could not be installed"
    how="Debian's libtorch-dev"
    ;;
  *)
    dir="$(torch_cmake_dir "$choice")" ||
      fail "MULTIGPU_TORCH is '$choice': no TorchConfig.cmake there or in its share/cmake/Torch." \
           "Valid: auto, cpu, cuda, python, debian, or a LibTorch folder"
    how="MULTIGPU_TORCH"
    ;;
esac

version="$(torch_version "$dir")"
flavour="$(torch_flavour "$dir")"
say "LibTorch ${version:-(unknown version)} ($flavour) from $how: $dir"
if [[ "$flavour" == CPU ]] && have_driver; then
  say "warning: this machine has an NVIDIA driver, but that LibTorch is CPU-only: nothing will run on the GPUs." \
      "MULTIGPU_TORCH=cuda uses pip's CUDA torch instead"
fi
echo "$dir"
