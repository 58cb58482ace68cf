#!/usr/bin/env bash
# The GPU proof in one command: on a machine with an NVIDIA GPU and a Python
# torch with CUDA, configures multigpu against that torch's LibTorch with CUDA
# and NCCL compiled in, builds everything, and runs the device report, the
# whole ctest suite, the CUDA test suite (each case with its duration),
# multigpu-run on the GPU (tests/tools/multigpu_run_gpu_check.sh), the
# GPU benchmarks with the Python anchors (benchmarks/python/run.sh), and the
# CUDA suite under compute-sanitizer's racecheck and synccheck, writing every
# log and result to benchmarks/results/<gpu>-<date>/, within 20 minutes.
# Without a GPU it runs all but the GPU parts, says which it skipped and why,
# and writes to a temporary folder; CI runs it that way (scripts/test.sh's
# cuda stage). It ends with a table: part, status, seconds.
#
#   scripts/gpu-check.sh                       # every part
#   scripts/gpu-check.sh build report ctest    # some parts, in the usual order
#   scripts/gpu-check.sh -- -R device          # arguments after -- go to ctest
#
# Parts, in this order: build, report, ctest, cuda, scheduler, bench, racecheck,
# synccheck ("sanitizers": both). A part that fails does not stop the others;
# the exit status is 1 if any failed. Without a GPU the sanitizers are
# skipped and the benchmarks run --quick on the CPU (no figures).
#
# Environment:
#   MULTIGPU_TORCH          which LibTorch (scripts/find-torch.sh); default python,
#                           the torch of python3
#   MULTIGPU_BUILD_DIR      the build folder (default build-gpu/); an existing one is
#                           reconfigured and brought up to date, not rebuilt
#   MULTIGPU_GPU_CHECK_RESULTS  where results go (default: benchmarks/results/<gpu>-<date>
#                           with a GPU, a new temporary folder without); reused if it exists
#   MULTIGPU_GPU_CHECK_BUDGET   seconds for the whole run with a GPU (default 1200);
#                           each part also has its own limit, cut to what is left
#   MULTIGPU_GPU_CHECK_GPU=no   run as if there were no GPU
#   MULTIGPU_GPU_CHECK_CMAKE_ARGS, MULTIGPU_GPU_CHECK_BENCH_ARGS: more arguments for
#                           cmake and for the benchmark (split on spaces)
#   MULTIGPU_GPU_CHECK_ARCHIVE  also pack the results folder into this .tar.gz
#
# The header-only dependencies (fmt, doctest, CLI11, nlohmann-json, Gloo's
# headers) come from the system or, on a machine with no package registry,
# from third_party/vendored/ (made by scripts/vendor-deps.sh elsewhere and
# carried along). Where one command may last only 10 minutes, run it in two
# on the same machine (the build folder and the results folder stay), e.g.
#   MULTIGPU_GPU_CHECK_BUDGET=570 scripts/gpu-check.sh build report ctest cuda
#   MULTIGPU_GPU_CHECK_BUDGET=570 scripts/gpu-check.sh scheduler bench sanitizers
set -uo pipefail  # not -e: every part runs, and each one's status is recorded
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
self="$root/scripts/gpu-check.sh"
all_parts=(build report ctest cuda scheduler bench racecheck synccheck)

say() { echo "gpu-check: $*" >&2; }

# The status of the part being run, for the summary: "ok", "ok (note)",
# "skipped: reason" or "failed: reason". Unset, it follows the exit status.
set_status() { printf '%s\n' "$*" >"$_gc_state/status"; }

# --- the parts (each run by this script again, under `timeout`) ---------------

