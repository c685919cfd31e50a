#!/usr/bin/env bash
# Submit the whole pipeline as three SLURM jobs chained with --dependency=afterok:
#
#     preprocess.sbatch  ──afterok──▶  train.sbatch  ──afterok──▶  predict.sbatch (+ evaluate)
#
# Usage:
#   slurm/pipeline.sh --data /scratch/kits19/data --work /scratch/dfs-r1 [options]
#   DATA=... WORK=... NODES=2 GPUS_PER_NODE=4 PARTITION=gpu ACCOUNT=proj slurm/pipeline.sh
#
# Every option has an environment variable of the same name (upper case, '-' -> '_'); options win.
#   --data DIR            KiTS-layout input (required)
#   --work DIR            base of the outputs [hpcdfs-work]
#   --shards DIR          [WORK/shards]        --run DIR     [WORK/run]
#   --pred DIR            [RUN/predictions]    --input DIR   cases to predict [DATA]
#   --log-dir DIR         job and per-rank logs [WORK/logs]
#   --nodes N             nodes for train and predict [1]
#   --gpus-per-node G     [4]; 0 on a CPU partition
#   --tasks-per-node T    ranks per node [= GPUS_PER_NODE, or 1 when 0 GPUs]
#   --cpus-per-task C     [8]
#   --partition P         [cluster default]    --account A  [none]   --qos Q  [none]
#   --preprocess-nodes N / --preprocess-tasks-per-node T / --preprocess-partition P
#                         [1 / TASKS_PER_NODE / PARTITION]; preprocessing asks for no GPU
#   --time-preprocess T   [02:00:00]  --time-train T [24:00:00]  --time-predict T [04:00:00]
#   --engine E            horovod | torch [horovod]: the gradient engine of every job (HPC_DFS_ENGINE); torch
#                         needs no Horovod and no MPI (torch.distributed, rendezvous from SLURM's variables)
#   --epochs E            training epochs [from the config]
#   --cv K                cross-validation over K folds (preprocess --n-folds K; with --skip-preprocess the
#                         manifest's n_folds must be K): fold k trains into RUN/fold_k; predict then takes the
#                         ensemble of the K folds (--checkpoint RUN) and, when the data has ground truth, also
#                         predicts every case with its own fold's model into RUN/oof and evaluates that pooled
#                         out-of-fold set per fold (RUN/oof/eval.json)
#   --cv-mode M           array | sequential [array]: array submits train as a job array (--array=0-(K-1)), one
#                         task per fold, and predict waits for the whole array (afterok); sequential trains
#                         every fold in one job (hpc-dfs train --folds all)
#   --stage S             locate | refine | both [from the config: locate]. both trains the cascade
#                         (RUN/locate, then RUN/refine) and predicts with both stages
#   --preprocess-config F / --train-config F / --predict-config F    TOML per stage
#   --preprocess-args S / --train-args S / --predict-args S / --eval-args S  extra CLI arguments
#   --venv DIR | --conda-env NAME | --modules "m1 m2"      environment each job activates
#                         [VENV = <checkout>/.venv]
#   --sbatch-args S       extra sbatch options for all three jobs (e.g. "--mail-type=FAIL")
#   --skip-preprocess     reuse existing SHARDS     --dry-run   print the sbatch commands only
#
# Prints one line per job and, last, "JOBS <preprocess id> <train id> <predict id>" (with --cv-mode array the
# train id is the array's job id).
# If a job fails, SLURM cancels its dependants (--kill-on-invalid-dep=yes).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HPC_DFS_HOME=$(cd "$HERE/.." && pwd)
die() { echo "[pipeline] ERROR: $*" >&2; exit 2; }

KNOWN=" DATA WORK SHARDS RUN PRED INPUT LOG_DIR NODES GPUS_PER_NODE TASKS_PER_NODE CPUS_PER_TASK PARTITION ACCOUNT QOS
 PREPROCESS_NODES PREPROCESS_TASKS_PER_NODE PREPROCESS_PARTITION TIME_PREPROCESS TIME_TRAIN TIME_PREDICT EPOCHS STAGE ENGINE
 CV CV_MODE
 PREPROCESS_CONFIG TRAIN_CONFIG PREDICT_CONFIG PREPROCESS_ARGS TRAIN_ARGS PREDICT_ARGS EVAL_ARGS VENV CONDA_ENV MODULES
 SBATCH_ARGS "
