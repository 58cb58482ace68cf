#!/usr/bin/env bash
# multigpu-run against GNU parallel on the same commands, on the same machine,
# side by side: N tiny tasks (`true` by default) over S slots (multigpu-run:
# --gpus cpu --max-per-gpu S; parallel: -j S), for each N given, the two in
# turn. Prints a markdown table: wall seconds, milliseconds per task, the
# runner's own peak resident memory and open file descriptors (sampled from
# /proc every half second: the scheduler's or parallel's main process, not
# the tasks; compare them across the sizes to see whether they grow with
# the run). Each run's outcome is checked (every task done).
#
#   benchmarks/scheduler_vs_parallel.sh [--tasks 500,10000] [--slots 8] [--command true] TOOL
#   benchmarks/scheduler_vs_parallel.sh --tasks 500,100000 build/tools/multigpu-run
#
# Needs GNU parallel (scripts/setup.sh installs it: Debian's `parallel`).
set -euo pipefail
counts=500,10000 slots=8 command=true tool=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tasks) counts="$2"; shift 2 ;;
    --slots) slots="$2"; shift 2 ;;
    --command) command="$2"; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) [[ -x "$1" && -z "$tool" ]] || { echo "scheduler_vs_parallel.sh: $1 is not an executable multigpu-run, or a second one (--help)" >&2; exit 2; }
       tool="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; shift ;;
  esac
done
[[ -n "$tool" ]] || { echo "scheduler_vs_parallel.sh: give the multigpu-run binary to measure (--help)" >&2; exit 2; }
command -v parallel >/dev/null || { echo "scheduler_vs_parallel.sh: GNU parallel is not installed (apt-get install parallel, or scripts/setup.sh)" >&2; exit 2; }
[[ "$counts" =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "scheduler_vs_parallel.sh: --tasks takes numbers separated by commas, got '$counts'" >&2; exit 2; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# `measure NAME COMMAND...`: runs it in the background, samples its VmRSS and
# open descriptors until it ends, and sets wall, rss_peak (KiB) and fd_peak.
measure() {
  local name="$1"; shift
  local start end pid rss fds
  rss_peak=0 fd_peak=0
  start=$(date +%s.%N)
  "$@" >"$work/$name.out" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    rss="$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)"
    fds="$(ls "/proc/$pid/fd" 2>/dev/null | wc -l || true)"
    if [[ -n "$rss" ]]; then
      ((rss > rss_peak)) && rss_peak="$rss"
      ((fds > fd_peak)) && fd_peak="$fds"
    fi
    sleep 0.5
  done
  wait "$pid" || { echo "scheduler_vs_parallel.sh: $name failed:" >&2; tail -5 "$work/$name.out" >&2; exit 1; }
  end=$(date +%s.%N)
  wall="$(echo "$end - $start" | bc)"
}

echo "multigpu-run against GNU parallel $(parallel --version | head -1 | awk '{ print $3 }'): \`$command\` tasks over $slots slots," \
  "$(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) at the start, $(date -u '+%Y-%m-%d %H:%M UTC')"
echo
echo "| tasks | runner | wall s | ms per task | peak RSS MiB | peak fds |"
echo "| ---: | --- | ---: | ---: | ---: | ---: |"
report() {
  printf '| %d | %s | %.1f | %.2f | %.0f | %d |\n' "$tasks" "$1" "$wall" "$(echo "$wall * 1000 / $tasks" | bc -l)" \
    "$(echo "$rss_peak / 1024" | bc -l)" "$fd_peak"
}
IFS=, read -r -a sizes <<<"$counts"
for tasks in "${sizes[@]}"; do
  for ((i = 1; i <= tasks; i++)); do echo "[name=t$i] $command"; done >"$work/tasks"
  for ((i = 1; i <= tasks; i++)); do echo "$command"; done >"$work/commands"
  rm -rf "$work/logs"
  measure multigpu-run "$tool" --gpus cpu --max-per-gpu "$slots" --log-dir "$work/logs" -q "$work/tasks"
  done_count="$(grep -c ',done,' "$work/logs/summary.csv" || true)"
  [[ "$done_count" == "$tasks" ]] || { echo "scheduler_vs_parallel.sh: multigpu-run did $done_count of $tasks tasks" >&2; exit 1; }
  report "multigpu-run"
  measure parallel parallel -j "$slots" --joblog "$work/joblog" --arg-file "$work/commands"
  done_count="$(awk 'NR > 1 && $7 == 0' "$work/joblog" | wc -l)"
  [[ "$done_count" == "$tasks" ]] || { echo "scheduler_vs_parallel.sh: parallel did $done_count of $tasks tasks" >&2; exit 1; }
  report "GNU parallel"
done