part_build() {
  local cmake_args=(-DMULTIGPU_ENABLE_CUDA=ON -DMULTIGPU_ENABLE_NCCL=ON) extra=()
  read -r -a extra <<<"${MULTIGPU_GPU_CHECK_CMAKE_ARGS:-}"
  cmake_args+=("${extra[@]}")
  MULTIGPU_BUILD_DIR="$_gc_build" "$root/scripts/configure.sh" "${cmake_args[@]}" >/dev/null || {
    set_status "failed: scripts/configure.sh (MULTIGPU_TORCH=$MULTIGPU_TORCH) failed"
    return 1
  }
  cmake --build "$_gc_build" --parallel "$(nproc)" || { set_status "failed: the build failed"; return 1; }
  grep -E '^(Torch_DIR|CMAKE_BUILD_TYPE|MULTIGPU_[A-Z_]+):' "$_gc_build/CMakeCache.txt" >"$_gc_results/cmake-cache.txt" || true
}

part_report() {
  local versions="$_gc_results/versions.txt" status=0
  {
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "multigpu: $(git -C "$root" rev-parse HEAD 2>/dev/null || echo '(not a git checkout)')" \
         "($(git -C "$root" status --porcelain 2>/dev/null | wc -l) files changed or new)"
    echo "host: $(uname -srm), $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo) memory"
    echo "os: $(sed -n 's/^PRETTY_NAME=//p' /etc/os-release 2>/dev/null | tr -d '"')"
    echo "compiler: $(c++ --version 2>/dev/null | head -n1)"
    echo "cmake: $(cmake --version | head -n1)"
    echo "ninja: $(ninja --version 2>/dev/null || echo none)"
    echo "nvcc: $(nvcc --version 2>/dev/null | tail -n1 || echo none)"
    echo "compute-sanitizer: $(sanitizer_path || echo none)"
    echo "LibTorch: $(sed -n 's/^Torch_DIR:[A-Z]*=//p' "$_gc_build/CMakeCache.txt" 2>/dev/null)"
    if [[ -n "$_gc_python" ]]; then
      echo "python torch ($_gc_python): $("$_gc_python" -c 'import torch
cuda = torch.version.cuda
nccl = ".".join(map(str, torch.cuda.nccl.version())) if cuda else None
print(torch.__version__, "CUDA", cuda, "cuDNN", torch.backends.cudnn.version(), "NCCL", nccl,
      "GPU available:", torch.cuda.is_available())' 2>&1 | tail -n1)"
    fi
    if command -v nvidia-smi >/dev/null 2>&1; then
      echo "nvidia-smi: $(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1 | head -n4 | paste -sd ';')"
    else
      echo "nvidia-smi: none"
    fi
  } >"$versions"
  cat "$versions"
  if [[ -z "$_gc_no_gpu" ]]; then
    nvidia-smi -q >"$_gc_results/nvidia-smi-q.txt" 2>&1 || status=1
    nvidia-smi >"$_gc_results/nvidia-smi.txt" 2>&1 || status=1
  fi
  echo
  local report="$_gc_build/examples/device_report" code
  if [[ ! -x "$report" ]]; then
    set_status "failed: $report is missing (run the build part)"
    return 1
  fi
  "$report" 2>&1 | tee "$_gc_results/device-report.txt"
  code=${PIPESTATUS[0]}
  if [[ -n "$_gc_no_gpu" ]]; then
    # No GPU here: it says why, and exits 1.
    [[ $code -le 1 ]] || { set_status "failed: device_report crashed (exit $code)"; return 1; }
    set_status "ok (no GPU: device_report says why, exit $code)"
  elif [[ $code -ne 0 ]]; then
    set_status "failed: device_report found no usable GPU (exit $code)"
    return 1
  fi
  return $status
}

