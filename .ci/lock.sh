#!/usr/bin/env bash
# Regenerate requirements.lock (`make lock`): resolve the newest versions that pyproject.toml admits in a
# scratch virtualenv, exactly as `make setup` installs them (torch from TORCH_SPEC first, Horovod's build
# needs, then the package with its test and bench extras), and write `pip freeze` of it. Review the diff,
# run `make test` (the proofs' bounds were measured under the old lock), then commit the new lock.
#
#   make lock                       # about 2-4 min (downloads only; Horovod is not built)
#   PYTHON=python3.12 make lock     # a lock is for one Python minor version: the one that made it
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOCK=${LOCK:-requirements.lock}
TORCH_SPEC=${TORCH_SPEC:-$(grep -E '^torch==' "$LOCK" 2>/dev/null || echo torch==2.13.0)}
HOROVOD_VERSION=${HOROVOD_VERSION:-$(sed -n 's/^horovod==//p' "$LOCK" 2>/dev/null || true)}
HOROVOD_VERSION=${HOROVOD_VERSION:-0.28.1}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "[lock] resolving in a scratch venv ($("$PYTHON" --version), $TORCH_SPEC, horovod $HOROVOD_VERSION)"
"$PYTHON" -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q "$TORCH_SPEC" numpy
"$py" -m pip install -q numpy cloudpickle psutil pyyaml packaging cffi
"$py" -m pip install -q ".[test,bench]"
{
  echo "# requirements.lock: the versions CI tested, installed by \`make setup\` as pip constraints."
  echo "# Made by \`make lock\` ($(date -u +%F), $("$PYTHON" --version), $(uname -m)); regenerate it with that command."
  echo "# torch comes from TORCH_SPEC (default: the torch line below) and horovod from HOROVOD_VERSION (built by"
  echo "# .ci/setup.sh); every other line is a constraint. The np=2 == np=1 bounds were measured with these versions."
  "$py" -m pip freeze --exclude hpc-dfs | sed -E 's/^(torch==[^+]*)\+.*/\1/' | LC_ALL=C sort -f
  echo "horovod==$HOROVOD_VERSION"
} > "$work/lock"
grep -q '^numpy==' "$work/lock"
cp "$work/lock" "$LOCK.tmp" && mv "$LOCK.tmp" "$LOCK"   # atomic
echo "[lock] wrote $LOCK ($(grep -cv '^#' "$LOCK") packages); now run make test and commit it"
