#!/usr/bin/env bash
# Tests of `multigpu-run --slurm` against a real single-node Slurm that the
# test starts and stops itself (tests/tools/slurm_cluster.sh). Usage:
#   multigpu_run_slurm_test.sh TOOL SOURCE_DIR WORK_DIR CASE [QUICKSTART]
# CASE: cluster | submit | live | cancel | requeue | signal | errors | max_array | limits | quickstart
# Exit status 77: skipped (the reason on stderr): not root, or Slurm and munge
# not installed (scripts/setup.sh installs them).
set -euo pipefail
tool="$1"; source_dir="$2"; work="$3"; case_name="$4"
rm -rf "$work"; mkdir -p "$work"; cd "$work"
fail() { echo "FAILED: $*" >&2; exit 1; }
# shellcheck source=slurm_cluster.sh
source "$source_dir/tests/tools/slurm_cluster.sh"
# multigpu-run followers started in the background, ended by pid on the way out (a follower
# whose slurmctld is gone would ask squeue for ever).
followers=()
stop_all() {
  local pid
  for pid in "${followers[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  slurm_cluster_stop
}
trap stop_all EXIT
gpus=4
[[ $case_name == errors ]] && gpus=0
[[ $case_name == max_array ]] && export SLURM_TEST_MAX_ARRAY_SIZE=3
status=0; slurm_cluster_start "$work/cluster" "$gpus" || status=$?
[[ $status == 0 ]] || exit "$status"
# Waits until squeue lists none of the cluster's jobs (SECONDS, 20 by default, at most).
queue_empty() {
  for _ in $(seq $((${1:-20} * 10))); do [[ -z $(squeue -h 2>/dev/null) ]] && return 0; sleep 0.1; done
  return 1
}

case "$case_name" in
  cluster)
    # Each array task gets a GPU of its own, named by Slurm in CUDA_VISIBLE_DEVICES. Each task holds
    # its GPU until two have started (15 s at most; the cluster's node has four CPUs): tasks that ran
    # one after the other could all get GPU 0. Should Slurm not run two at once, the failure shows why.
    sbatch --parsable --array=0-3 --gres=gpu:1 -o "$work/out_%a" --wrap "echo \"gpu=\$CUDA_VISIBLE_DEVICES\"; \
      touch '$work/started_'\$SLURM_ARRAY_TASK_ID; \
      for _ in \$(seq 150); do [ \$(ls '$work'/started_* | wc -l) -ge 2 ] && break; sleep 0.1; done" > /dev/null
    queue_empty 60 || fail "the array did not end: $(squeue -o '%i %T %r %C %b'; scontrol show node)"
    seen=$(cat out_* | sort -u | wc -l)
    [[ $seen -ge 2 ]] || fail "array tasks shared GPUs: $(cat out_*)"
    pids=("${slurm_cluster_pids[@]}")
    slurm_cluster_stop
    for pid in "${pids[@]}"; do ! kill -0 "$pid" 2>/dev/null || fail "daemon $pid still there"; done
    ;;
  submit)
    mkdir -p out
    cat > grid.tasks <<'TASKS'