part_ctest() {
  local filter=("$@") note=""
  if [[ ${#filter[@]} -eq 0 && -z "$_gc_no_gpu" ]]; then
    # The CUDA cases share the one GPU, and some time it or measure its
    # memory: the next part runs them in one process, one after another.
    filter=(-E '^CUDA: ')
    note=" (without the CUDA cases: the cuda part runs them)"
  fi
  ctest --test-dir "$_gc_build" --output-on-failure --parallel "$(nproc)" \
    --output-junit "$_gc_results/ctest-junit.xml" "${filter[@]}" || { set_status "failed: some tests failed$note"; return 1; }
  set_status "ok$note"
}

part_cuda() {
  local tests="$_gc_build/tests/multigpu_tests" code skipped
  [[ -x "$tests" ]] || { set_status "failed: $tests is missing (run the build part)"; return 1; }
  echo "The CUDA test suite, each case with its duration$([[ -n "$_gc_no_gpu" ]] && echo ', and why each was skipped'):"
  "$tests" --test-suite=CUDA --duration=true 2>&1 | tee "$_gc_results/cuda-tests.txt"
  code=${PIPESTATUS[0]}
  [[ $code -eq 0 ]] || { set_status "failed: multigpu_tests --test-suite=CUDA exited $code"; return 1; }
  skipped="$(grep -c 'multigpu test skipped: ' "$_gc_results/cuda-tests.txt" || true)"
  if [[ "$skipped" -gt 0 ]]; then
    set_status "ok ($skipped cases skipped themselves, with the reason)"
  fi
}

# multigpu-run on the GPU: per-task peak memory from NVML, packing by memory,
# a GPU promised across runs, an out-of-memory retry
# (tests/tools/multigpu_run_gpu_check.sh; its tasks allocate with torch).
part_scheduler() {
  local tool="$_gc_build/tools/multigpu-run"
  [[ -z "$_gc_no_gpu" ]] || { set_status "skipped: no GPU ($_gc_no_gpu)"; return 0; }
  [[ -x "$tool" ]] || { set_status "failed: $tool is missing (run the build part)"; return 1; }
  [[ -n "$_gc_python" ]] || { set_status "skipped: no python with torch for its tasks"; return 0; }
  PATH="$(dirname "$_gc_python"):$PATH" bash "$root/tests/tools/multigpu_run_gpu_check.sh" "$tool" \
    "$_gc_build/multigpu_run_gpu_check" 2>&1 | tee "$_gc_results/scheduler.txt"
  [[ ${PIPESTATUS[0]} -eq 0 ]] || { set_status "failed: see scheduler.txt"; return 1; }
}

# compute-sanitizer: on the PATH, or in the CUDA toolkit.
sanitizer_path() {
  local candidate
  for candidate in "$(command -v compute-sanitizer 2>/dev/null)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
                   /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [[ -n "$candidate" && -x "$candidate" ]] && { echo "$candidate"; return 0; }
  done
  return 1
}

part_sanitizer() {
  local tool="$1" sanitizer tests="$_gc_build/tests/multigpu_tests"
  [[ -z "$_gc_no_gpu" ]] || { set_status "skipped: no GPU ($_gc_no_gpu)"; return 0; }
  sanitizer="$(sanitizer_path)" || { set_status "skipped: compute-sanitizer not found (PATH, CUDA_HOME)"; return 0; }
  [[ -x "$tests" ]] || { set_status "failed: $tests is missing (run the build part)"; return 1; }
  echo "$sanitizer --tool $tool over the CUDA test suite"
  "$sanitizer" --tool "$tool" --error-exitcode 1 "$tests" --test-suite=CUDA --duration=true 2>&1 |
    tee "$_gc_results/$tool.txt"
  [[ ${PIPESTATUS[0]} -eq 0 ]] || { set_status "failed: $tool reported errors, or a test failed under it"; return 1; }
}

# The GPU benchmark table: benchmarks/python/run.sh runs the C++ bench (plain
# LibTorch vs DataParallel with 1 and 2 replicas on the GPU, LibTorch's
# data_parallel, all-reduce and copy bandwidth), then the same models through
# PyTorch (eager, nn.DataParallel, DDP) and joins them as ratios. Without it,
# the bench alone.
part_bench() {
  local bench="$_gc_build/benchmarks/bench" anchors="$root/benchmarks/python/run.sh" extra=() quick=0 out
  [[ -x "$bench" ]] || { set_status "failed: $bench is missing (run the build part)"; return 1; }
  read -r -a extra <<<"${MULTIGPU_GPU_CHECK_BENCH_ARGS:-}"
  out="$_gc_results"
  if [[ -n "$_gc_no_gpu" ]]; then
    # No figures without a GPU: the same commands --quick on the CPU keep them
    # working (the CPU measurements are the main stage's business).
    quick=1
    out="$_gc_results/bench-quick"
  fi
  mkdir -p "$out"
  if [[ -f "$anchors" && -n "$_gc_python" ]]; then
    echo "benchmarks/python/run.sh $out (bench $bench, python $_gc_python$([[ $quick == 1 ]] && echo ', --quick'))"
    MULTIGPU_BENCH="$bench" MULTIGPU_PYTHON="$_gc_python" MULTIGPU_BENCH_QUICK="$quick" \
      MULTIGPU_BENCH_ARGS="${MULTIGPU_GPU_CHECK_BENCH_ARGS:-}" bash "$anchors" "$out" ||
      { set_status "failed: benchmarks/python/run.sh failed (see its run.log)"; return 1; }
    if [[ $quick == 1 ]]; then
      set_status "ok (no GPU: bench and Python anchors --quick on the CPU, no figures)"
    else
      set_status "ok (bench, Python anchors, ratios in compare.md)"
    fi
    return 0
  fi
  local why="benchmarks/python/run.sh does not exist"
  [[ -f "$anchors" ]] && why="no python with torch for them"
  local args=(--only "steps,bandwidth" --replicas "1,2" "${extra[@]}")
  [[ $quick == 1 ]] && args+=(--devices cpu --quick)
  echo "bench ${args[*]} (the Python anchors are skipped: $why)"
  "$bench" "${args[@]}" --label bench --output-dir "$out" || { set_status "failed: bench ${args[*]} failed"; return 1; }
  if [[ $quick == 1 ]]; then
    set_status "ok (no GPU: bench --quick on the CPU, no figures; Python anchors skipped: $why)"
  else
    set_status "ok (bench; Python anchors skipped: $why)"
  fi
}

if [[ "${1:-}" == --run-part ]]; then
  part="$2"
  shift 2
  # timeout made a process group for this part: the caller stops it all on Ctrl-C.
  awk '{ print $5 }' /proc/$$/stat >"$_gc_state/pgid" 2>/dev/null || true
  [[ "${1:-}" == -- ]] && shift
  case "$part" in
    build) part_build ;;
    report) part_report ;;
    ctest) part_ctest "$@" ;;
    cuda) part_cuda ;;
    scheduler) part_scheduler ;;
    racecheck | synccheck) part_sanitizer "$part" ;;
    bench) part_bench ;;
  esac
  exit