set_opt() {  # set_opt --some-option VALUE  ->  SOME_OPTION=VALUE, for known options only
  local var=${1#--}; var=${var//-/_}; var=${var^^}
  [[ $KNOWN == *" $var "* ]] || die "unknown option $1 (see --help)"
  printf -v "$var" '%s' "$2"
}
DRY_RUN=${DRY_RUN:-0}
SKIP_PREPROCESS=${SKIP_PREPROCESS:-0}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --skip-preprocess) SKIP_PREPROCESS=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --*=*) set_opt "${1%%=*}" "${1#*=}"; shift ;;
    --*) [ $# -ge 2 ] || die "option $1 needs a value"; set_opt "$1" "$2"; shift 2 ;;
    *) die "unexpected argument '$1' (see --help)" ;;
  esac
done

abspath() { case "$1" in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
[ -n "${DATA:-}" ] || die "--data (or DATA) is required"
DATA=$(abspath "$DATA"); [ -d "$DATA" ] || die "DATA=$DATA is not a directory"
WORK=$(abspath "${WORK:-hpcdfs-work}")
SHARDS=$(abspath "${SHARDS:-$WORK/shards}")
RUN=$(abspath "${RUN:-$WORK/run}")
PRED=$(abspath "${PRED:-$RUN/predictions}")
INPUT=$(abspath "${INPUT:-$DATA}")
LOG_DIR=$(abspath "${LOG_DIR:-$WORK/logs}")
NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-4}
if [ -z "${TASKS_PER_NODE:-}" ]; then
  if [ "$GPUS_PER_NODE" -gt 0 ]; then TASKS_PER_NODE=$GPUS_PER_NODE; else TASKS_PER_NODE=1; fi
fi
CPUS_PER_TASK=${CPUS_PER_TASK:-8}
PREPROCESS_NODES=${PREPROCESS_NODES:-1}
PREPROCESS_TASKS_PER_NODE=${PREPROCESS_TASKS_PER_NODE:-$TASKS_PER_NODE}
PREPROCESS_PARTITION=${PREPROCESS_PARTITION:-${PARTITION:-}}
for n in NODES GPUS_PER_NODE TASKS_PER_NODE CPUS_PER_TASK PREPROCESS_NODES PREPROCESS_TASKS_PER_NODE; do
  [[ ${!n} =~ ^[0-9]+$ ]] || die "$n must be a whole number, got '${!n}'"
done
if [ "$GPUS_PER_NODE" -gt 0 ] && [ "$TASKS_PER_NODE" != "$GPUS_PER_NODE" ]; then
  echo "[pipeline] note: TASKS_PER_NODE=$TASKS_PER_NODE differs from GPUS_PER_NODE=$GPUS_PER_NODE (one rank per GPU is usual)" >&2
fi
for f in PREPROCESS_CONFIG TRAIN_CONFIG PREDICT_CONFIG; do
  if [ -n "${!f:-}" ]; then [ -f "${!f}" ] || die "$f=${!f} does not exist"; printf -v "$f" '%s' "$(abspath "${!f}")"; fi
done
[ -n "${VENV:-}" ] && VENV=$(abspath "$VENV")
ENGINE=${ENGINE:-${HPC_DFS_ENGINE:-horovod}}
case "$ENGINE" in horovod|torch) ;; *) die "--engine must be horovod or torch, got '$ENGINE'" ;; esac
CV=${CV:-}
CV_MODE=${CV_MODE:-array}
unset FOLDS
if [ -n "$CV" ]; then
  [[ $CV =~ ^[0-9]+$ ]] && [ "$CV" -ge 2 ] || die "--cv must be a number of folds >= 2, got '$CV'"
  case "$CV_MODE" in
    array) FOLDS=array ;;
    sequential) FOLDS=all ;;
    *) die "--cv-mode must be array or sequential, got '$CV_MODE'" ;;
  esac
  if [ "$SKIP_PREPROCESS" = 1 ]; then
    have=$(grep -o '"n_folds": *[0-9]*' "$SHARDS/manifest.json" 2>/dev/null | grep -o '[0-9]*$' || true)
    [ "$have" = "$CV" ] || die "--cv $CV but $SHARDS/manifest.json has n_folds=${have:-?}: preprocess with --cv $CV"
  else
    PREPROCESS_ARGS="${PREPROCESS_ARGS:-} --n-folds $CV"
  fi
  export FOLDS
