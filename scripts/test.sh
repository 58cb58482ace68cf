#!/usr/bin/env bash
# README command 2: installs what is missing, builds everything and runs the
# whole test suite with ctest, in stages:
#   main       the normal build (build/): every test, examples, consumers
#   asan       the unit tests again under AddressSanitizer + UndefinedBehaviorSanitizer (build-asan/)
#   tsan       the unit tests again under ThreadSanitizer (build-tsan/)
#   fuzz       the device-spec parsers under libFuzzer for MULTIGPU_FUZZ_SECONDS (build-fuzz/, clang)
# MULTIGPU_TEST_STAGES picks stages ("main asan tsan fuzz" by default).
# Arguments go to ctest; with arguments only the main stage runs, unless
# MULTIGPU_TEST_STAGES says otherwise (scripts/test.sh -R device).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"

if [[ $# -gt 0 ]]; then
  stages="${MULTIGPU_TEST_STAGES:-main}"
else
  stages="${MULTIGPU_TEST_STAGES:-main asan tsan fuzz}"
fi
jobs="$(nproc)"
# Tests that build other projects, train the example or time things: main stage only.
not_unit="consumer|example|benchmark|compile|fuzz"

stage() { echo; echo "=== multigpu tests: $1"; }

for name in $stages; do
  case "$name" in
    main)
      stage "main build"
      build="$("$root/scripts/configure.sh")"
      cmake --build "$build" --parallel
      ctest --test-dir "$build" --output-on-failure --parallel "$jobs" "$@"
      ;;
    asan)
      stage "AddressSanitizer + UndefinedBehaviorSanitizer"
      build="$(MULTIGPU_BUILD_DIR="$root/build-asan" MULTIGPU_BUILD_TYPE=RelWithDebInfo "$root/scripts/configure.sh" \
        -DMULTIGPU_SANITIZE=address,undefined -DMULTIGPU_BUILD_EXAMPLES=OFF -DMULTIGPU_BUILD_BENCHMARKS=OFF)"
      cmake --build "$build" --parallel
      ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:strict_string_checks=1" \
      UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
        ctest --test-dir "$build" --output-on-failure --parallel "$jobs" -LE "$not_unit" "$@"
      ;;
    tsan)
      stage "ThreadSanitizer"
      build="$(MULTIGPU_BUILD_DIR="$root/build-tsan" MULTIGPU_BUILD_TYPE=RelWithDebInfo "$root/scripts/configure.sh" \
        -DMULTIGPU_SANITIZE=thread -DMULTIGPU_BUILD_EXAMPLES=OFF -DMULTIGPU_BUILD_BENCHMARKS=OFF)"
      cmake --build "$build" --parallel
      TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:suppressions=$root/tests/sanitizers/tsan.supp" \
        ctest --test-dir "$build" --output-on-failure --parallel "$jobs" -LE "$not_unit" "$@"
      ;;
    fuzz)
      stage "libFuzzer"
      build="$(MULTIGPU_BUILD_DIR="$root/build-fuzz" MULTIGPU_BUILD_TYPE=RelWithDebInfo CXX=clang++ \
        "$root/scripts/configure.sh" -DMULTIGPU_BUILD_FUZZERS=ON -DMULTIGPU_BUILD_EXAMPLES=OFF \
        -DMULTIGPU_BUILD_BENCHMARKS=OFF -DMULTIGPU_FUZZ_SECONDS="${MULTIGPU_FUZZ_SECONDS:-60}")"
      cmake --build "$build" --parallel --target fuzz_device_specs
      ctest --test-dir "$build" --output-on-failure -L fuzz
      ;;
    *)
      echo "scripts/test.sh: unknown stage '$name' in MULTIGPU_TEST_STAGES; valid: main asan tsan fuzz" >&2
      exit 2
      ;;
  esac
done
