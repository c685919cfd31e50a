# shellcheck shell=bash
# Shared helpers for slurm/*.sbatch: environment activation, MPI plugin choice, per-rank logs,
# the start-of-job banner (config + Horovod/MPI topology) and one clear failure line.
#
# Sourced by preprocess.sbatch, train.sbatch and predict.sbatch (never run on its own). Every
# setting is an environment variable with a default; see slurm/README.md for the full table.
#
# Typical cluster modules (uncomment, or set MODULES="openmpi/4.1.5 cuda/12.1" when submitting):
#   module load openmpi/4.1.5 cuda/12.1 nccl/2.18      # generic Lmod site
#   module load OpenMPI/4.1.5-GCC-12.3.0 CUDA/12.1.1    # EasyBuild-style names
#   module load gcc/12 openmpi/4.1 cuda/12 anaconda3    # Spack/conda site
# Horovod must be built against the same MPI that srun's PMIx/PMI2 plugin serves.

HD_STAGE=${HD_STAGE:-job}
HPC_DFS_HOME=${HPC_DFS_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}   # the hpc-dfs checkout

hd_log() { printf '[hpc-dfs %s %s] %s\n' "$HD_STAGE" "$(date +%H:%M:%S)" "$*"; }

# One clear line on stderr (and in the job log), then exit non-zero.
hd_fail() {
  local code=${2:-1} line
  line=$(printf '[hpc-dfs %s] FAILED (exit %s): %s' "$HD_STAGE" "$code" "$1")
  echo "$line" >&2
  # also on stdout when the job's --error file is not its --output file
  [ "$(readlink /proc/$$/fd/1 2>/dev/null)" = "$(readlink /proc/$$/fd/2 2>/dev/null)" ] || echo "$line"
  exit "$code"
}

hd_require_slurm() {
  [ -n "${SLURM_JOB_ID:-}" ] || hd_fail "not inside a SLURM job: submit with 'sbatch slurm/${HD_STAGE}.sbatch' (or run inside salloc)" 2
  command -v srun >/dev/null 2>&1 || hd_fail "srun is not on PATH inside the job" 2
}

# MODULES (space separated), then CONDA_ENV (a name or a path) or VENV (default: HPC_DFS_HOME/.venv).
hd_activate() {
  if [ -n "${MODULES:-}" ]; then
    command -v module >/dev/null 2>&1 || hd_fail "MODULES='$MODULES' is set but the 'module' command is missing"
    # shellcheck disable=SC2086
    module load $MODULES || hd_fail "module load $MODULES failed"
  fi
  if [ -n "${CONDA_ENV:-}" ]; then
    command -v conda >/dev/null 2>&1 || hd_fail "CONDA_ENV='$CONDA_ENV' is set but 'conda' is not on PATH (module load anaconda3?)"
    # shellcheck disable=SC1091
    source "$(conda info --base)/etc/profile.d/conda.sh" && conda activate "$CONDA_ENV" \
      || hd_fail "conda activate $CONDA_ENV failed"
  else
    VENV=${VENV:-$HPC_DFS_HOME/.venv}
    [ -f "$VENV/bin/activate" ] || hd_fail "no virtualenv at VENV='$VENV' (run 'make setup', or set VENV or CONDA_ENV)"
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
  fi
  PYTHON=${PYTHON:-python}
  "$PYTHON" -c 'import hpc_dfs' 2>/dev/null \
    || hd_fail "'$PYTHON' cannot import hpc_dfs: activate the environment where 'pip install -e .' was run"
  export PYTHONUNBUFFERED=1
  export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-${OMP_NUM_THREADS:-1}}   # the job's CPUs per rank
  # ENGINE [horovod]: horovod, or torch (torch.distributed: ranks and the rendezvous from SLURM's variables, no
  # MPI needed); every hpc-dfs step of the job reads it as HPC_DFS_ENGINE
  ENGINE=${ENGINE:-${HPC_DFS_ENGINE:-horovod}}
  case "$ENGINE" in
    horovod|torch) export HPC_DFS_ENGINE=$ENGINE ;;
    *) hd_fail "ENGINE must be horovod or torch, got '$ENGINE'" 2 ;;
  esac
  # The CLI, as a command (HPC_DFS may be overridden, e.g. HPC_DFS="hpc-dfs").
  read -r -a HD_CLI <<<"${HPC_DFS:-$PYTHON -m hpc_dfs}"
}

