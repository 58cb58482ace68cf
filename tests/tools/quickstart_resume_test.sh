#!/usr/bin/env bash
# The quickstart killed with SIGKILL in the middle of an epoch and rerun with
# --resume auto ends with the same model, bit for bit, as a run that was
# never interrupted (the state checksum it prints); stopped with SIGTERM, it
# saves at once, exits with 143 and resumes the same way; a checkpoint path
# that cannot be written is refused before training.
# Usage: quickstart_resume_test.sh QUICKSTART
set -uo pipefail
quickstart="$1"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work" || exit 1
common=(--devices cpu,cpu --allow-duplicates --epochs 2 --max-batches 30 --batch-size 32 --save-every 10)
fail() { echo "FAIL: $*"; exit 1; }
checksum() { sed -n 's/.*state checksum \([0-9a-f]*\).*/\1/p' "$1"; }
# Starts a run saving into folder $2 (log $2.log), sends it signal $1 once
# $2/step-$3.pt exists, and sets `status` to how it ended.
interrupt() {
  "$quickstart" "${common[@]}" --state-dir "$2" --checkpoint "$2.pt" > "$2.log" 2>&1 &
  local pid=$! tries
  for tries in $(seq 1 6000); do  # up to 60 s
    [[ -e "$2/step-$3.pt" ]] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.01
  done
  kill "-$1" "$pid" 2>/dev/null
  wait "$pid"
  status=$?
}

"$quickstart" "${common[@]}" --state-dir straight --checkpoint straight.pt > straight.log 2>&1 ||
  { cat straight.log; fail "the uninterrupted run failed"; }
expected="$(checksum straight.log)"
[[ -n "$expected" ]] || { cat straight.log; fail "no state checksum in the uninterrupted run's output"; }

interrupt KILL resumed 20  # after the second checkpoint: mid-epoch 1
[[ $status -eq 137 ]] || { cat resumed.log; fail "the run to be killed ended by itself (status $status) before it could be killed"; }
[[ ! -e resumed.pt ]] || fail "the killed run saved its final model: it was not killed mid-training"
ls resumed
ls resumed | grep -q '\.tmp-' && fail "a temporary file was left in the checkpoint folder"

"$quickstart" "${common[@]}" --state-dir resumed --checkpoint resumed.pt --resume auto > rerun.log 2>&1 ||
  { cat rerun.log; fail "the resumed run failed"; }
cat rerun.log
grep -q '^resumed from resumed/step-' rerun.log || fail "the rerun did not say which checkpoint it resumed from"
actual="$(checksum rerun.log)"
[[ "$actual" == "$expected" ]] || fail "resumed model $actual differs from the uninterrupted run's $expected"

# SIGTERM (a scheduler's stop, a preemption): saved at the step it came in.
interrupt TERM termed 10
cat termed.log
[[ $status -eq 143 ]] || fail "after SIGTERM the run exited with $status, not 143"
grep -q '^stopped at step [0-9]*: saved termed/step-[0-9]*.pt; run again with --resume auto' termed.log ||
  fail "after SIGTERM it did not say where it saved"
"$quickstart" "${common[@]}" --state-dir termed --checkpoint termed.pt --resume auto > termed-resumed.log 2>&1 ||
  { cat termed-resumed.log; fail "the run resumed after SIGTERM failed"; }
[[ "$(checksum termed-resumed.log)" == "$expected" ]] || fail "resumed after SIGTERM to another model"

# A checkpoint path that cannot be written (its folder is a file): said at
# once, before any training.
"$quickstart" "${common[@]}" --checkpoint "$work/straight.log/model.pt" > bad.log 2>&1
status=$?
cat bad.log
[[ $status -eq 1 ]] || fail "an unwritable --checkpoint exited with $status, not 1"
grep -q "cannot write the checkpoint $work/straight.log/model.pt: $work/straight.log is not a folder" bad.log ||
  fail "the error does not name the path and why"
grep -q 'epoch 1' bad.log && fail "it trained before refusing the checkpoint path"
echo "PASS: resumed after SIGKILL to the same model ($actual)"
