#!/usr/bin/env bash
# A real one-node SLURM cluster for the tests in tests/slurm (and for trying slurm/ by hand).
#
#   tests/slurm/cluster.sh start DIR     # install if needed, write DIR/slurm.conf, start the daemons
#   . DIR/env.sh                         # SLURM_CONF for sbatch/squeue/sacct/srun
#   tests/slurm/cluster.sh status DIR
#   tests/slurm/cluster.sh stop DIR      # cancel jobs, stop exactly the daemons started here (by PID)
#
# Everything lives under DIR (keep it short, e.g. /tmp/hpcdfs-slurm.XXXX: the munge socket path
# must fit in 108 bytes): the munge key and socket, slurm.conf, the state and spool dirs, the logs,
# the PID files and the job-accounting text files. Nothing is written to /etc, so a machine that
# already runs SLURM or munge is not disturbed (the ports move on when 6817/6818 are taken).
#
# Needs root (slurmd runs jobs as any user; munged and slurmd here run as root). When slurmctld,
# slurmd or munged are missing, Debian's packages are installed with apt-get
# (slurm-wlm 22.05 on bookworm, about 1 min). Daemons that a package's postinst may start are
# stopped again (by PID) so that only this script's daemons run.
#
# Accounting: plain `sacct` needs slurmdbd + MariaDB since SLURM 20.11 removed
# accounting_storage/filetxt; that is heavy for a test. This cluster instead writes the job
# completion log (JobCompType=jobcomp/filetxt, DIR/jobcomp.txt), which `sacct -c` (--completion)
# reads in 22.05: one record per finished run of a job with its State (COMPLETED, FAILED,
# REQUEUED, ...), its ExitCode and times. That is what the tests check.
#
# Environment knobs: SLURMCTLD_PORT and SLURMD_PORT (default: the first free pair from 6817/6818), CPUS (nproc),
# REAL_MEMORY (MiB, from `free -m`, minus 10%), START_TIMEOUT (60 s), CRED_EXPIRE (10 s; how
# long a requeued job waits before it may start again: SLURM waits cred_expire + 1 s).
set -euo pipefail

cmd=${1:-}
DIR=${2:-}
usage() { echo "usage: $0 start|stop|status DIR" >&2; exit 2; }
[ -n "$cmd" ] && [ -n "$DIR" ] || usage
log() { printf '[cluster] %s\n' "$*" >&2; }
die() { printf '[cluster] ERROR: %s\n' "$*" >&2; exit 1; }

SLURMCTLD_PORT_SET=${SLURMCTLD_PORT:-}
SLURMCTLD_PORT=${SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SLURMD_PORT:-6818}
START_TIMEOUT=${START_TIMEOUT:-60}
CRED_EXPIRE=${CRED_EXPIRE:-10}
DAEMONS=(slurmd slurmctld munged)   # stop order

# ------------------------------------------------------------------------------------ helpers
pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
pidfile_pid() { [ -s "$1" ] && tr -dc '0-9' <"$1" || true; }
daemon_pids() {  # PIDs of any running munged/slurmd/slurmctld/slurmdbd/slurmstepd on this machine
  local p comm
  for p in /proc/[0-9]*; do
    comm=$(cat "$p/comm" 2>/dev/null || true)
    case "$comm" in munged|slurmd|slurmctld|slurmdbd|slurmstepd) echo "${p#/proc/}";; esac
  done
}

