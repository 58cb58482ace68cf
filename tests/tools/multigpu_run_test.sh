#!/usr/bin/env bash
# Tests of the multigpu-run command, as a user runs it. Usage:
#   multigpu_run_test.sh TOOL SOURCE_DIR WORK_DIR CASE
# CASE: grid | sigint | errors
set -euo pipefail
tool="$1"; source_dir="$2"; work="$3"; case_name="$4"
rm -rf "$work"; mkdir -p "$work"; cd "$work"
fail() { echo "FAILED: $*" >&2; exit 1; }

case "$case_name" in
  grid)
    # The example grid on 4 CPU slots: 12 done; rerun: 12 skipped; one result removed: 1 runs again.
    "$tool" -q --gpus cpu --max-per-gpu 4 "$source_dir/examples/tasks/noise_grid.tasks" > first.out
    grep -q "12 task(s) in .*: 12 done, 0 failed, 0 skipped" first.out || fail "first run: $(cat first.out)"
    [[ $(ls output | wc -l) == 12 ]] || fail "not 12 outputs"
    grep -q "training noise asym 0.75 on CUDA_VISIBLE_DEVICES=\[\]" multigpu-logs/asym-0.75.log || fail "log content"
    "$tool" -q --gpus cpu --max-per-gpu 4 "$source_dir/examples/tasks/noise_grid.tasks" > second.out
    grep -q ": 0 done, 0 failed, 12 skipped" second.out || fail "rerun did not skip: $(cat second.out)"
    rm output/sym_0.50/result.txt
    "$tool" -q --gpus cpu --max-per-gpu 4 "$source_dir/examples/tasks/noise_grid.tasks" > third.out
    grep -q ": 1 done, 0 failed, 11 skipped" third.out || fail "partial rerun: $(cat third.out)"
    # A failing task: exit status 1, named with its log.
    printf '[name=ok] true\n[name=broken] echo about to fail; exit 4\n' > mixed.tasks
    set +e; "$tool" -q --gpus cpu mixed.tasks > mixed.out; status=$?; set -e
    [[ $status == 1 ]] || fail "exit status $status for a failed task"
    grep -q "failed: broken (exit code 4), log multigpu-logs/broken.log" mixed.out || fail "$(cat mixed.out)"
    ;;
  sigint)
    # Ctrl-C: the children stop, the summary is written, exit status 130.
    token="47.$$"
    printf '[name=a] sleep %s\n[name=b] sleep %s\n[name=c] sleep %s\n' "$token" "$token" "$token" > slow.tasks
    "$tool" -q --gpus cpu --max-per-gpu 2 --grace-period 2 slow.tasks > run.out 2> run.err &
    pid=$!
    for _ in $(seq 200); do
      [[ $(pgrep -fc "sleep $token" || true) -ge 2 ]] && break
      sleep 0.05
    done
    [[ $(pgrep -fc "sleep $token" || true) -ge 2 ]] || fail "tasks did not start"
    kill -INT "$pid"
    set +e; wait "$pid"; status=$?; set -e
    [[ $status == 130 ]] || fail "exit status $status after SIGINT: $(cat run.out run.err)"
    [[ $(pgrep -fc "sleep $token" || true) == 0 ]] || fail "children left running"
    grep -q '"interrupted": true' multigpu-logs/summary.json || fail "summary not written"
    grep -q "0 done, 0 failed, 0 skipped, 2 interrupted, 1 not started" run.out || fail "$(cat run.out)"
    ;;
  errors)
    printf 'grid a = 1 2\necho {b}\n' > bad.tasks
    set +e; "$tool" bad.tasks 2> bad.err; status=$?; set -e
    [[ $status == 2 ]] || fail "exit status $status for a bad task file"
    grep -q "bad.tasks:2: unknown placeholder {b}" bad.err || fail "$(cat bad.err)"
    printf 'true\n' > ok.tasks
    set +e; "$tool" --gpus 0,,1 ok.tasks 2> spec.err; status=$?; set -e
    [[ $status == 2 ]] && grep -q 'device spec "0,,1": item 2 is empty' spec.err || fail "bad spec: $(cat spec.err)"
    set +e; "$tool" --max-per-gpu 0 ok.tasks 2> usage.err; status=$?; set -e
    [[ $status == 2 ]] || fail "exit status $status for a bad option"
    "$tool" --gpus cpu --dry-run ok.tasks | grep -q "run  task-01 on cpu" || fail "dry run"
    [[ ! -e multigpu-logs/task-01.log ]] || fail "dry run ran something"
    ;;
  *) fail "unknown case $case_name" ;;
esac
echo "multigpu-run $case_name: passed"
