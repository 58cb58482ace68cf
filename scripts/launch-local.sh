#!/usr/bin/env bash
# Starts N copies of a program on this machine as one multi-process job, with
# the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
# MASTER_ADDR, MASTER_PORT): a stand-in for torchrun where Python is absent.
#
#   scripts/launch-local.sh 2 build/examples/quickstart --devices cpu
#   MASTER_PORT=29501 scripts/launch-local.sh 4 ./train ...
#
# Each rank's output lines are prefixed with "[rank R]". When one rank fails,
# the others are stopped (a job with a missing rank cannot go on) and the
# script exits with the failed rank's status; Ctrl-C stops them all.
set -euo pipefail

if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 PROCESSES PROGRAM [ARGUMENTS...]   (PROCESSES: a whole number, at least 1)" >&2
  exit 64
fi
processes="$1"
shift

export MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
if [[ -z "${MASTER_PORT:-}" ]]; then
  # A port nobody listens on now, chosen by the kernel.
  MASTER_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])' 2>/dev/null ||
                 echo $((20000 + RANDOM % 20000)))"
fi
export MASTER_PORT WORLD_SIZE="$processes" LOCAL_WORLD_SIZE="$processes"

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

for ((rank = 0; rank < processes; rank++)); do
  # The rank's own variables only in its environment; output through a prefixing filter.
  (RANK=$rank LOCAL_RANK=$rank exec "$@") > >(sed -u "s/^/[rank $rank] /") 2>&1 &
  pids+=($!)
done

# Watch every rank; the first failure stops the rest.
status=0
running=("${pids[@]}")
while [[ ${#running[@]} -gt 0 ]]; do
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
    else
      code=0
      wait "$pid" || code=$?
      if [[ $code -ne 0 && $status -eq 0 ]]; then
        status=$code
        echo "launch-local: a rank exited with status $code; stopping the others" >&2
        stop_all
      fi
    fi
  done
  running=("${still[@]+"${still[@]}"}")
  [[ ${#running[@]} -gt 0 ]] && sleep 0.2
done
exit "$status"