fi

# --- arguments -------------------------------------------------------------------

selected=()
ctest_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --) shift; ctest_args=("$@"); break ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    sanitizers) selected+=(racecheck synccheck) ;;
    build | report | ctest | cuda | scheduler | bench | racecheck | synccheck) selected+=("$1") ;;
    *) say "unknown part '$1'; valid: ${all_parts[*]} (sanitizers: racecheck and synccheck), then -- and ctest's arguments"; exit 2 ;;
  esac
  shift
done
parts=()
for part in "${all_parts[@]}"; do
  if [[ ${#selected[@]} -eq 0 ]] || [[ " ${selected[*]} " == *" $part "* ]]; then
    parts+=("$part")
  fi
done

export MULTIGPU_TORCH="${MULTIGPU_TORCH:-python}"
export _gc_build="${MULTIGPU_BUILD_DIR:-$root/build-gpu}"

# --- is there a GPU? -------------------------------------------------------------

# The python whose torch goes with the LibTorch chosen (for versions and
# torch.cuda.is_available()), if any.
case "$MULTIGPU_TORCH" in
  cpu | cuda)
    # Where scripts/find-torch.sh keeps that environment: the clone's own
    # .venv/ where one is there, else the per-user cache folder.
    _gc_python="${MULTIGPU_VENV_DIR:-${MULTIGPU_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/multigpu}/venv}/torch-$MULTIGPU_TORCH/bin/python"
    if [[ -z "${MULTIGPU_VENV_DIR:-}" && -x "$root/.venv/torch-$MULTIGPU_TORCH/bin/python" ]]; then
      _gc_python="$root/.venv/torch-$MULTIGPU_TORCH/bin/python"
    fi
    ;;
  *) _gc_python="$(command -v python3 || true)" ;;
esac
if [[ -z "$_gc_python" ]] || ! "$_gc_python" -c 'import torch' >/dev/null 2>&1; then
  _gc_python=""
fi
export _gc_python

_gc_no_gpu=""  # why the GPU parts cannot run; empty when they can
if [[ "${MULTIGPU_GPU_CHECK_GPU:-auto}" == no ]]; then
  _gc_no_gpu="MULTIGPU_GPU_CHECK_GPU=no"
elif ! command -v nvidia-smi >/dev/null 2>&1; then
  _gc_no_gpu="nvidia-smi is not installed: no NVIDIA driver here"
elif ! gpus="$(nvidia-smi -L 2>&1)" || [[ "$gpus" != *GPU* ]]; then
  _gc_no_gpu="nvidia-smi lists no GPU ($(echo "$gpus" | head -n1))"
elif [[ -n "$_gc_python" ]] && ! "$_gc_python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
  _gc_no_gpu="torch.cuda.is_available() is False in $_gc_python ($("$_gc_python" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)' 2>&1 | tail -n1))"
fi
export _gc_no_gpu

_gc_slug="no-gpu"
if [[ -z "$_gc_no_gpu" ]]; then
  _gc_slug="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1 | tr '[:upper:]' '[:lower:]' |
              sed 's/[^a-z0-9]\{1,\}/-/g; s/^-//; s/-$//')"
