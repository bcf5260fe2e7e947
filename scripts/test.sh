#!/usr/bin/env bash
# Set up the environment if needed, then run the default test suite (offline, CPU).
# XVLA_STACK=0.4 tests the LeRobot 0.4.4 stack instead of the default (see scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MUJOCO_GL=${MUJOCO_GL:-egl}
exec "$VENV/bin/python" -m pytest "$@"
