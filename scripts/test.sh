#!/usr/bin/env bash
# Set up the environment if needed, then run the default test suite (offline, CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MUJOCO_GL=${MUJOCO_GL:-egl}
exec .venv/bin/python -m pytest "$@"