fi
export _gc_slug

if [[ -n "${MULTIGPU_GPU_CHECK_RESULTS:-}" ]]; then
  _gc_results="$MULTIGPU_GPU_CHECK_RESULTS"
elif [[ -z "$_gc_no_gpu" ]]; then
  _gc_results="$root/benchmarks/results/$_gc_slug-$(date -u +%Y%m%d)"
else
  _gc_results="$(mktemp -d "${TMPDIR:-/tmp}/multigpu-gpu-check.XXXXXX")"
fi
mkdir -p "$_gc_results" || { say "cannot create the results folder $_gc_results"; exit 1; }
_gc_results="$(cd "$_gc_results" && pwd)"
export _gc_results
_gc_state="$(mktemp -d)"  # the running part's status, process group and exit code
export _gc_state
trap 'rm -rf "$_gc_state"' EXIT
# Ctrl-C or a TERM stops the running part (its process group), then this script.
# shellcheck disable=SC2317  # called by the trap
on_signal() {
  local pgid
  pgid="$(cat "$_gc_state/pgid" 2>/dev/null)"
  [[ -n "$pgid" ]] && kill -TERM -- "-$pgid" 2>/dev/null
  say "interrupted during the $part part"
  exit 130
}
trap on_signal INT TERM

# --- time limits -----------------------------------------------------------------

# Seconds per part with a GPU (16 cores: the build takes a few minutes). The
# budget caps them all. Without a GPU only the parts that use one would be
# limited, and they are skipped: CI's machines (2 cores) need far longer to
# build, and ctest limits each test itself.
declare -A limit=([build]=600 [report]=90 [ctest]=420 [cuda]=240 [scheduler]=120 [bench]=420 [racecheck]=180
                  [synccheck]=180)
budget=0
if [[ -z "$_gc_no_gpu" ]]; then
  budget="${MULTIGPU_GPU_CHECK_BUDGET:-1200}"
fi
[[ "$budget" =~ ^[0-9]+$ ]] || { say "MULTIGPU_GPU_CHECK_BUDGET='$budget' is not a number of seconds"; exit 2; }

if [[ -n "$_gc_no_gpu" ]]; then
  say "no GPU: $_gc_no_gpu."
  say "running all but the GPU parts (compute-sanitizer; the benchmarks only --quick on the CPU) with MULTIGPU_TORCH=$MULTIGPU_TORCH"