# Per-job and per-rank logs: the job log is sbatch's --output (%x-%j.out); each rank of a step
# writes LOG_DIR/<job name>-<job id>[-r<restart>]-<step label>-rank<r>.log.
hd_logs() {
  LOG_DIR=${LOG_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/logs}
  mkdir -p "$LOG_DIR" || hd_fail "cannot create LOG_DIR=$LOG_DIR"
  local restart=""
  [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] && restart="-r${SLURM_RESTART_COUNT}"
  HD_LOG_PREFIX="$LOG_DIR/${SLURM_JOB_NAME:-hpcdfs}-${SLURM_JOB_ID}${restart}"
}

# Which srun --mpi plugins to try, in order: SRUN_MPI if set (one, or a list like "pmix pmi2"),
# else (the torch engine needs no MPI) the cluster default, else those of pmix and pmi2 that `srun --mpi=list`
# offers, else the cluster default.
hd_mpi_candidates() {
  if [ -n "${SRUN_MPI:-}" ]; then echo "$SRUN_MPI"; return; fi
  if [ "${ENGINE:-horovod}" = torch ]; then echo default; return; fi
  local types; types=$(srun --mpi=list 2>&1 || true)
  local out=()
  grep -qE '(^|[[:space:]])pmix($|[[:space:]_])' <<<"$types" && out+=(pmix)
  grep -qE '(^|[[:space:]])pmi2($|[[:space:]])' <<<"$types" && out+=(pmi2)
  [ ${#out[@]} -gt 0 ] || out+=(default)
  echo "${out[@]}"
}

hd_mpi_flag() { [ "$1" = default ] && echo "" || echo "--mpi=$1"; }

# Banner: who/where/what, then the stage's own settings passed as "name=value" arguments.
hd_banner() {
  hd_log "job ${SLURM_JOB_ID} '${SLURM_JOB_NAME:-}' restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}"
  hd_log "nodes=${SLURM_JOB_NUM_NODES:-?} tasks=${SLURM_NTASKS:-?} tasks/node=${SLURM_NTASKS_PER_NODE:-?}" \
         "cpus/task=${SLURM_CPUS_PER_TASK:-1} gpus/node=${SLURM_GPUS_PER_NODE:-0}" \
         "partition=${SLURM_JOB_PARTITION:-?} account=${SLURM_JOB_ACCOUNT:-none}"
  hd_log "python=$(command -v "$PYTHON") OMP_NUM_THREADS=$OMP_NUM_THREADS logs=${HD_LOG_PREFIX}-*"
  local kv
  for kv in "$@"; do hd_log "  $kv"; done
  if [ -n "${CONFIG:-}" ]; then
    [ -f "$CONFIG" ] || hd_fail "CONFIG=$CONFIG does not exist" 2
    hd_log "config file $CONFIG:"; sed 's/^/    /' "$CONFIG"
  fi
  local gpn=${SLURM_GPUS_PER_NODE:-0}; gpn=${gpn##*:}   # "4", "a100:4" -> 4
  if [ "$gpn" != 0 ] && [ -n "${SLURM_NTASKS_PER_NODE:-}" ] && [ "$gpn" != "$SLURM_NTASKS_PER_NODE" ]; then
    hd_log "WARNING: --ntasks-per-node=$SLURM_NTASKS_PER_NODE differs from --gpus-per-node=$gpn;" \
           "rank r uses CUDA device local_rank % device_count"
  fi
}

# A short srun step over all tasks: initialises the engine (Horovod, or torch.distributed) exactly as the stage
# will, prints one line per rank (rank, local rank, host, CUDA device, MPI/Gloo/NCCL) and checks an allreduce.
# It also picks the MPI plugin: pmix first, pmi2 when pmix cannot start this MPI.
# Sets HD_MPI. PREFLIGHT=0 skips the step (HD_MPI = first candidate).
HD_PREFLIGHT_PY='
import sys, torch
from hpc_dfs import parallel
parallel.init()
t = parallel.topology()
t.update(device=str(parallel.device()), cuda_devices=torch.cuda.device_count())
t.setdefault("mpi", None); t.setdefault("gloo", None); t.setdefault("nccl", None)
total = parallel.allreduce_scalar(1.0, "sum", name="preflight")
rows = parallel.allgather_object(t, name="preflight_topology")
if parallel.rank() == 0:
    print("[topology] world size {} (allreduce check {:.0f}), launcher {launcher}, engine {engine}, horovod {horovod} "
          "mpi {mpi} gloo {gloo} nccl {nccl}".format(parallel.size(), total, **t))
    for r in rows:
        print("[topology] rank {rank}/{size} local {local_rank}/{local_size} host {host} device {device} "
              "(cuda devices visible: {cuda_devices})".format(**r))
sys.exit(0 if round(total) == parallel.size() else 3)
'
hd_preflight() {
  local cands; read -r -a cands <<<"$(hd_mpi_candidates)"
  if [ "${PREFLIGHT:-1}" = 0 ]; then HD_MPI=${cands[0]}; hd_log "MPI plugin $HD_MPI (preflight skipped)"; return 0; fi
  local mpi try log
  for mpi in "${cands[@]}"; do
    for try in 1 2; do
      log="${HD_LOG_PREFIX}-preflight-$mpi-rank0.log"
      rm -f "$log"
      # shellcheck disable=SC2046
      timeout "${PREFLIGHT_TIMEOUT:-300}" srun $(hd_mpi_flag "$mpi") --kill-on-bad-exit=1 \
        --output="${HD_LOG_PREFIX}-preflight-$mpi-rank%t.log" "$PYTHON" -c "$HD_PREFLIGHT_PY"
      local rc=$?
      if [ "$rc" = 0 ] && grep -q '^\[topology\] world size' "$log" 2>/dev/null; then
        HD_MPI=$mpi
        hd_log "MPI plugin: srun --mpi=$mpi"
        sed -n 's/^\[topology\]/[hpc-dfs topology]/p' "$log"
        return 0
      fi
      hd_wait_steps_gone
      # no rank log at all: the step did not launch (e.g. a failed step still releasing its CPUs)
      [ -f "$log" ] && break
      hd_log "srun --mpi=$mpi step did not launch (status $rc); retrying once"
    done
    hd_log "srun --mpi=$mpi could not start a $([ "$ENGINE" = torch ] && echo torch.distributed || echo Horovod) job" \
           "(see ${HD_LOG_PREFIX}-preflight-$mpi-rank*.log)"
    hd_tail_logs "${HD_LOG_PREFIX}-preflight-$mpi-rank"
  done
  [ "$ENGINE" = torch ] && hd_fail "srun could not start the torch engine (see the preflight logs above): check that the nodes reach each other on TCP ports 20000-39999 (or set MASTER_PORT)"
  hd_fail "no srun MPI plugin (${cands[*]}) starts Horovod here: check that Horovod was built against this MPI (horovodrun --check-build) and that the MPI modules match, or use ENGINE=torch"
}

# After a failed step: wait (up to 60 s) until SLURM has cleaned it up, so the next step gets its CPUs.
hd_wait_steps_gone() {
  local i
  for i in $(seq 1 60); do
    squeue -h -s -j "$SLURM_JOB_ID" -o '%i' 2>/dev/null | grep -qvE '\.(batch|extern)$' || return 0
    sleep 1
  done
}

# Last lines of each rank's log, after a failure.
hd_tail_logs() {
  local f
  for f in "$1"*.log; do
    [ -f "$f" ] || continue
    echo "----- last lines of $f"
    tail -n "${TAIL_LINES:-15}" "$f"
  done
}

# The srun command line for a step, one log file per rank, in HD_SRUN. Usage: hd_srun_cmd LABEL [srun options]
hd_srun_cmd() {
  local label=$1; shift
  # shellcheck disable=SC2046
  HD_SRUN=(srun $(hd_mpi_flag "$HD_MPI") --output="${HD_LOG_PREFIX}-${label}-rank%t.log" "$@")
}
