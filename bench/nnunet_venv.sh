#!/usr/bin/env bash
# The peer environment: bench/.venv-nnunet with the real nnU-Net v2 (and the KiTS23 evaluation's surface-distance
# package) on the CPU torch of .venv. Idempotent: a second run with everything there takes a second.
#
#   bash bench/nnunet_venv.sh        (or: make nnunet-venv)
#
# Used by tests/unit/test_export_nnunet.py (nnUNetv2_plan_and_preprocess --verify_dataset_integrity on an
# exported dataset), tests/unit/test_kits23_official.py (the official KiTS23 scoring path: SimpleITK +
# DeepMind's surface-distance) and bench/bench_preprocess.py. Kept apart from .venv because nnunetv2 pins its own
# dependency set. torch is pinned to the version in .venv, so that pip takes the same CPU wheel (a bare torch
# requirement would pull a CUDA build of several GB).
#
# Environment knobs: NNUNET_VENV (default bench/.venv-nnunet), NNUNET_VERSION (2.8.1), BASE_PY (.venv/bin/python,
# the interpreter that creates the venv), TORCH_SPEC (default torch==<.venv's torch version>).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${NNUNET_VENV:-bench/.venv-nnunet}
NNUNET_VERSION=${NNUNET_VERSION:-2.8.1}
BASE_PY=${BASE_PY:-.venv/bin/python}
SD_SPEC="surface-distance==0.1"
log() { printf '[nnunet-venv] %s\n' "$*"; }

want_ok() {
  [ -x "$VENV/bin/nnUNetv2_plan_and_preprocess" ] && "$VENV/bin/python" - "$NNUNET_VERSION" <<'PY' >/dev/null 2>&1
import importlib.metadata as m, sys
import nnunetv2, SimpleITK, surface_distance  # noqa: F401
sys.exit(0 if m.version("nnunetv2") == sys.argv[1] else 1)
PY
}

if want_ok; then
  log "ready: $VENV (nnunetv2 $NNUNET_VERSION)"
  exit 0
fi
[ -x "$BASE_PY" ] || { log "$BASE_PY is missing: run 'make setup' first"; exit 1; }
TORCH_SPEC=${TORCH_SPEC:-torch==$("$BASE_PY" -c 'import torch; print(torch.__version__.split("+")[0])')}
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with $BASE_PY"
  "$BASE_PY" -m venv "$VENV"
fi
log "pip install $TORCH_SPEC nnunetv2==$NNUNET_VERSION $SD_SPEC (a few minutes the first time)"
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC" "nnunetv2==$NNUNET_VERSION" "$SD_SPEC"
want_ok || { log "nnunetv2 $NNUNET_VERSION, SimpleITK or surface_distance is still not importable in $VENV"; exit 1; }
log "ready: $VENV (nnunetv2 $NNUNET_VERSION, $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
