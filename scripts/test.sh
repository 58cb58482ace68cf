#!/usr/bin/env bash
# README command 2: installs what is missing, builds everything and runs the
# whole test suite with ctest, in stages:
#   main    the LibTorch scripts/find-torch.sh chooses (CI: pip's torch 2.13, CPU),
#           every test, the examples, the consumers (build/)
#   compat  Debian's LibTorch 1.13 (CPU), C++17: the unit tests (build-compat/)
#   cuda    pip's CUDA torch 2.14.1 with CUDA and NCCL compiled in, through
#           scripts/gpu-check.sh: every target, the device report, the unit
#           tests and the CUDA suite; without a GPU the CUDA tests report
#           themselves skipped, with the reason, and the GPU parts are skipped (build-cuda/)
#   asan    the unit tests under AddressSanitizer + UndefinedBehaviorSanitizer (build-asan/)
#   tsan    the unit tests under ThreadSanitizer (build-tsan/)
#   fuzz    the device-spec parsers under libFuzzer for MULTIGPU_FUZZ_SECONDS (build-fuzz/, clang)
# asan, tsan and fuzz use the main stage's LibTorch.
# pip's torch and ccache's compiler cache live outside the clone, in
# ~/.cache/multigpu (scripts/find-torch.sh, scripts/configure.sh): a second
# run, or a fresh clone on the same machine, installs nothing and compiles
# only what changed; the end says how many compilations the cache answered.
# MULTIGPU_TEST_STAGES picks stages ("main compat cuda asan tsan fuzz" by default).
# Arguments go to ctest; with arguments only the main stage runs, unless
# MULTIGPU_TEST_STAGES says otherwise (scripts/test.sh -R device).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"

if [[ $# -gt 0 ]]; then
  stages="${MULTIGPU_TEST_STAGES:-main}"
else
  stages="${MULTIGPU_TEST_STAGES:-main compat cuda asan tsan fuzz}"
fi
for name in $stages; do
  case "$name" in
    main | compat | cuda | asan | tsan | fuzz) ;;
    *)
      echo "scripts/test.sh: unknown stage '$name' in MULTIGPU_TEST_STAGES; valid: main compat cuda asan tsan fuzz" >&2
      exit 2
      ;;
  esac
