# A single-node Slurm cluster of the test's own, for the tests of
# `multigpu-run --slurm` (tests/tools/multigpu_run_slurm_test.sh). Sourced:
#   slurm_cluster_start DIR [GPUS]   # munged, slurmctld, slurmd; exports SLURM_CONF
#   slurm_cluster_stop               # every daemon it started, by its pid
# slurm_cluster_start returns 77 with the reason on stderr where a cluster
# cannot be made here (not root, Slurm or munge not installed).
#
# Note [A Slurm cluster for the tests]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
# Everything of the cluster is under DIR: munge's key and socket, slurm.conf,
# gres.conf, the daemons' state, spool, logs and pid files, and GPUs that
# are character devices (mknod c 195 N, NVIDIA's major number: Slurm gives a
# job the index of each device it names, so each task gets its own
# CUDA_VISIBLE_DEVICES; plain files are counted but set nothing, and a count
# without File= leaves the node INVAL). Its ports are free ones picked at
# start, so that a Slurm already on the machine, or another test's cluster,
# is untouched. Every daemon runs in the foreground (-D) as a child of the
# test, and is ended by its pid: by slurm_cluster_stop, which the caller
# runs on exit also when it fails, and, should the test itself be killed
# (ctest's time-out), by the kernel: each daemon is started with a parent-death
# signal (setpriv --pdeathsig KILL).
#
# Requeue delay: slurmctld holds a requeued job until its begin time, now +
# the credential lifetime + 1 (slurm.conf(5), AuthInfo cred_expire: "This
# also controls how long a requeued job must wait before starting again";
# 120 s by default, which is the ~3 minutes measured on this machine kind with
# a scheduling pass on top). The cluster sets cred_expire=5, the least
# slurmctld takes (cred_expire=2 is logged as "AuthInfo=cred_expire=2
# invalid" and 120 s stays): a requeued array task then starts again 6 to 7 s
# later (measured: requeue to end of a 3 s task, 11 s). `scontrol update
# StartTime=now` on the requeued task does not shorten it. The lifetime is
# also that of a job step's credential, which only needs to outlive the
# launch of a step on this one idle node.

slurm_cluster_pids=()
slurm_cluster_conf=""  # set once the cluster's daemons are started

slurm_cluster_stop() {
  local pid
  # Jobs still there (a failed case) first: slurmstepd and the tasks are not
  # the daemons' children and would outlive them.
  # Only this cluster's (SLURM_CONF named explicitly), never a Slurm of the machine's.
  if [[ -n $slurm_cluster_conf ]] && [[ -n $(SLURM_CONF=$slurm_cluster_conf timeout 5 squeue -h 2>/dev/null) ]]; then
    SLURM_CONF=$slurm_cluster_conf timeout 5 scancel -u "$(id -un)" 2>/dev/null || true
    for _ in $(seq 50); do
      [[ -z $(SLURM_CONF=$slurm_cluster_conf timeout 5 squeue -h 2>/dev/null) ]] && break
      sleep 0.1
    done
  fi
  local conf="$slurm_cluster_conf"
  slurm_cluster_conf=""
  for pid in "${slurm_cluster_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${slurm_cluster_pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  slurm_cluster_pids=()
  # What scancel could not end (slurmctld already gone, a job that ignores SIGTERM): this
  # cluster's slurmstepd and the jobs' processes, found by the SLURM_CONF they inherited.
  [[ -n $conf ]] && slurm_cluster_kill_jobs "$conf"
  return 0
}