grid rate = 0.1 0.2
[name=train-{rate} done=out/train-{rate}] echo "rate {rate} task {task} on gpu {gpu}"; touch out/train-{rate}
[name=pair gpus=2] echo "pair on $CUDA_VISIBLE_DEVICES"
[name=eval after=train-0.1,train-0.2] echo "eval after both"
[name=flaky] if [ -e flaky.once ]; then echo second; else touch flaky.once; echo first; exit 3; fi
[name=broken] echo about to fail; exit 4
[name=never after=broken] echo should not run
[name=quoting] printf '%s|%s|%s\n' "a  b" '$HOME "x" `y`' "it's"
TASKS
    set +e; "$tool" --retries 1 --poll 0.5 --slurm --time 5 grid.tasks > run.out 2>&1; code=$?; set -e
    [[ $code == 1 ]] || fail "exit status $code: $(cat run.out)"
    grep -q "8 task(s) from grid.tasks to Slurm (0 skipped" run.out || fail "$(cat run.out)"
    grep -q "8 task(s): 6 done, 2 failed, 0 skipped" run.out || fail "$(cat run.out)"
    grep -q "failed: broken (exit code 4)" run.out || fail "$(cat run.out)"
    grep -q "failed: never (not run: its Slurm job ended without running it" run.out || fail "$(cat run.out)"
    grep -q "^rate 0.1 task train-0.1 on gpu [0-3]$" multigpu-logs/train-0.1.log || fail "$(cat multigpu-logs/train-0.1.log)"
    head -1 multigpu-logs/train-0.1.log | grep -q "device report" || fail "no device report first: $(head -3 multigpu-logs/train-0.1.log)"
    grep -q "^pair on [0-3],[0-3]$" multigpu-logs/pair.log || fail "$(cat multigpu-logs/pair.log)"
    grep -q "^eval after both$" multigpu-logs/eval.log || fail "$(cat multigpu-logs/eval.log)"
    grep -q "retrying (1 of 1)" multigpu-logs/flaky.log && grep -q "^second$" multigpu-logs/flaky.log \
      || fail "$(cat multigpu-logs/flaky.log)"
    # The command reaches the shell as written: quotes, $, backquotes, spaces.
    grep -Fxq 'a  b|$HOME "x" `y`|it'"'"'s' multigpu-logs/quoting.log || fail "$(cat multigpu-logs/quoting.log)"
    [[ ! -e multigpu-logs/never.log ]] || fail "never ran: $(cat multigpu-logs/never.log)"
    grep -q '"task": "train-0.2"' multigpu-logs/summary.json && grep -q '"status": "done"' multigpu-logs/summary.json \
      || fail "$(cat multigpu-logs/summary.json)"
    grep -q "^broken,failed" multigpu-logs/summary.csv || fail "$(cat multigpu-logs/summary.csv)"
    "$tool" status multigpu-logs > status.out
    grep -Eq "^flaky +done +[0-9]+_[0-9]+ +[^ ]+ +[0-9] .* 2  second" status.out || fail "$(cat status.out)"
    # Again: the two with done markers are skipped, the others run again.
    set +e; "$tool" --poll 0.5 --slurm grid.tasks > again.out 2>&1; code=$?; set -e
    grep -q "6 task(s) from grid.tasks to Slurm (2 skipped" again.out || fail "$(cat again.out)"
    grep -q "8 task(s): 4 done, 2 failed, 2 skipped" again.out || fail "$(cat again.out)"
    "$tool" status multigpu-logs | grep -Eq "^train-0.1 +skipped" || fail "$("$tool" status multigpu-logs)"
    ;;
  live)
    # A second submission of a folder whose tasks are queued or running is refused; cancel ends them.
    printf '[name=slow-%s] sleep 30\n' a b > slow.tasks
    "$tool" --no-follow --poll 0.5 --slurm slow.tasks > first.out
    set +e; "$tool" --poll 0.5 --slurm slow.tasks > second.out 2>&1; code=$?; set -e
    [[ $code == 2 ]] && grep -q "belongs to a submission whose 2 task(s) are still queued or running" second.out \
      || fail "second submission: $code $(cat second.out)"
    set +e; "$tool" --gpus cpu slow.tasks > local.out 2>&1; code=$?; set -e
    [[ $code == 2 ]] && grep -q "a run on this machine: the log folder .* belongs to a submission whose 2 task" local.out \
      || fail "local run of a live folder: $code $(cat local.out)"
    "$tool" cancel multigpu-logs > cancel.out
    grep -q "cancelled 2 task(s)" cancel.out || fail "$(cat cancel.out)"
    queue_empty || fail "cancel left $(squeue)"
    ;;
  cancel)
    # Ctrl-C stops following and leaves the tasks; status shows them; cancel ends each task, not the array.
    printf '[name=a] sleep 30\n[name=b] sleep 30\n' > slow.tasks
    env --default-signal=INT "$tool" --poll 0.5 --slurm slow.tasks > run.out 2>&1 &
    pid=$!; followers+=("$pid")
    for _ in $(seq 100); do grep -q "2 running" run.out && break; sleep 0.1; done
    kill -INT "$pid"; set +e; wait "$pid"; code=$?; set -e
    [[ $code == 130 ]] || fail "exit status $code after Ctrl-C: $(cat run.out)"
    grep -q "stopped following; the tasks go on in Slurm" run.out || fail "$(cat run.out)"
    [[ $(squeue -h | wc -l) == 2 ]] || fail "Ctrl-C ended the tasks: $(squeue)"
    "$tool" status multigpu-logs | grep -Eq "^a +running" || fail "$("$tool" status multigpu-logs)"
    grep -E "^[0-9]+_0 a$" multigpu-logs/.slurm/jobs.txt > /dev/null || fail "$(cat multigpu-logs/.slurm/jobs.txt)"
    "$tool" cancel multigpu-logs | grep -q "cancelled 2 task(s)" || fail "cancel"
    queue_empty || fail "cancel left $(squeue)"
    ;;
  requeue)
    # A requeued array task runs again under its name, its log appended, with SLURM_RESTART_COUNT
    # (6 to 7 s here: cred_expire=5, Note [A Slurm cluster for the tests]).
    printf '[name=long] echo "start restart=${SLURM_RESTART_COUNT:-0}"; sleep 3\n' > requeue.tasks
    "$tool" --poll 0.5 --slurm requeue.tasks > run.out 2>&1 &
    pid=$!; followers+=("$pid")
    for _ in $(seq 100); do grep -q "start restart=0" multigpu-logs/long.log 2>/dev/null && break; sleep 0.1; done
    job=$(awk '{print $1}' multigpu-logs/.slurm/jobs.txt)
    scontrol requeue "$job"
    wait "$pid" || fail "run: $(cat run.out)"
    grep -q "start restart=0" multigpu-logs/long.log && grep -q "start restart=1" multigpu-logs/long.log \
      && grep -q "Slurm requeued the task (SLURM_RESTART_COUNT=1)" multigpu-logs/long.log || fail "$(cat multigpu-logs/long.log)"
    grep -q "1 task(s): 1 done, 0 failed" run.out || fail "$(cat run.out)"
    ;;
  signal)
    # A signal Slurm sends to the batch shell alone (sbatch --signal=B:USR1@90, scancel --batch) reaches
    # the task, which a training uses to save before its time is up (Note [Signals for the task]).
    printf '%s\n' "[name=sig] trap 'echo got USR1; exit 0' USR1; echo ready; while :; do sleep 0.2; done" > sig.tasks
    "$tool" --poll 0.5 --slurm sig.tasks > run.out 2>&1 &
    pid=$!; followers+=("$pid")
    for _ in $(seq 200); do grep -q "^ready" multigpu-logs/sig.log 2>/dev/null && break; sleep 0.1; done
    grep -q "^ready" multigpu-logs/sig.log || fail "the task did not start: $(cat run.out)"
    job=$(awk '{print $1}' multigpu-logs/.slurm/jobs.txt)
    scancel --batch --signal=USR1 "$job"
    for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    ! kill -0 "$pid" 2>/dev/null || fail "the task did not end within 30 s of the signal: $(cat multigpu-logs/sig.log)"
    wait "$pid" || fail "run: $(cat run.out) $(cat multigpu-logs/sig.log)"
    grep -q "got USR1" multigpu-logs/sig.log || fail "the task did not get the signal: $(cat multigpu-logs/sig.log)"
    grep -q "1 task(s): 1 done, 0 failed" run.out || fail "$(cat run.out)"
    ;;
  errors)
    # Each a clear message, nothing submitted.
    echo '[name=x] true' > one.tasks
    set +e
    PATH=/nonexistent "$tool" --poll 0.5 --slurm one.tasks > path.out 2>&1; code=$?
    [[ $code == 2 ]] && grep -q -- "--slurm: sbatch is not on PATH" path.out || fail "no sbatch: $code $(cat path.out)"
    "$tool" --poll 0.5 --slurm --array=0-3 one.tasks > array.out 2>&1; code=$?
    [[ $code == 2 ]] && grep -q -- "the sbatch option --array=0-3 is set by multigpu-run itself" array.out \
      || fail "--array: $code $(cat array.out)"
    "$tool" --poll 0.5 --slurm -o out.txt one.tasks > output.out 2>&1; code=$?
    [[ $code == 2 ]] && grep -q -- "the sbatch option -o is set by multigpu-run itself: each task's log is" output.out \
      || fail "-o: $code $(cat output.out)"
    "$tool" --fail-fast --poll 0.5 --slurm one.tasks > local.out 2>&1; code=$?
    [[ $code == 2 ]] && grep -q -- "--fail-fast is for a run on this machine's GPUs, not for --slurm" local.out \
      || fail "--fail-fast: $code $(cat local.out)"
    "$tool" --poll 0.5 --slurm one.tasks > gres.out 2>&1; code=$?
    [[ $code == 2 ]] && grep -q -- "the tasks ask for GPUs (--gres=gpu:N), but no node of this cluster has GPUs" gres.out \
      || fail "no GRES: $code $(cat gres.out)"
    set -e
    [[ -z $(squeue -h) ]] || fail "something was submitted: $(squeue)"
    # CPU tasks run there.
    "$tool" --gpus cpu --poll 0.5 --slurm one.tasks > cpu.out 2>&1 || fail "$(cat cpu.out)"
    grep -q "1 task(s): 1 done" cpu.out || fail "$(cat cpu.out)"
    ;;
  max_array)
    # 7 tasks with MaxArraySize=3: three arrays (3, 3, 1), every task run once.
    for i in 1 2 3 4 5 6 7; do echo "[name=t$i] echo ran t$i"; done > seven.tasks
    # --dry-run: the sbatch commands, nothing submitted or written.
    "$tool" --dry-run --throttle 2 --poll 0.5 --slurm --time 5 seven.tasks > dry.out 2>&1 || fail "$(cat dry.out)"
    [[ $(grep -c "^  sbatch --parsable --job-name [^ ]* --array=0-[02]%2 .* --gres=gpu:1 --time 5 .*/array.sh [036]$" dry.out) == 3 ]] \
      || fail "dry run: $(cat dry.out)"
    grep -q "^    # t4, t5, t6$" dry.out || fail "dry run: $(cat dry.out)"
    [[ -z $(squeue -h) && ! -e multigpu-logs/.slurm/run.json ]] || fail "the dry run submitted: $(squeue)"
    "$tool" --throttle 2 --poll 0.5 --slurm seven.tasks > run.out 2>&1 || fail "$(cat run.out)"
    grep -q "7 task(s) from seven.tasks to Slurm (0 skipped: done already) in 3 job submission(s)" run.out || fail "$(cat run.out)"
    grep -q "7 task(s): 7 done" run.out || fail "$(cat run.out)"
    for i in 1 2 3 4 5 6 7; do grep -q "^ran t$i$" "multigpu-logs/t$i.log" || fail "t$i"; done
    ;;
  limits)
    # An sbatch in front of the real one: the first call is refused for the submit limit (waited
    # for, then submitted), the third for a wrong partition (what was submitted is cancelled).
    mkdir bin
    real_sbatch=$(command -v sbatch)
    cat > bin/sbatch <<SBATCH
