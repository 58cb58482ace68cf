#!/usr/bin/env bash
# Configures the build tree (default: build/ at the top of the repository)
# with multigpu's defaults, against the LibTorch that scripts/find-torch.sh
# chooses (MULTIGPU_TORCH, Torch_DIR, CMAKE_PREFIX_PATH: see there); extra
# arguments go to cmake. Prints the build folder. Used by run-example.sh and
# test.sh.
#
# Compiles through ccache where it is installed (MULTIGPU_CCACHE=0: not),
# with its cache in the per-user cache folder, MULTIGPU_CACHE_DIR (default
# ${XDG_CACHE_HOME:-~/.cache}/multigpu/ccache), so that another build folder
# or another clone compiles unchanged files from the cache (see Note
# [ccache across clones]). A CMAKE_CXX_COMPILER_LAUNCHER of yours (in the
# environment or among the arguments) wins.
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

# Note [ccache across clones]
# CI tests a fresh clone in another folder, and LibTorch's headers make each
# test file a minute of compiling: what makes the second clone's compilations
# cache hits, following ccache's manual ("Compiling in different
# directories", "Precompiled headers"):
#   base_dir  the repository root: ccache rewrites absolute paths under it
#             (sources, -I, -o, the precompiled header's -include) to relative.
#   hash_dir=false  the sanitizer and compatibility stages compile with -g1,
#             and ccache would otherwise hash the build folder's path; the
#             debug information of a hit names the folder it was compiled in.
#   sloppiness pch_defines,time_macros: needed with precompiled headers (ccache
#             cannot see macros or __TIME__ through one). Not
#             include_file_mtime/ctime: the cache is shared by every clone,
#             and ccache's refusal to trust a header saved during the
#             compilation is what keeps an object made from the old text
#             from being served for the new one; a precompiled header that
#             is too new costs a preprocessor-mode lookup, not a miss.
# An absolute path of the clone compiled into a file (a -D or a generated
# header) still makes that file differ from clone to clone: such paths live in
# small files of their own (tests/paths.cpp, bench's generated
# bench_config.cpp; the quickstart example's data folder is the one left).
# The cache is never needed: with it empty or missing, everything is compiled.
launcher=()
if [[ "${MULTIGPU_CCACHE:-1}" != 0 && -z "${CMAKE_CXX_COMPILER_LAUNCHER:-}" ]] && command -v ccache >/dev/null 2>&1; then
  cache_dir="${MULTIGPU_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}/.cache}/multigpu}/ccache"
  if [[ ! -f "$cache_dir/ccache.conf" ]]; then
    # Room for every stage of scripts/test.sh and more than one LibTorch (a
    # precompiled <torch/torch.h> alone is about 0.1 GB there, one per build
    # folder); ccache's default, 5 GB, could evict a stage's results.
    mkdir -p "$cache_dir" 2>/dev/null && CCACHE_DIR="$cache_dir" ccache --max-size 20G >/dev/null 2>&1 || true
  fi
  if [[ ! -w "$cache_dir" ]]; then
    echo "multigpu setup: cannot write the compiler cache $cache_dir; compiling without ccache" >&2
  else
  launcher=("-DCMAKE_CXX_COMPILER_LAUNCHER=env;CCACHE_DIR=$cache_dir;CCACHE_BASEDIR=$root;CCACHE_NOHASHDIR=1;CCACHE_SLOPPINESS=pch_defines,time_macros;$(command -v ccache)")
  echo "multigpu setup: compiling through ccache, cache in $cache_dir (MULTIGPU_CCACHE=0: without)" >&2
  fi
elif [[ -z "${CMAKE_CXX_COMPILER_LAUNCHER:-}" ]]; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=)  # a build folder configured with ccache before: without it now
fi

generator=()
if command -v ninja >/dev/null 2>&1 && [[ ! -f "$build/CMakeCache.txt" ]]; then
  generator=(-G Ninja)
fi
cmake -S "$root" -B "$build" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE="${MULTIGPU_BUILD_TYPE:-Release}" \
  -DMULTIGPU_WARNINGS_AS_ERRORS=ON \
  -DTorch_DIR="$torch_dir" \
  "${launcher[@]}" \
  "$@" >&2
echo "$build"
