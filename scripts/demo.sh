#!/usr/bin/env bash
# The LoFA demo from nothing: set-up (idempotent), then the shipped SDXL workflow headless on tiny models.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh 2024
.venv/bin/python -m demo "$@"