install_packages() {
  local need=()
  command -v slurmctld >/dev/null 2>&1 || need+=(slurmctld)
  command -v slurmd >/dev/null 2>&1 || need+=(slurmd)
  command -v sbatch >/dev/null 2>&1 || need+=(slurm-client)
  command -v munged >/dev/null 2>&1 || need+=(munge)
  [ ${#need[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "SLURM is not installed (${need[*]} missing) and installing it needs root"
  command -v apt-get >/dev/null 2>&1 || die "SLURM is not installed and apt-get is missing: install slurm-wlm and munge"
  local before; before=$(daemon_pids | sort)
  log "installing ${need[*]} with apt-get (once; about a minute)"
  export DEBIAN_FRONTEND=noninteractive
  local apt_opts=(-y -q -o DPkg::Lock::Timeout=600)
  if ! apt-get install "${apt_opts[@]}" --no-install-recommends "${need[@]}" >"$DIR/apt.log" 2>&1; then
    apt-get update -q -o DPkg::Lock::Timeout=600 >>"$DIR/apt.log" 2>&1 || true
    apt-get install "${apt_opts[@]}" --no-install-recommends "${need[@]}" >>"$DIR/apt.log" 2>&1 \
      || { tail -20 "$DIR/apt.log" >&2; die "apt-get install ${need[*]} failed (log: $DIR/apt.log)"; }
  fi
  # A package's postinst may have started its service (no policy-rc.d): stop those, by PID.
  local after p; after=$(daemon_pids | sort)
  for p in $(comm -13 <(echo "$before") <(echo "$after")); do
    log "stopping $(cat /proc/"$p"/comm 2>/dev/null) (pid $p) that the package install started"
    kill "$p" 2>/dev/null || true
  done
}

write_conf() {
  local host cpus mem
  host=$(hostname -s)
  cpus=${CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}
  mem=${REAL_MEMORY:-$(free -m | awk '/^Mem:/ {printf "%d", $2 * 0.9}')}
  local mpi=none
  # pmix when the plugin is there (Debian ships mpi_pmix_v4 in slurm-wlm-basic-plugins)
  ls /usr/lib/*/slurm-wlm/mpi_pmix*.so /usr/lib/slurm/mpi_pmix*.so >/dev/null 2>&1 && mpi=pmix
  mkdir -p "$DIR/ctld" "$DIR/slurmd" "$DIR/log" "$DIR/run" "$DIR/tmp"
  # PMIx per-step dirs (spmix_appdir_<uid>_<job>.<step>) go here, not to /tmp: job ids restart at 1
  # with every test cluster, and a dir left in /tmp by an aborted step would break a later step.
  printf 'PMIxCliTmpDirBase=%s\n' "$DIR/tmp" >"$DIR/mpi.conf"
  cat >"$DIR/slurm.conf.tmp" <<EOF
# one-node test cluster written by tests/slurm/cluster.sh; everything under $DIR
ClusterName=hpcdfs
SlurmctldHost=$host
SlurmctldPort=$SLURMCTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/run/munge.socket,cred_expire=$CRED_EXPIRE
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/slurmd
TmpFS=$DIR/tmp
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=$mpi
SchedulerType=sched/backfill
# look at pending jobs every 2 s (defaults 60/30 s): a requeued job restarts within seconds
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
JobRequeue=1
MinJobAge=86400
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.txt
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  mv "$DIR/slurm.conf.tmp" "$DIR/slurm.conf"
  printf 'export SLURM_CONF=%q\n' "$DIR/slurm.conf" >"$DIR/env.sh.tmp" && mv "$DIR/env.sh.tmp" "$DIR/env.sh"
}

start_munge() {
  local key=$DIR/run/munge.key
  if [ ! -s "$key" ]; then
    if command -v mungekey >/dev/null 2>&1; then mungekey --create --keyfile="$key" --force >/dev/null
    else dd if=/dev/urandom of="$key" bs=1 count=1024 status=none; fi
  fi
  chmod 0400 "$key"
  chmod 0700 "$DIR/run"
  # --force: munged refuses keys/sockets outside /etc and /run unless told it is fine.
  munged --force --key-file="$key" --socket="$DIR/run/munge.socket" --pid-file="$DIR/run/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/run/munge.seed" \
    || die "munged did not start (log: $DIR/log/munged.log)"
  local i
  for i in $(seq 1 50); do [ -S "$DIR/run/munge.socket" ] && return 0; sleep 0.2; done
  die "munged started but its socket $DIR/run/munge.socket never appeared"
}

port_busy() { command -v ss >/dev/null 2>&1 && ss -ltn "( sport = :$1 )" | grep -q LISTEN; }
# Keep an explicitly chosen port (fail if taken); otherwise move up from the default to a free one,
# so that a machine that already runs SLURM on 6817/6818 still gets a test cluster.
pick_ports() {
  if [ -n "${SLURMCTLD_PORT_SET:-}" ]; then
    port_busy "$SLURMCTLD_PORT" && die "SLURMCTLD_PORT $SLURMCTLD_PORT is already in use"
    port_busy "$SLURMD_PORT" && die "SLURMD_PORT $SLURMD_PORT is already in use"
    return 0
  fi
  local i
  for i in $(seq 0 2 40); do
    if ! port_busy $((6817 + i)) && ! port_busy $((6818 + i)); then
      SLURMCTLD_PORT=$((6817 + i)); SLURMD_PORT=$((6818 + i)); return 0
    fi
  done
  die "no free pair of ports in 6817-6858 for slurmctld/slurmd: set SLURMCTLD_PORT and SLURMD_PORT"
}

start() {
  mkdir -p "$DIR"
  DIR=$(cd "$DIR" && pwd)
  [ ${#DIR} -le 60 ] || die "state dir '$DIR' is too long for the munge socket path: use a short one under /tmp"
  if pid_alive "$(pidfile_pid "$DIR/run/slurmctld.pid")"; then log "already running in $DIR"; return 0; fi
  install_packages
  pick_ports
  write_conf
  export SLURM_CONF=$DIR/slurm.conf
  start_munge
  slurmctld -c -f "$SLURM_CONF" || die "slurmctld did not start (log: $DIR/log/slurmctld.log)"
  slurmd -f "$SLURM_CONF" || die "slurmd did not start (log: $DIR/log/slurmd.log)"
  local t0=$SECONDS state=""
  while [ $((SECONDS - t0)) -lt "$START_TIMEOUT" ]; do
    state=$(sinfo -h -N -o '%T' 2>/dev/null | head -1 || true)
    [ "$state" = idle ] && { log "node $(hostname -s) idle after $((SECONDS - t0)) s; SLURM_CONF=$SLURM_CONF"; return 0; }
    sleep 0.5
  done
  tail -5 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
  die "node not idle within ${START_TIMEOUT}s (state '${state:-unknown}')"
}

# slurmstepd processes of this cluster: they hold a socket in our SlurmdSpoolDir.
our_stepds() {
  local p
  for p in $(daemon_pids); do
    [ "$(cat /proc/"$p"/comm 2>/dev/null)" = slurmstepd ] || continue
    if ls -l /proc/"$p"/fd 2>/dev/null | grep -q -- "$DIR/"; then echo "$p"; fi
    grep -q "$DIR/" /proc/"$p"/environ 2>/dev/null && echo "$p"
  done | sort -u
}

stop() {
  [ -d "$DIR" ] || { log "nothing to stop: $DIR does not exist"; return 0; }
  DIR=$(cd "$DIR" && pwd)
  export SLURM_CONF=$DIR/slurm.conf
  if pid_alive "$(pidfile_pid "$DIR/run/slurmctld.pid")"; then
    scancel --quiet --full --signal=KILL --state=RUNNING "--user=$(id -un)" 2>/dev/null || true
    scancel --quiet "--user=$(id -un)" 2>/dev/null || true
    local t0=$SECONDS
    while [ $((SECONDS - t0)) -lt 30 ] && [ -n "$(squeue -h -t R,CG,S 2>/dev/null)" ]; do sleep 0.5; done
  fi
  local p name pid
  for p in $(our_stepds); do log "killing leftover slurmstepd $p"; kill -KILL "$p" 2>/dev/null || true; done
  for name in "${DAEMONS[@]}"; do
    pid=$(pidfile_pid "$DIR/run/$name.pid")
    pid_alive "$pid" || continue
    [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$name" ] || { log "pid $pid is not $name any more; leaving it"; continue; }
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for i in $(seq 1 50); do pid_alive "$pid" || break; sleep 0.2; done
    if pid_alive "$pid"; then log "$name ($pid) ignored SIGTERM; SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
    log "stopped $name ($pid)"
  done
  for p in $(our_stepds); do kill -KILL "$p" 2>/dev/null || true; done
}

status() {
  local name pid rc=0
  for name in munged slurmctld slurmd; do
    pid=$(pidfile_pid "$DIR/run/$name.pid")
    if pid_alive "$pid"; then echo "$name running (pid $pid)"; else echo "$name not running"; rc=1; fi
  done
  [ $rc = 0 ] && SLURM_CONF=$DIR/slurm.conf sinfo -N
  return $rc
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) usage ;;
esac
