#!/usr/bin/env bash
# Runs multigpu's C++ benchmark and the PyTorch anchors on the same models and
# batches, and joins them into a table of ratios (multigpu / PyTorch).
#
# Interface (scripts/gpu-check.sh calls it exactly so):
#
#   MULTIGPU_BENCH=build/benchmarks/bench benchmarks/python/run.sh RESULTS_DIR
#   benchmarks/python/run.sh [RESULTS_DIR [BENCH]]
#
#   RESULTS_DIR     made if missing. Default: benchmarks/results/<machine>-<yyyymmdd>,
#                   <machine> the first GPU's name or cpu-<N>core.
#   BENCH, or MULTIGPU_BENCH
#                   the built bench binary (the argument wins; default build/benchmarks/bench).
#   MULTIGPU_PYTHON a python with torch. Default: python3 if it imports torch,
#                   else the project's virtual environment torch-cuda (where an NVIDIA
#                   driver is) or torch-cpu, in .venv/ or in scripts/find-torch.sh's
#                   cache folder (MULTIGPU_VENV_DIR, default ~/.cache/multigpu/venv).
#   MULTIGPU_BENCH_QUICK=1
#                   a few steps of everything (seconds): checks that it all runs, measures nothing.
#   MULTIGPU_BENCH_ARGS
#                   more arguments for the bench, after run.sh's (e.g. "--replicas 1,2,4").
#   MULTIGPU_BENCH_REPEATS
#                   runs of the bench and then the anchors, one after the other (default: 3 on a
#                   CPU, where other work moves the figures, 1 on a GPU and with MULTIGPU_BENCH_QUICK).
#
# Writes into RESULTS_DIR, for each run i = 1, 2, ...: bench-i.json and
# bench-i.md (the C++ bench: training steps, and in run 1 all-reduce and copy
# bandwidth), anchors-i.json (anchors.py); then compare.md and compare.json
# (compare.py, pooling the runs), run.log (all of the output). Exits non-zero
# when a part fails or the two sides disagree on a model.
#
# What runs: on a GPU (the bench decides; the anchors follow its device), the
# bench's GPU models (mlp, cnn, transformer, resnet18 at batch 256,
# transformer-lm) with 1 and 2 replicas and torch::nn::parallel::data_parallel,
# then eager PyTorch, nn.DataParallel and DDP (NCCL, one process per GPU); a
# few minutes on one H100-class GPU is the aim, 6 at most (not timed on a GPU
# yet). On a CPU, the small models with 1 and 2 replicas, then eager PyTorch
# and DDP with Gloo in 2 processes, 3 runs; every replica, process and
# one-replica run with cores / 2 intra-op threads (OMP_NUM_THREADS, unless
# set); about 2 minutes on 2 cores.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
here="$root/benchmarks/python"

gpu_name=""
if command -v nvidia-smi >/dev/null 2>&1; then
  gpu_name="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1 || true)"
fi
if [[ -n "$gpu_name" ]]; then
  machine="$(echo "$gpu_name" | tr -c 'A-Za-z0-9\n' '-' | tr '[:upper:]' '[:lower:]')"
else
  machine="cpu-$(nproc)core"
fi
results="${1:-$root/benchmarks/results/$machine-$(date -u +%Y%m%d)}"
bench="${2:-${MULTIGPU_BENCH:-$root/build/benchmarks/bench}}"

python="${MULTIGPU_PYTHON:-}"
if [[ -z "$python" ]]; then
  venvs="${MULTIGPU_VENV_DIR:-${MULTIGPU_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/multigpu}/venv}"
  for candidate in python3 "$root/.venv/torch-cuda/bin/python" "$venvs/torch-cuda/bin/python" \
                   "$root/.venv/torch-cpu/bin/python" "$venvs/torch-cpu/bin/python"; do
    [[ "$candidate" == *torch-cuda* && -z "$gpu_name" ]] && continue
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import torch' >/dev/null 2>&1; then
      python="$candidate"
      break
    fi
  done
fi
[[ -x "$bench" ]] || { echo "run.sh: no bench binary at $bench (build the bench target, or set MULTIGPU_BENCH)" >&2; exit 1; }
[[ -n "$python" ]] || { echo "run.sh: no python with torch (python3, .venv/torch-*, $venvs/torch-*); set MULTIGPU_PYTHON" >&2; exit 1; }

mkdir -p "$results"
results="$(cd "$results" && pwd)"
exec > >(tee "$results/run.log") 2>&1
tee_pid=$!

quick=()
[[ "${MULTIGPU_BENCH_QUICK:-0}" == 1 ]] && quick=(--quick)
if [[ -n "$gpu_name" ]]; then
  # The bench's defaults: 5 warm-up steps, 11 rounds of 10 steps.
  settings=(--budget 0.5)
  repeats="${MULTIGPU_BENCH_REPEATS:-1}"
else
  # Fewer steps on a CPU, where one step of the transformer block takes ~0.1 s.
  settings=(--warmup 2 --rounds 4 --steps 5 --budget 0.25)
  repeats="${MULTIGPU_BENCH_REPEATS:-3}"
  # Each of the 2 replicas (and DDP processes) gets half the cores, and so do
  # the one-replica runs: two OpenMP teams as wide as the machine wait on each
  # other, worse when others share it (see docs/performance.md).
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))}"
fi
extra=()
[[ -n "${MULTIGPU_BENCH_ARGS:-}" ]] && read -r -a extra <<<"$MULTIGPU_BENCH_ARGS"

echo "run.sh: bench $bench, python $python ($("$python" -c 'import torch; print("torch", torch.__version__)' 2>/dev/null)), results in $results"
echo "run.sh: GPU: ${gpu_name:-none}, OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}; started $(date -u '+%Y-%m-%d %H:%M:%S UTC'), load average $(cut -d' ' -f1-3 /proc/loadavg)"
start=$SECONDS
status=0

[[ ${#quick[@]} -gt 0 ]] && repeats=1
benches=()
anchors=()
for ((run = 1; run <= repeats; ++run)); do
  # 1. The C++ bench: training steps (plain LibTorch, DataParallel(1), (2),
  # and with CUDA torch::nn::parallel::data_parallel); bandwidth in run 1.
  parts=steps,bandwidth
  ((run > 1)) && parts=steps
  "$bench" --only "$parts" --replicas 1,2 "${settings[@]}" "${quick[@]}" "${extra[@]}" \
    --output-dir "$results" --label "bench-$run" || status=$?
  echo "run.sh: run $run/$repeats: bench done after $((SECONDS - start)) s (exit $status)"
  [[ $status == 0 ]] || break
  benches+=("$results/bench-$run.json")

  # 2. The anchors, on the bench's models, batches, device kind and settings.
  "$python" "$here/anchors.py" --from-bench "$results/bench-$run.json" --output "$results/anchors-$run.json" \
    "${quick[@]}" || status=$?
  echo "run.sh: run $run/$repeats: anchors done after $((SECONDS - start)) s (exit $status)"
  [[ $status == 0 ]] || break
  anchors+=("$results/anchors-$run.json")
done

# 3. The table of ratios, over all runs.
if [[ $status == 0 ]]; then
  "$python" "$here/compare.py" --bench "${benches[@]}" --anchors "${anchors[@]}" --output "$results/compare.md" \
    || status=$?
fi
echo "run.sh: finished after $((SECONDS - start)) s, load average $(cut -d' ' -f1-3 /proc/loadavg), exit $status"
exec >&- 2>&-
wait "$tee_pid" || true  # run.log is complete when run.sh returns
exit $status