# Sends SIGKILL to every slurmstepd and job process whose environment names CONF.
slurm_cluster_kill_jobs() {
  local conf="$1" entry pid
  for entry in /proc/[0-9]*; do
    pid="${entry#/proc/}"
    [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
    tr '\0' '\n' 2>/dev/null < "$entry/environ" | grep -qxF "SLURM_CONF=$conf" || continue
    if tr '\0' ' ' 2>/dev/null < "$entry/cmdline" | grep -q '^slurmstepd' \
        || tr '\0' '\n' 2>/dev/null < "$entry/environ" | grep -q '^SLURM_JOB_ID='; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
}

# A TCP port nothing listens on now.
slurm_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

slurm_cluster_start() {
  local dir="$1" gpus="${2:-4}"
  if [[ $(id -u) != 0 ]]; then
    echo "skipped: a Slurm cluster for the test needs root (mknod, SlurmdUser=root); running as $(id -un)" >&2
    return 77
  fi
  local binary
  for binary in munged slurmctld slurmd sbatch squeue scontrol scancel python3 setpriv; do
    if ! command -v "$binary" > /dev/null && [[ ! -x /usr/sbin/$binary ]]; then
      echo "skipped: $binary is not installed (Debian: apt-get install slurmctld slurmd slurm-client munge;" \
           "scripts/setup.sh does it)" >&2
      return 77
    fi
  done
  export PATH="$PATH:/usr/sbin"
  dir="$(realpath -m "$dir")"  # the daemons change directory: every path absolute
  mkdir -p "$dir"/{state,spool,log,munge}
  chmod 755 "$dir"
  # munge: its own key and socket, as the munge user (it refuses root).
  chown munge:munge "$dir/munge"; chmod 700 "$dir/munge"
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chown munge:munge "$dir/munge/munge.key"; chmod 400 "$dir/munge/munge.key"
  setpriv --reuid munge --regid munge --clear-groups --pdeathsig KILL -- munged -F --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munge/munged.pid" --seed-file="$dir/munge/munged.seed" --log-file="$dir/munge/munged.log" \
    > "$dir/log/munged.out" 2>&1 &
  slurm_cluster_pids+=($!)
  local i
  for i in $(seq 0 $((gpus - 1))); do
    if ! mknod "$dir/fakegpu$i" c 195 "$i" 2> "$dir/log/mknod.err"; then
      echo "skipped: the test's fake GPUs need mknod of character devices, refused here (a container without" \
           "CAP_MKNOD?): $(cat "$dir/log/mknod.err")" >&2
      return 77
    fi
  done
  local host; host="$(hostname -s)"
  # Four CPUs, one thread per core, whatever the machine has (config_overrides makes slurmd take
  # the configuration as it is): the cluster's checks need tasks running side by side, and on a
  # CI's machine, CPUs=$(nproc) with CR_Core let array tasks run only one at a time (the others
  # pending for "Resources"); a node declared with its layout and CR_CPU does not depend on how
  # the machine's CPUs are laid out.
  local cpus; cpus="$(nproc)"; ((cpus >= 4)) || cpus=4
  cat > "$dir/slurm.conf" <<CONF
ClusterName=multigpu-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(slurm_free_port)
SlurmdPort=$(slurm_free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=5
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=300
KillWait=2
SchedulerParameters=sched_interval=1
MaxArraySize=${SLURM_TEST_MAX_ARRAY_SIZE:-1001}
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=4000 $( ((gpus > 0)) && echo "Gres=gpu:$gpus") State=UNKNOWN
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  {
    for i in $(seq 0 $((gpus - 1))); do echo "NodeName=$host Name=gpu File=$dir/fakegpu$i"; done
  } > "$dir/gres.conf"
  export SLURM_CONF="$dir/slurm.conf"
  for _ in $(seq 100); do [[ -S $dir/munge/munge.socket ]] && break; sleep 0.05; done
  if [[ ! -S $dir/munge/munge.socket ]]; then
    echo "munged did not start: $(cat "$dir/log/munged.out" "$dir/munge/munged.log" 2>/dev/null)" >&2
    return 1
  fi
  slurm_cluster_conf="$dir/slurm.conf"
  setpriv --pdeathsig KILL -- slurmctld -D -i -f "$dir/slurm.conf" > "$dir/log/slurmctld.out" 2>&1 &
  slurm_cluster_pids+=($!)
  setpriv --pdeathsig KILL -- slurmd -D -f "$dir/slurm.conf" > "$dir/log/slurmd.out" 2>&1 &
  slurm_cluster_pids+=($!)
  for _ in $(seq 200); do
    [[ $(sinfo -h -N -o %t 2>/dev/null) == idle ]] && return 0
    sleep 0.1
  done
  echo "the test's Slurm node did not become idle in 20 s: $(sinfo -N 2>&1)" >&2
  tail -20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 2>/dev/null
  return 1
}
