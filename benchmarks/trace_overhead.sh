#!/usr/bin/env bash
# The cost of the collective trace (Note [The collective trace]): the
# multi-process test worker (tests/distributed/worker.cpp) trains the recipe
# as 2 processes over loopback (Gloo), with the trace on (2000 records) and
# off (0), in turn (on off on off ...), side by side in one session. Buckets
# of one parameter each (--bucket-cap-mib 0.0001), so that a step issues as
# many collectives as it can: the trace's share of a step is at its largest.
# Prints a markdown table: ms per step of each run, the median, and the
# ratio of "on" to "off".
#
#   benchmarks/trace_overhead.sh [--rounds 5] [--steps 300] [--replicas 1] WORKER
#   benchmarks/trace_overhead.sh build/tests/distributed_worker
set -euo pipefail
rounds=5 steps=300 replicas=1 worker=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --rounds) rounds="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --replicas) replicas="$2"; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) [[ -x "$1" ]] || { echo "trace_overhead.sh: $1 is not the executable distributed_worker" >&2; exit 2; }
       worker="$1"; shift ;;
  esac
done
[[ -n "$worker" ]] || { echo "trace_overhead.sh: give the distributed_worker binary (--help)" >&2; exit 2; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# One 2-process job; prints rank 0's ms per step (the worker's --report-time).
job() {
  local size="$1" port=$((20000 + RANDOM % 20000)) pids=()
  for rank in 0 1; do
    MASTER_ADDR=127.0.0.1 MASTER_PORT=$port RANK=$rank WORLD_SIZE=2 "$worker" --replicas "$replicas" \
      --steps "$steps" --bucket-cap-mib 0.0001 --report-time 1 --trace-size "$size" --timeout-ms 60000 \
      --out "$work/out$rank" 2>"$work/log$rank" &
    pids+=($!)
  done
  wait "${pids[@]}"
  sed -n 's/.* steps, \([0-9.e+-]*\) ms per step/\1/p' "$work/log0"
}

declare -A times
for ((round = 1; round <= rounds; round++)); do
  times[on]+="$(job 2000) "
  times[off]+="$(job 0) "
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
on=$(echo "${times[on]}" | median)
off=$(echo "${times[off]}" | median)
echo "2 processes x $replicas CPU replica(s), Gloo over loopback, $steps steps of the recipe, one bucket per parameter," \
  "$rounds rounds in turn, $(nproc) cores, $(date -u '+%Y-%m-%d %H:%M UTC')"
echo
echo "| trace | ms per step, each run | median |"
echo "|---|---|---|"
echo "| on (2000 records) | ${times[on]}| $on |"
echo "| off (0) | ${times[off]}| $off |"
echo
echo "on / off: $(echo "scale=4; $on / $off" | bc)"