fi
mkdir -p "$LOG_DIR"

# What the jobs read (sbatch exports the submitting environment by default).
export HPC_DFS_HOME DATA SHARDS RUN PRED INPUT LOG_DIR ENGINE
for v in EPOCHS STAGE PREPROCESS_CONFIG TRAIN_CONFIG PREDICT_CONFIG PREPROCESS_ARGS TRAIN_ARGS PREDICT_ARGS EVAL_ARGS \
         VENV CONDA_ENV MODULES; do
  if [ -n "${!v:-}" ]; then export "${v?}"; fi
done
unset CONFIG CHECKPOINT REFINE_CHECKPOINT   # each job derives its own from the names above

common=(--parsable --kill-on-invalid-dep=yes)
[ -n "${ACCOUNT:-}" ] && common+=(--account="$ACCOUNT")
[ -n "${QOS:-}" ] && common+=(--qos="$QOS")
# shellcheck disable=SC2206
[ -n "${SBATCH_ARGS:-}" ] && common+=(${SBATCH_ARGS})
compute=(--nodes="$NODES" --ntasks-per-node="$TASKS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK"
         --gpus-per-node="$GPUS_PER_NODE")
[ -n "${PARTITION:-}" ] && compute+=(--partition="$PARTITION")

submit() {  # submit NAME sbatch-args... -> prints the job id
  local name=$1; shift
  local cmd=(sbatch "${common[@]}" --job-name="hpcdfs-$name" --output="$LOG_DIR/%x-%j.out" "$@" "$HERE/$name.sbatch")
  if [ "$DRY_RUN" = 1 ]; then echo "${cmd[*]}" >&2; echo "DRYRUN-$name"; return; fi
  local out; out=$("${cmd[@]}") || die "sbatch for $name failed: ${cmd[*]}"
  echo "${out%%;*}"
}

dep=()
pre_id=none
if [ "$SKIP_PREPROCESS" != 1 ]; then
  pre=(--nodes="$PREPROCESS_NODES" --ntasks-per-node="$PREPROCESS_TASKS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK"
       --gpus-per-node=0 --time="${TIME_PREPROCESS:-02:00:00}")
  [ -n "$PREPROCESS_PARTITION" ] && pre+=(--partition="$PREPROCESS_PARTITION")
  pre_id=$(submit preprocess "${pre[@]}")
  echo "preprocess job $pre_id: $DATA -> $SHARDS"
  dep=(--dependency="afterok:$pre_id")
else
  [ -f "$SHARDS/manifest.json" ] || die "--skip-preprocess but $SHARDS/manifest.json does not exist"
fi
array=()
[ "${FOLDS:-}" = array ] && array=(--array="0-$((CV - 1))")
train_id=$(submit train "${compute[@]}" "${dep[@]}" "${array[@]}" --time="${TIME_TRAIN:-24:00:00}")
if [ -n "$CV" ]; then
  echo "train job $train_id: $SHARDS -> $RUN/fold_0..$((CV - 1)) ($CV folds, $([ "$FOLDS" = array ] \
    && echo "array of $CV tasks, one per fold" || echo "one after the other in one job"); after $pre_id)"
else
  echo "train job $train_id: $SHARDS -> $RUN (after $pre_id)"
fi
pred_id=$(submit predict "${compute[@]}" --dependency="afterok:$train_id" --time="${TIME_PREDICT:-04:00:00}")
echo "predict job $pred_id: $INPUT -> $PRED (after $train_id)"
ids=$train_id,$pred_id; [ "$pre_id" = none ] || ids=$pre_id,$ids
echo "logs: $LOG_DIR   follow: squeue -j $ids   afterwards: sacct -j $ids"
echo "JOBS $pre_id $train_id $pred_id"
