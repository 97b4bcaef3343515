#!/usr/bin/env bash
# Idempotent set-up for the demo and the tests: .venv with pinned packages + the embedded ComfyUI runtime.
set -euo pipefail
cd "$(dirname "$0")/.."

python_bin="${PYTHON:-}"
if [ -z "$python_bin" ]; then
  for candidate in python3.11 python3.12 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python_bin="$candidate"; break; fi
  done
fi
"$python_bin" -c 'import sys; assert sys.version_info >= (3, 10), "Python 3.10+ is required"'

if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $("$python_bin" --version)"
  "$python_bin" -m venv .venv
fi
stamp=.venv/.lofa-installed
if [ ! -f "$stamp" ] || ! cmp -s requirements/lock.txt "$stamp"; then
  echo "installing pinned packages (requirements/lock.txt) ..."
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements/lock.txt
  cp requirements/lock.txt "$stamp"
fi
.venv/bin/python scripts/fetch_comfyui.py >/dev/null
