#!/usr/bin/env bash
# `make test` leaves the checkout as it found it. `save FILE` records the state of the work tree (git status of
# tracked and untracked, not ignored, files, and a hash of the tracked files' diff); `check FILE` fails, naming
# the files, if a test run changed it. Outside a git checkout (a tarball) both do nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
git rev-parse --is-inside-work-tree >/dev/null 2>&1 || exit 0
state() { { git status --porcelain=v1 --untracked-files=all | grep -v -F "$1" || true; }; git diff HEAD | sha256sum; }
case "$1" in
  save)  state "$2" > "$2" ;;
  check) now=$(state "$2")
         if [ "$now" != "$(cat "$2")" ]; then
           echo "[make test] error: the test run changed the checkout (tests must write under temporary folders):"
           diff <(cat "$2") <(echo "$now") | grep '^[<>]' | grep -v ' -$' || true
           exit 1
         fi
         rm -f "$2" ;;
  *) echo "usage: $0 save|check FILE" >&2; exit 2 ;;
esac
