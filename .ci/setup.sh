#!/usr/bin/env bash
# Idempotent set-up for hpc-dfs: system MPI, .venv, torch, Horovod (patched build, cached wheel),
# then the package itself in editable mode with its test extras.
#
# Called by `make setup` (and so by `make test` and `make demo`). A second run with nothing to
# do finishes in a few seconds: every step checks first and skips what is already there.
#
# Versions come from requirements.lock (made by `make lock`): every pip install below takes it as constraints,
# so a fresh machine gets the versions CI tested. torch and horovod are the exceptions: they follow TORCH_SPEC
# and HOROVOD_VERSION, whose defaults are the lock's lines.
#
# Environment knobs (all optional):
#   HPC_DFS_LOCK     the lock file (default requirements.lock); HPC_DFS_LOCK=none installs the newest versions
#                    that pyproject.toml admits (the tests then say that the proofs' bounds were measured
#                    under other versions)
#   TORCH_SPEC       pip requirement for torch (default: the lock's torch line, the CPU wheel here;
#                    on a CUDA cluster e.g. TORCH_SPEC="torch==2.5.1" with PIP_INDEX_URL for cu124;
#                    TORCH_SPEC=installed keeps the torch already in the environment, e.g. conda's)
#   ENGINE           horovod (default): build Horovod (the default engine); torch: skip Horovod altogether, for a
#                    suite that trains with the torch engine only (torch.distributed; a set-up in the time pip
#                    takes). `make test` in such a set-up skips the tests that need Horovod and names them.
#   HOROVOD_VERSION  default: the lock's horovod line (0.28.1, the last release on PyPI)
#   HOROVOD_GPU_OPERATIONS  set to NCCL on a CUDA machine with NCCL (auto when nvcc + nccl.h found)
#   HPC_DFS_CACHE    where built wheels are cached (default ~/.cache/hpc-dfs)
#   VENV             virtualenv path (default .venv)
#   PYTHON           interpreter that creates the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
LOCK=${HPC_DFS_LOCK:-requirements.lock}
if [ "$LOCK" != none ] && [ ! -f "$LOCK" ]; then
  printf '[setup] error: lock file %s not found (make lock writes it; HPC_DFS_LOCK=none installs without one)\n' "$LOCK"; exit 1
fi
locked() { [ "$LOCK" != none ] && sed -n "s/^$1==//p" "$LOCK" | head -1; }
TORCH_SPEC=${TORCH_SPEC:-torch==$(locked torch || true)}
[ "$TORCH_SPEC" = "torch==" ] && TORCH_SPEC=torch==2.13.0
HOROVOD_VERSION=${HOROVOD_VERSION:-$(locked horovod || true)}
HOROVOD_VERSION=${HOROVOD_VERSION:-0.28.1}
CACHE=${HPC_DFS_CACHE:-$HOME/.cache/hpc-dfs}
ENGINE=${ENGINE:-horovod}
case "$ENGINE" in
  horovod|torch) ;;
  *) printf '[setup] error: ENGINE=%s: use horovod (the default: builds Horovod) or torch (no Horovod)\n' "$ENGINE"; exit 2 ;;
esac
PY="$VENV/bin/python"
log() { printf '[setup] %s\n' "$*"; }

# ---------------------------------------------------------------- 1. system packages (apt)
apt_needed=()
command -v mpirun >/dev/null 2>&1 || apt_needed+=(openmpi-bin libopenmpi-dev)
[ -e /usr/include/x86_64-linux-gnu/openmpi/mpi.h ] || [ -n "$(ls /usr/lib/*/openmpi/include/mpi.h 2>/dev/null)" ] \
  || command -v mpicc >/dev/null 2>&1 || apt_needed+=(libopenmpi-dev)