else
  say "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n1)," \
      "LibTorch from MULTIGPU_TORCH=$MULTIGPU_TORCH, ${budget} s in all"
fi
say "build folder: $_gc_build; results: $_gc_results"

# --- run ---------------------------------------------------------------------------

started=$SECONDS
summary=()
failed=0
for part in "${parts[@]}"; do
  seconds_left=$((started + budget - SECONDS))
  part_limit="${limit[$part]}"
  if [[ "$budget" -gt 0 ]]; then
    if [[ $seconds_left -lt 20 ]]; then
      summary+=("$part|skipped: the ${budget}-s budget was spent|0")
      continue
    fi
    [[ $part_limit -gt $seconds_left ]] && part_limit=$seconds_left
  elif [[ "$part" == build || "$part" == ctest ]]; then
    part_limit=0  # no limit: see above
  fi
  echo
  echo "=== gpu-check: $part$([[ $part_limit -gt 0 ]] && echo " (at most $part_limit s)")"
  rm -f "$_gc_state"/{status,pgid,code}
  : >"$_gc_state/status"
  part_start=$SECONDS
  # In the background, so that a signal reaches on_signal at once.
  {
    timeout --kill-after=20 "$part_limit" "$self" --run-part "$part" -- "${ctest_args[@]}"
    echo $? 2>/dev/null >"$_gc_state/code"  # quiet if interrupted: the folder is gone
  } 2>&1 | tee "$_gc_results/$part.log" &
  wait $!
  code="$(cat "$_gc_state/code" 2>/dev/null || echo 1)"
  status="$(cat "$_gc_state/status")"
  if [[ $code -eq 124 || $code -eq 137 ]]; then
    status="failed: stopped at its limit of $part_limit s"
  elif [[ -z "$status" ]]; then
    if [[ $code -eq 0 ]]; then status=ok; else status="failed (exit $code)"; fi
  elif [[ $code -ne 0 && "$status" != failed* ]]; then
    status="failed (exit $code): $status"
  fi
  [[ "$status" == failed* ]] && failed=1
  [[ -s "$_gc_results/$part.log" ]] || rm -f "$_gc_results/$part.log"
  summary+=("$part|$status|$((SECONDS - part_start))")
done

# --- summary -----------------------------------------------------------------------

{
  echo
  echo "## gpu-check $(date -u '+%Y-%m-%d %H:%M UTC'): $([[ -z "$_gc_no_gpu" ]] && echo "$_gc_slug" || echo "no GPU ($_gc_no_gpu)")"
  echo
  echo "| part | status | seconds |"
  echo "| --- | --- | ---: |"
  for line in "${summary[@]}"; do
    IFS='|' read -r part status seconds <<<"$line"
    echo "| $part | $status | $seconds |"
  done
  echo "| total | $([[ $failed -eq 0 ]] && echo ok || echo failed) | $((SECONDS - started)) |"
} >>"$_gc_results/summary.md"

echo
echo "=== gpu-check summary ($([[ -z "$_gc_no_gpu" ]] && echo "GPU: $_gc_slug" || echo "no GPU: $_gc_no_gpu"))"
printf '%-10s %-70s %7s\n' part status seconds
for line in "${summary[@]}"; do
  IFS='|' read -r part status seconds <<<"$line"
  printf '%-10s %-70s %7s\n' "$part" "$status" "$seconds"
done
printf '%-10s %-70s %7s\n' total "$([[ $failed -eq 0 ]] && echo ok || echo failed)" $((SECONDS - started))
echo "results, logs and this table (summary.md): $_gc_results"
if [[ -n "${MULTIGPU_GPU_CHECK_ARCHIVE:-}" ]]; then
  tar -czf "$MULTIGPU_GPU_CHECK_ARCHIVE" -C "$(dirname "$_gc_results")" "$(basename "$_gc_results")" &&
    echo "packed into $MULTIGPU_GPU_CHECK_ARCHIVE"
fi
exit $failed
