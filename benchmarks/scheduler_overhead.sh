#!/usr/bin/env bash
# The scheduler's own cost: N tiny tasks (`true`) over S CPU slots, each
# multigpu-run binary given run R times in turn (A B A B ...), side by side in
# one session. Prints a markdown table: wall seconds per run, the median, and
# the median's ratio to the first binary's.
#
#   benchmarks/scheduler_overhead.sh [--tasks 500] [--slots 8] [--rounds 3] TOOL [TOOL...]
#   benchmarks/scheduler_overhead.sh old/multigpu-run build/tools/multigpu-run
set -euo pipefail
tasks=500 slots=8 rounds=3 tools=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tasks) tasks="$2"; shift 2 ;;
    --slots) slots="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) [[ -x "$1" ]] || { echo "scheduler_overhead.sh: $1 is not an executable multigpu-run" >&2; exit 2; }
       tools+=("$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"); shift ;;
  esac
done
[[ ${#tools[@]} -gt 0 ]] || { echo "scheduler_overhead.sh: give one or more multigpu-run binaries (--help)" >&2; exit 2; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for ((i = 1; i <= tasks; i++)); do echo "[name=t$i] true"; done >"$work/tiny.tasks"

declare -A times
for ((round = 1; round <= rounds; round++)); do
  for index in "${!tools[@]}"; do
    rm -rf "$work/logs"
    start=$(date +%s.%N)
    "${tools[$index]}" --gpus cpu --max-per-gpu "$slots" --log-dir "$work/logs" -q "$work/tiny.tasks" >/dev/null
    end=$(date +%s.%N)
    times[$index]+="$(echo "$end - $start" | bc) "
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
echo "$tasks tasks (\`true\`) over $slots CPU slots, $rounds rounds in turn, $(nproc) cores, $(date -u '+%Y-%m-%d %H:%M UTC')"
echo
echo "| binary | wall seconds per run | median | ratio to the first |"
echo "| --- | --- | ---: | ---: |"
first=""
for index in "${!tools[@]}"; do
  m="$(echo "${times[$index]}" | median)"
  [[ -z "$first" ]] && first="$m"
  printf '| %s | %s | %.2f | %.2f |\n' "${tools[$index]}" "$(echo "${times[$index]}" | xargs printf '%.2f ')" "$m" \
    "$(echo "$m / $first" | bc -l)"
done
