#!/usr/bin/env bash
# multigpu-run on a real GPU (scripts/gpu-check.sh's scheduler part): each
# task's peak memory from NVML's process list, packing by memory, a GPU
# promised to a task across runs, and an out-of-memory retry. Needs an NVIDIA
# GPU and python3 with a CUDA torch: the tasks allocate with torch. Usage:
#   multigpu_run_gpu_check.sh TOOL WORK_DIR
# Prints what it measured; exits 1 at the first check that fails.
set -euo pipefail
tool="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; work="$2"
rm -rf "$work"; mkdir -p "$work"; cd "$work"
export MULTIGPU_RESERVATION_DIR="$work/reservations"  # this check's runs only
fail() { echo "FAILED: $*" >&2; exit 1; }

# A task that waits BEFORE seconds, allocates MIB MiB on its GPU, holds them HOLD seconds.
alloc() {
  echo "python3 -c \"import time, torch; time.sleep($2); x = torch.empty($1 * 2**20, dtype=torch.uint8, device='cuda'); torch.cuda.synchronize(); time.sleep($3)\""
}
# `field LOG_DIR TASK KEY`: the task's KEY in LOG_DIR/summary.json.
field() {
  python3 -c "import json, sys; t = {x['task']: x for x in json.load(open(sys.argv[1] + '/summary.json'))['tasks']}; print(t[sys.argv[2]][sys.argv[3]])" "$@"
}

echo "== 1. peak memory per task (1000 and 3000 MiB allocated, beside a CUDA context each)"
{ echo "[name=small] $(alloc 1000 0 3)"; echo "[name=large] $(alloc 3000 0 3)"; } >peak.tasks
"$tool" --gpus 0 --max-per-gpu 2 --log-dir peak -q peak.tasks
small="$(field peak small peak_gpu_mib)"; large="$(field peak large peak_gpu_mib)"
echo "peak_gpu_mib: small $small, large $large; gpu_seconds: small $(field peak small gpu_seconds)"
[[ "$small" != None && "$large" != None ]] || fail "no peak measured (NVML's process list, PID namespace?)"
((small >= 1000 && large >= 3000)) || fail "a peak below what the task allocated"
((large - small >= 1900 && large - small <= 2100)) || fail "the two peaks differ by $((large - small)) MiB, not ~2000"
"$tool" status peak | tee status.txt
grep -q "PEAK MEM" status.txt || fail "status shows no peak memory"

echo "== 2. packing by memory: 4 tasks of [mem=4G] at once; one larger than the GPU is refused"
{
  for i in 1 2 3 4; do echo "[name=packed-$i mem=4G] $(alloc 2000 0 4)"; done
  echo "[name=too-big mem=100000G] true"
} >pack.tasks
set +e; "$tool" --gpus 0 --max-per-gpu auto --log-dir pack -q pack.tasks; code=$?; set -e
[[ $code == 1 ]] || fail "exit status $code, expected 1 (too-big fails)"
python3 - <<'EOF' || fail "packed tasks did not overlap"
import json
tasks = {t['task']: t for t in json.load(open('pack/summary.json'))['tasks']}
packed = [tasks[f'packed-{i}'] for i in range(1, 5)]
latest_start = max(t['start_unix'] for t in packed)
earliest_end = min(t['start_unix'] + t['seconds'] for t in packed)
print(f"4 packed tasks: latest start {latest_start - min(t['start_unix'] for t in packed):.1f} s after the first; "
      f"all four ran together for {earliest_end - latest_start:.1f} s")
assert latest_start < earliest_end
assert tasks['too-big']['attempts'] == 0 and 'not run: it needs' in tasks['too-big']['error']
print('too-big:', tasks['too-big']['error'])
EOF

echo "== 3. a GPU promised across runs: run A's task allocates after 8 s; run B, started 2 s in, waits"
echo "[name=slow-start] $(alloc 2000 8 3)" >a.tasks
echo "[name=quick] true" >b.tasks
"$tool" --gpus 0 --log-dir a -q a.tasks >a.out 2>&1 &
a_pid=$!
sleep 2
ls "$MULTIGPU_RESERVATION_DIR" | grep -q "@slow-start.json" || fail "no promise file for slow-start"
"$tool" --gpus 0 --log-dir b -q b.tasks >b.out 2>&1
wait $a_pid || fail "run A failed: $(cat a.out)"
python3 - <<'EOF' || fail "run B started on the promised GPU"
import json
a = json.load(open('a/summary.json'))['tasks'][0]
b = json.load(open('b/summary.json'))['tasks'][0]
waited = b['start_unix'] - a['start_unix']
print(f"B's task started {waited:.1f} s after A's, which ran {a['seconds']:.1f} s")
assert waited >= a['seconds'] - 0.5
EOF
grep -q "promised to task slow-start of another run" b.out && echo "B said: promised to task slow-start of another run"

echo "== 4. out of memory on the only GPU: retried as any failure, and the note says no GPU has more"
echo "[name=oom] python3 -c \"import torch; torch.empty(2**50, dtype=torch.uint8, device='cuda')\"" >oom.tasks
set +e; "$tool" --gpus 0 --retries 1 --log-dir oom -q oom.tasks; set -e
echo "memory_note: $(field oom oom memory_note)"
[[ "$(field oom oom out_of_memory)" == True && "$(field oom oom attempts)" == 2 ]] || fail "out of memory not seen or not retried"

echo "== all multigpu-run GPU checks passed"
