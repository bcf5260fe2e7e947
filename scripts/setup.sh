#!/usr/bin/env bash
# Create .venv and install lerobot_xvla with everything its demo and tests need (idempotent).
# LeRobot 0.4.4 pins torch<2.11, so pip installs torch from the package registry on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import lerobot_xvla, pytest, scservo_sdk, gym_pusht, gym_aloha, peft" 2>/dev/null; then
    .venv/bin/python -m pip install --upgrade pip
    .venv/bin/python -m pip install -e ".[dev]"
fi
