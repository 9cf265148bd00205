#!/usr/bin/env bash
# Bring up a real single-node SLURM cluster on this machine (Debian 12, root,
# no systemd) so that the tests can submit jobs with sbatch.
#
# Idempotent: if the cluster already answers and a trivial job completes, it
# exits 0 at once.  Otherwise it installs what is missing, writes
# /etc/slurm/slurm.conf, starts munged, slurmctld and slurmd (only those not
# already running, by pid file), and waits, with a deadline, until the node is
# idle and a trivial job has COMPLETED.  On failure it prints the tails of the
# logs and exits non-zero.  Stop it with .ci/slurm-down.sh.
#
# Environment: SLURM_UP_TIMEOUT (seconds, default 60).
set -euo pipefail

TIMEOUT=${SLURM_UP_TIMEOUT:-60}
CONF=/etc/slurm/slurm.conf
LOGDIR=/var/log/slurm
MUNGE_PID=/run/munge/munged.pid
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid

T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
log() { echo "slurm-up: $*" >&2; }

show_logs() {
  local f
  for f in "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log" /var/log/munge/munged.log; do
    [ -f "$f" ] || continue
    echo "----- tail -n 30 $f -----" >&2
    tail -n 30 "$f" >&2 || true
  done
  if command -v sinfo >/dev/null 2>&1; then
    echo "----- sinfo -----" >&2
    timeout 5 sinfo -N -l >&2 2>&1 || true
  fi
}

die() { log "FAILED after $(elapsed) s: $*"; show_logs; exit 1; }

# alive PIDFILE: the process named in PIDFILE exists and is the daemon the
# file is named after (guards against a stale file and a reused pid).
alive() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  kill -0 "$pid" 2>/dev/null || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$(basename "$1" .pid)" ]
}

# node_ready: sinfo answers and the node is usable.
node_ready() {
  local st
  st=$(timeout 5 sinfo -h -o %T 2>/dev/null) || return 1
  [[ "$st" =~ ^(idle|mixed|allocated)$ ]]
}

# job_state ID: print the JobState of job ID ("" if unknown).
job_state() {
  timeout 5 scontrol show job -o "$1" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2 || true
}

# trivial_job DEADLINE: submit `true` and wait until it COMPLETED (0) or a
# terminal state / the deadline (epoch seconds) is reached (1).
trivial_job() {
  local deadline=$1 id st
  id=$(timeout 10 sbatch --parsable -J slurm-up-probe -o /dev/null -e /dev/null --wrap true 2>/dev/null) || return 1
  id=${id%%;*}
  while :; do
    st=$(job_state "$id")
    case "$st" in
      COMPLETED) return 0 ;;
      FAILED|CANCELLED|TIMEOUT|NODE_FAIL|BOOT_FAIL|OUT_OF_MEMORY|DEADLINE|PREEMPTED)
        log "probe job $id ended $st"; return 1 ;;
    esac
    [ "$(date +%s)" -lt "$deadline" ] || { log "probe job $id still '${st:-?}'"; return 1; }
    sleep 0.1
  done
}

# --- already up? -------------------------------------------------------------
# (The pid-file checks come first: sinfo with no slurmctld retries for ~5 s.)
if alive "$CTLD_PID" && alive "$SLURMD_PID" && command -v sinfo >/dev/null 2>&1 &&
   node_ready && trivial_job $(( $(date +%s) + 20 )); then
  log "already up (checked in $(elapsed) s)"
  exit 0
fi

[ "$(id -u)" = 0 ] || die "must run as root"

# --- install -------------------------------------------------------------------
pkgs=(slurmctld slurmd slurm-client munge)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
  log "installed in $(elapsed) s"
fi

# --- host name -----------------------------------------------------------------
HOST=$(hostname -s)
if ! getent hosts "$HOST" >/dev/null; then
  log "adding $HOST to /etc/hosts"
  echo "127.0.0.1 $HOST" >> /etc/hosts
fi

# --- configuration -------------------------------------------------------------
install -d -m 755 /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOGDIR"
CPUS=$(nproc)
new=$(mktemp)
cat > "$new" <<EOF
# Written by .ci/slurm-up.sh
ClusterName=ci
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOGDIR/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
MailProg=/bin/true
MpiDefault=none
ReturnToService=2
MinJobAge=86400
MaxJobCount=100000
KillWait=5
NodeName=$HOST CPUs=$CPUS RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
if [ -f "$CONF" ] && cmp -s "$new" "$CONF"; then
  rm -f "$new"
else
  chmod 644 "$new"; mv "$new" "$CONF"
  # A running daemon would keep the old configuration: restart it.
  for pf in "$SLURMD_PID" "$CTLD_PID"; do
    if alive "$pf"; then
      log "configuration changed: stopping $(cat "$pf") ($pf)"
      kill "$(cat "$pf")" 2>/dev/null || true
      for _ in $(seq 100); do alive "$pf" || break; sleep 0.1; done
    fi
  done
fi

# --- munged --------------------------------------------------------------------
[ -s /etc/munge/munge.key ] || die "/etc/munge/munge.key is missing"
install -d -o munge -g munge -m 755 /run/munge
if ! alive "$MUNGE_PID"; then
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged || die "munged did not start"
fi
deadline=$(( $(date +%s) + TIMEOUT ))
until munge -n 2>/dev/null | unmunge >/dev/null 2>&1; do
  [ "$(date +%s)" -lt "$deadline" ] || die "munge does not answer"
  sleep 0.1
done

# --- slurmctld, slurmd ---------------------------------------------------------
if ! alive "$CTLD_PID"; then
  log "starting slurmctld"
  /usr/sbin/slurmctld || die "slurmctld did not start"
fi
until timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; do
  [ "$(date +%s)" -lt "$deadline" ] || die "slurmctld does not answer"
  sleep 0.2
done
if ! alive "$SLURMD_PID"; then
  log "starting slurmd"
  /usr/sbin/slurmd || die "slurmd did not start"
fi

# --- wait for the node, then for a trivial job ---------------------------------
resumed=
until node_ready; do
  st=$(timeout 5 sinfo -h -o %T 2>/dev/null || true)
  # A node left down/drained by an earlier run: put it back once.
  if [ -z "$resumed" ] && [[ "$st" =~ ^(down|drain|drained|draining|fail)$ ]]; then
    log "node is $st: resuming it"
    scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true
    resumed=1
  fi
  [ "$(date +%s)" -lt "$deadline" ] || die "node state is '${st:-?}', not idle"
  sleep 0.2
done
trivial_job "$deadline" || die "a trivial job did not complete"
log "cluster up in $(elapsed) s"
