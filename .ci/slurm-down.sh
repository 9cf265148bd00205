#!/usr/bin/env bash
# Stop the single-node SLURM cluster started by .ci/slurm-up.sh: slurmd,
# slurmctld, then munged, each by its pid file (never by name).  Job state
# stays in /var/spool/slurmctld, so job ids and finished jobs survive a
# restart.  Exits 0 if nothing was running.
set -uo pipefail

rc=0
for pf in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
  [ -s "$pf" ] || continue
  pid=$(cat "$pf")
  # Stale file, or the pid now belongs to another program: leave that alone.
  if ! kill -0 "$pid" 2>/dev/null ||
     [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != "$(basename "$pf" .pid)" ]; then
    rm -f "$pf"
    continue
  fi
  echo "slurm-down: stopping pid $pid ($pf)" >&2
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do               # up to 10 s
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "slurm-down: pid $pid did not exit on TERM; sending KILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.2
    kill -0 "$pid" 2>/dev/null && { echo "slurm-down: pid $pid still alive" >&2; rc=1; }
  fi
  rm -f "$pf"
done
exit $rc