if [ ${#apt_needed[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    log "need ${apt_needed[*]} but apt-get is missing: install OpenMPI (or 'module load openmpi') and rerun"; exit 1
  fi
  log "apt-get install ${apt_needed[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${apt_needed[@]}" >/dev/null
fi

# ---------------------------------------------------------------- 2. virtualenv + torch
if [ ! -x "$PY" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip wheel setuptools
fi
# pip constraints: the lock less torch and horovod (they follow TORCH_SPEC and HOROVOD_VERSION)
CONSTRAINTS="$VENV/.hpc_dfs-constraints.txt"
if [ "$LOCK" = none ]; then : > "$CONSTRAINTS"; else grep -vE '^(torch|horovod)==' "$LOCK" > "$CONSTRAINTS"; fi
PIP=("$PY" -m pip install -q -c "$CONSTRAINTS")
torch_want=${TORCH_SPEC#*==}
if [ "$TORCH_SPEC" = installed ]; then torch_want=""; fi   # conda/module torch: keep what is there
torch_have=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
if [ -z "$torch_have" ] || { [ -n "$torch_want" ] && [ "$torch_want" != "$TORCH_SPEC" ] && [ "$torch_have" != "$torch_want" ]; }; then
  [ "$TORCH_SPEC" = installed ] && { log "TORCH_SPEC=installed but torch is not importable in $VENV"; exit 1; }
  log "pip install $TORCH_SPEC"
  "${PIP[@]}" "$TORCH_SPEC" numpy
  torch_have=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
fi

# ---------------------------------------------------------------- 3. Horovod (patched sdist, cached wheel)
if [ "$ENGINE" = torch ]; then
  if "$PY" -c 'import horovod' >/dev/null 2>&1; then
    log "ENGINE=torch: Horovod is installed in $VENV already and stays (pip uninstall horovod removes it)"
  else
    log "ENGINE=torch: Horovod not built (train with --engine torch or torchrun; make test skips the Horovod tests)"
  fi
elif ! "$PY" -c 'import horovod.torch' >/dev/null 2>&1; then
  pyv=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  mpiv=$(mpirun --version 2>/dev/null | head -1 | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -1 || echo none)
  cuda=$("$PY" -c 'import torch; print("cu" + torch.version.cuda.replace(".", "") if torch.version.cuda else "cpu")')
  key="horovod-${HOROVOD_VERSION}_torch-${torch_have}_${pyv}_mpi-${mpiv}_${cuda}"
  wheeldir="$CACHE/wheels/$key"
  "${PIP[@]}" numpy cloudpickle psutil pyyaml packaging cffi 'setuptools<81' wheel
  if [ -z "$(ls "$wheeldir"/horovod-*.whl 2>/dev/null)" ]; then
    log "building Horovod $HOROVOD_VERSION against torch $torch_have (about 5 min on 2 cores) -> $wheeldir"
    work=$(mktemp -d)
    "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work"
    tar -xzf "$work"/horovod-"$HOROVOD_VERSION".tar.gz -C "$work"
    src="$work/horovod-$HOROVOD_VERSION"
    # torch >= 2.1 headers need C++17; the 0.28.1 release still asks for C++14.
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt"
    export CMAKE_POLICY_VERSION_MINIMUM=3.5 HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
      HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
    if [ "$cuda" != cpu ] && [ -z "${HOROVOD_GPU_OPERATIONS:-}" ]; then
      if [ -n "$(ls /usr/include/nccl.h "${NCCL_HOME:-/nonexistent}"/include/nccl.h 2>/dev/null)" ]; then
        export HOROVOD_GPU_OPERATIONS=NCCL
      fi
    fi
    MAKEFLAGS="-j$(nproc)" "$PY" -m pip wheel -q --no-deps --no-build-isolation "$src" -w "$work/dist"
    mkdir -p "$wheeldir"
    whl=$(ls "$work"/dist/horovod-*.whl); name=$(basename "$whl")
    cp "$whl" "$wheeldir/.$name.tmp" && mv "$wheeldir/.$name.tmp" "$wheeldir/$name"   # atomic
    rm -rf "$work"
  else
    log "Horovod wheel from cache $wheeldir"
  fi
  "$PY" -m pip install -q --no-deps "$wheeldir"/horovod-*.whl
fi

# ---------------------------------------------------------------- 4. the package (editable, test extras)
# the stamp holds what the environment was installed from: the lock's sha256 (or none) and the torch spec, so a
# changed lock or setting reinstalls, and the tests can tell a locked environment from another one
stamp="$VENV/.hpc_dfs-installed"
hvd_want=$HOROVOD_VERSION
[ "$ENGINE" = torch ] && hvd_want=none
want="lock=$([ "$LOCK" = none ] && echo none || sha256sum "$LOCK" | cut -c1-64) torch=$TORCH_SPEC horovod=$hvd_want"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ pyproject.toml -nt "$stamp" ] || [ .ci/setup.sh -nt "$stamp" ] \
   || ! "$PY" -c 'import hpc_dfs' >/dev/null 2>&1; then
  log "pip install -e .[test,bench] (constraints: $LOCK)"
  "${PIP[@]}" -e '.[test,bench]'
  printf '%s\n' "$want" > "$stamp.tmp" && mv "$stamp.tmp" "$stamp"
fi
log "ready: $("$PY" -c 'import torch
try:
    import horovod
    hvd = "horovod " + horovod.__version__
except ImportError:
    hvd = "no horovod (the torch engine only)"
print("torch", torch.__version__, hvd)')"
