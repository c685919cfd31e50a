#!/usr/bin/env bash
# GPU benchmark of hpc-dfs on one GPU, in under 5 minutes; the logic is in bench/bench_gpu.py.
#
#   bench/gpu.sh              # on a GPU node: writes bench/results/gpu.json (card, steps/s, peak memory, reader
#                             # vs step, 1-GPU trainings of 50 steps through `hpc-dfs train` under both engines
#                             # with NCCL: horovodrun and torchrun; both engines' NCCL allreduce 4 KB-64 MB)
#   bench/gpu.sh --dry-run    # on CPU: tiny sizes, 1-2 steps; checks that every part runs (make test runs it)
#
# Environment on the GPU node: a CUDA build of torch (its NCCL serves the torch engine) and Horovod built with NCCL
# (HOROVOD_GPU_OPERATIONS=NCCL pip install --no-cache-dir horovod[pytorch]); PYTHON overrides the interpreter.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
py="${PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then py="$repo/.venv/bin/python"; else py="$(command -v python3)"; fi
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PATH="$(dirname "$py"):$PATH"   # horovodrun of the same environment
exec "$py" "$here/bench_gpu.py" --require-cuda "$@"