#!/bin/sh
n=\$(( \$(cat "$work/calls" 2>/dev/null || echo 0) + 1 )); echo \$n > "$work/calls"
case \$n in
  1) echo "sbatch: error: QOSMaxSubmitJobPerUserLimit" >&2; echo "sbatch: error: Batch job submission failed: Job violates accounting/QOS policy (job submit limit, user's size and/or time limits)" >&2; exit 1 ;;
  3) echo "sbatch: error: invalid partition specified: nosuch" >&2; exit 1 ;;
esac
exec "$real_sbatch" "\$@"
SBATCH
    chmod +x bin/sbatch
    printf '[name=one] sleep 20\n[name=two gpus=2] sleep 20\n' > two.tasks
    set +e; PATH="$work/bin:$PATH" "$tool" --poll 0.5 --slurm two.tasks > run.out 2>&1; code=$?; set -e
    [[ $code == 2 ]] || fail "exit status $code: $(cat run.out)"
    grep -q "sbatch refused for the submit limit (sbatch: error: QOSMaxSubmitJobPerUserLimit); trying again in 2 s" run.out \
      || fail "$(cat run.out)"
    grep -q "sbatch refused the submission: sbatch: error: invalid partition specified: nosuch" run.out || fail "$(cat run.out)"
    grep -q "nothing is left submitted (1 of 2 task(s) had been, and were cancelled)" run.out || fail "$(cat run.out)"
    queue_empty || fail "left in Slurm: $(squeue)"
    grep -q '"error": "not submitted: sbatch refused the submission' multigpu-logs/summary.json \
      || fail "$(cat multigpu-logs/summary.json)"
    "$tool" status multigpu-logs | grep -Eq "^two +not submitted" || fail "$("$tool" status multigpu-logs)"
    ;;
  quickstart)
    # Preemption of a training written with --resume auto: requeued mid-training, it
    # continues from its checkpoint (SIGTERM saves at once; the rerun resumes).
    quickstart="${5:?the quickstart program}"
    printf '[name=train] %s --devices cpu,cpu --allow-duplicates --epochs 4 --max-batches 30 --batch-size 32 --save-every 10 --state-dir %s --checkpoint %s --resume auto\n' \
      "$quickstart" "$work/state" "$work/model.pt" > train.tasks
    "$tool" --gpus cpu --poll 0.5 --slurm train.tasks > run.out 2>&1 &
    pid=$!; followers+=("$pid")
    for _ in $(seq 600); do [[ -e state/step-20.pt ]] && break; sleep 0.1; done
    [[ -e state/step-20.pt ]] || fail "no checkpoint at step 20: $(cat multigpu-logs/train.log)"
    scontrol requeue "$(awk '{print $1}' multigpu-logs/.slurm/jobs.txt)"
    wait "$pid" || fail "run: $(cat run.out) $(cat multigpu-logs/train.log)"
    grep -q "Slurm requeued the task (SLURM_RESTART_COUNT=1)" multigpu-logs/train.log \
      && grep -q "^resumed from $work/state/step-" multigpu-logs/train.log || fail "$(cat multigpu-logs/train.log)"
    [[ -e model.pt ]] || fail "no final model"
    ;;
  *) fail "unknown case $case_name" ;;
esac
echo "ok: $case_name"
