#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying `hydra/launcher=slurm` (docs/scaling.md) before a real
# cluster, and for tests/scale/test_slurm_cluster.py. Debian's slurm-wlm (slurmctld, slurmd) and munge; this
# script installs nothing itself.
#
#   scripts/local_slurm.sh start    # writes slurm.conf, starts munged, slurmctld, slurmd; waits for the node
#   scripts/local_slurm.sh status   # running or not, and the SLURM_CONF line to export
#   scripts/local_slurm.sh stop     # cancels the cluster's jobs, stops only the daemons this script started
#   eval "$(scripts/local_slurm.sh env)"   # SLURM_CONF for sbatch, squeue, scontrol, scancel in this shell
#
# Everything lives in $LOCAL_SLURM_DIR (default /tmp/glm_experiments_slurm): slurm.conf, its own munge key and
# socket, the controller's state, logs and pid files. The cluster does not touch /etc/slurm or a system munged:
# clients find it through SLURM_CONF (the launching shell of a sweep must export it). One node, this machine
# with its cores and memory (`slurmd -C`), one partition `local`, no accounting daemon (squeue/scontrol answer).
# Ports: $LOCAL_SLURM_PORT (slurmctld, default 16817) and the next one (slurmd).
#
# Settings a fine-tuning job's interruptions need (docs/scaling.md, "Interruptions"):
#   AuthInfo=...,cred_expire=N   a requeued job may start again N s after it ended (SLURM's default: 120 s)
#   SlurmctldParameters=preempt_send_user_signal   a preempted job first gets its --signal (submitit: USR2)
#   PreemptType=preempt/partition_prio, PreemptMode=REQUEUE: a job of partition `urgent` requeues one of `local`,
#                                which gets its --signal at once and GraceTime=20 s before SIGTERM
#   KillWait=30                  seconds between SIGTERM and SIGKILL (scancel, scontrol requeue, preemption)
set -euo pipefail

DIR=${LOCAL_SLURM_DIR:-/tmp/glm_experiments_slurm}
PORT=${LOCAL_SLURM_PORT:-16817}
CRED_EXPIRE=${LOCAL_SLURM_REQUEUE_DELAY_S:-10}
CONF=$DIR/slurm.conf
SBIN=/usr/sbin
export SLURM_CONF=$CONF

die() { echo "local_slurm: $*" >&2; exit 1; }

check_packages() {
  local missing=()
  for exe in "$SBIN/slurmctld" "$SBIN/slurmd" /usr/bin/sbatch; do
    [ -x "$exe" ] || { missing+=(slurm-wlm); break; }
  done
  [ -x "$SBIN/munged" ] || missing+=(munge)
  if [ ${#missing[@]} -gt 0 ]; then
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo "
    die "missing Debian package(s) ${missing[*]}: ${sudo}apt-get install -y ${missing[*]}"
  fi
}

pid_of() {  # the pid in $1 if that process is alive and is the program $2
  local file=$1 prog=$2 pid
  [ -s "$file" ] || return 1
  pid=$(cat "$file")
  [ -d "/proc/$pid" ] || return 1
  # Debian's slurmctld/slurmd are alternatives: /usr/sbin/slurmctld -> slurmctld-wlm
  case "$(basename "$(readlink "/proc/$pid/exe" 2>/dev/null || true)")" in "$prog"|"$prog"-*) ;; *) return 1 ;; esac
  echo "$pid"
}

node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -1; }

write_conf() {
  local user node_line host
  user=$(id -un)
  host=$(hostname -s)
  # this machine as slurmd sees it: CPUs, sockets, cores, threads, RealMemory
  node_line=$("$SBIN/slurmd" -C | head -1)
  local cpus mem
  cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$node_line")
  mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
  cat >"$CONF" <<EOF
# written by scripts/local_slurm.sh: a one-node cluster on this machine, state in $DIR
ClusterName=glmlocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket.2,cred_expire=$CRED_EXPIRE
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/d
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmdDebug=info
SlurmctldDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# a job without --mem gets its cores' share of the memory, not the whole node (jobs side by side)
DefMemPerCPU=$((mem / cpus))
ReturnToService=2
KillWait=30
MinJobAge=600
SchedulerParameters=sched_interval=2
SlurmctldParameters=preempt_send_user_signal
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=20
PartitionName=urgent Nodes=ALL Default=NO MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
EOF
}

start() {
  check_packages
  if pid_of "$DIR/slurmctld.pid" slurmctld >/dev/null; then
    echo "local_slurm: already running ($DIR)"
    status
    return 0
  fi
  mkdir -p "$DIR"/{munge,ctld,d,log}
  chmod 700 "$DIR" "$DIR/munge"
  write_conf
  if [ ! -s "$DIR/munge/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge/munge.key"
  fi
  "$SBIN/munged" --force --socket="$DIR/munge/munge.socket.2" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" \
    || die "munged did not start (log: $DIR/log/munged.log)"
  # -c: a fresh controller state (no jobs of an earlier start)
  "$SBIN/slurmctld" -c -f "$CONF" || die "slurmctld did not start (log: $DIR/log/slurmctld.log)"
  "$SBIN/slurmd" -f "$CONF" -N "$(hostname -s)" || die "slurmd did not start (log: $DIR/log/slurmd.log)"
  local state="" deadline=$((SECONDS + 60))
  while [ $SECONDS -lt $deadline ]; do
    state=$(node_state || true)
    case $state in idle|mixed|allocated) break ;; esac
    sleep 1
  done
  case $state in
    idle|mixed|allocated) ;;
    *) die "node not idle after 60 s (state '${state:-none}'); logs in $DIR/log/" ;;
  esac
  echo "local_slurm: started, node $(hostname -s) $state ($(sinfo -h -N -p local -o '%c CPUs, %m MB')), state in $DIR"
  echo "export SLURM_CONF=$CONF"
}

status() {
  local up=0 name
  for name in munged slurmctld slurmd; do
    local file=$DIR/$name.pid
    [ $name = munged ] && file=$DIR/munge/munged.pid
    if pid=$(pid_of "$file" $name); then echo "$name: running (pid $pid)"; up=$((up + 1)); else echo "$name: not running"; fi
  done
  if [ $up = 3 ]; then
    echo "node: $(node_state || echo unknown)"
    echo "export SLURM_CONF=$CONF"
    return 0
  fi
  return 1
}

stop() {
  if pid_of "$DIR/slurmctld.pid" slurmctld >/dev/null; then
    # the cluster's jobs first (their processes belong to slurmd's slurmstepd, not to the daemons)
    scancel --full --signal=TERM --state=RUNNING "$(id -un)" 2>/dev/null || true
    scancel -u "$(id -un)" 2>/dev/null || true
    local deadline=$((SECONDS + 45))
    while [ $SECONDS -lt $deadline ] && [ -n "$(squeue -h -t R,CG,S -o %i 2>/dev/null)" ]; do sleep 1; done
  fi
  local name file pid
  for name in slurmd slurmctld munged; do
    file=$DIR/$name.pid
    [ $name = munged ] && file=$DIR/munge/munged.pid
    if pid=$(pid_of "$file" $name); then
      kill "$pid"
      for _ in $(seq 50); do [ -d "/proc/$pid" ] || break; sleep 0.2; done
      [ -d "/proc/$pid" ] && kill -9 "$pid"
      echo "local_slurm: stopped $name (pid $pid)"
    fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