done
jobs="$(nproc)"
# Tests that build other projects, train the example or time things: main stage only.
not_unit="consumer|example|benchmark|compile|fuzz"
# The unit tests' programs (the compat and sanitizer stages). The header check
# (every header compiles on its own, ~38 compilations of LibTorch's headers)
# runs in the main and cuda stages only: the compat stage's unit tests
# compile every header in C++17 against 1.13 all the same.
unit_targets=(--target multigpu_tests distributed_worker nvml_loader_test)
# Build flags where the code is only checked, not timed: -O0 compiles the
# test programs three to five times faster than -O2 (measured: one test file
# under AddressSanitizer, 43 s against 222 s); -g1 keeps the line tables that
# a sanitizer's stack traces need. NDEBUG as in the main stage.
checked_build=(-DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O0 -g1 -DNDEBUG")

timings=()
stage_start=0
stage() {
  echo
  echo "=== multigpu tests: $1"
  stage_start=$SECONDS
}
stage_done() {
  local line
  line="$(printf '%-8s %4d s' "$1" $((SECONDS - stage_start)))"
  timings+=("$line")
  echo "=== multigpu tests: $1 passed in $((SECONDS - stage_start)) s"
}

# Compilations the compiler cache answered and missed so far (0 0 without ccache).
ccache_counts() {
  if [[ "${MULTIGPU_CCACHE:-1}" != 0 ]] && command -v ccache >/dev/null 2>&1; then
    CCACHE_DIR="${MULTIGPU_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/multigpu}/ccache" ccache --print-stats 2>/dev/null |
      awk '$1 ~ /^(direct|preprocessed)_cache_hit$/ {hit += $2} $1 == "cache_miss" {miss += $2}
           END {print hit + 0, miss + 0}'
  else
    echo 0 0
  fi
}
read -r hits_before misses_before < <(ccache_counts)

started=$SECONDS
for name in $stages; do
  case "$name" in
    main)
      stage "main build"
      build="$("$root/scripts/configure.sh")"
      cmake --build "$build" --parallel
      ctest --test-dir "$build" --output-on-failure --parallel "$jobs" "$@"
      ;;
    compat)
      stage "compatibility: Debian's LibTorch 1.13, C++17"
      build="$(MULTIGPU_TORCH=debian MULTIGPU_BUILD_DIR="$root/build-compat" MULTIGPU_BUILD_TYPE=RelWithDebInfo \
        "$root/scripts/configure.sh" "${checked_build[@]}" \
        -DCMAKE_CXX_STANDARD=17 -DMULTIGPU_BUILD_EXAMPLES=OFF -DMULTIGPU_BUILD_BENCHMARKS=OFF \
        -DMULTIGPU_BUILD_TOOLS=OFF)"
      cmake --build "$build" --parallel "${unit_targets[@]}"
      ctest --test-dir "$build" --output-on-failure --parallel "$jobs" -LE "$not_unit|headers" "$@"
      ;;
    cuda)
      stage "CUDA: pip's CUDA LibTorch, CUDA and NCCL compiled in, through scripts/gpu-check.sh"
      # The GPU check as a GPU machine runs it, so that it cannot rot: it
      # configures and builds every target, prints the device report, runs
      # the unit tests and the CUDA suite (each case says why it skipped),
      # and names the GPU parts it skipped. Its logs go beside the build.
      MULTIGPU_TORCH=cuda MULTIGPU_BUILD_DIR="$root/build-cuda" \
      MULTIGPU_GPU_CHECK_RESULTS="${MULTIGPU_GPU_CHECK_RESULTS:-$root/build-cuda/gpu-check}" \
        "$root/scripts/gpu-check.sh" -- -LE "$not_unit" "$@"
      ;;
    asan)
      stage "AddressSanitizer + UndefinedBehaviorSanitizer"
      build="$(MULTIGPU_BUILD_DIR="$root/build-asan" MULTIGPU_BUILD_TYPE=RelWithDebInfo "$root/scripts/configure.sh" \
        "${checked_build[@]}" \
        -DMULTIGPU_SANITIZE=address,undefined -DMULTIGPU_BUILD_EXAMPLES=OFF -DMULTIGPU_BUILD_BENCHMARKS=OFF)"
      cmake --build "$build" --parallel "${unit_targets[@]}" multigpu-run
      ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:strict_string_checks=1" \
      UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
        ctest --test-dir "$build" --output-on-failure --parallel "$jobs" -LE "$not_unit|headers" "$@"
      ;;
    tsan)
      stage "ThreadSanitizer"
      build="$(MULTIGPU_BUILD_DIR="$root/build-tsan" MULTIGPU_BUILD_TYPE=RelWithDebInfo "$root/scripts/configure.sh" \
        "${checked_build[@]}" \
        -DMULTIGPU_SANITIZE=thread -DMULTIGPU_BUILD_EXAMPLES=OFF -DMULTIGPU_BUILD_BENCHMARKS=OFF)"
      cmake --build "$build" --parallel "${unit_targets[@]}" multigpu-run
      # OMP_NUM_THREADS=1: pip's LibTorch runs its intra-op work on OpenMP
      # threads whose barriers (libgomp, not instrumented) TSan cannot see, so
      # it reports races inside LibTorch's kernels. Our own threads stay checked.
      OMP_NUM_THREADS=1 \
      TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:suppressions=$root/tests/sanitizers/tsan.supp" \
        ctest --test-dir "$build" --output-on-failure --parallel "$jobs" -LE "$not_unit|headers" "$@"
      ;;
    fuzz)
      stage "libFuzzer"
      build="$(MULTIGPU_BUILD_DIR="$root/build-fuzz" MULTIGPU_BUILD_TYPE=RelWithDebInfo CXX=clang++ \
        "$root/scripts/configure.sh" -DMULTIGPU_BUILD_FUZZERS=ON -DMULTIGPU_BUILD_EXAMPLES=OFF \
        -DMULTIGPU_BUILD_BENCHMARKS=OFF -DMULTIGPU_BUILD_TOOLS=OFF -DMULTIGPU_BUILD_TESTS=ON \
        -DMULTIGPU_FUZZ_SECONDS="${MULTIGPU_FUZZ_SECONDS:-60}")"
      cmake --build "$build" --parallel --target fuzz_device_specs
      ctest --test-dir "$build" --output-on-failure -L fuzz
      ;;
  esac
  stage_done "$name"
done

echo
echo "=== multigpu tests: every stage passed in $((SECONDS - started)) s"
printf '    %s\n' "${timings[@]}"
read -r hits_after misses_after < <(ccache_counts)
echo "    ccache: $((hits_after - hits_before)) compilations from the cache, $((misses_after - misses_before)) compiled" \
     "(counted in the cache folder, with any other build using it meanwhile)"
