#!/usr/bin/env bash
# Run the whole test suite from a fresh clone: set-up (idempotent), lint, then pytest on the real ComfyUI.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest tests "$@"
