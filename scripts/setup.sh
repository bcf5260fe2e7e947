#!/usr/bin/env bash
# Source this file (`source scripts/setup.sh`): it sets up one LeRobot stack in its own venv if needed and
# exports VENV (the venv's directory) and XVLA_STACK (0.6 or 0.4). Idempotent.
#
# Which stack: XVLA_STACK=0.6 | 0.4 | auto (default). auto takes LeRobot 0.6.x when a Python >= 3.12 exists
# ($PYTHON, then 3.12 and 3.13 from PATH or pyenv's installs; 3.12 first, the version the stack is tested with:
# some of its dependencies, labmaze for instance, ship no 3.13 wheels), else LeRobot 0.4.4 on Python
# 3.10 / 3.11. Each stack installs the versions pinned in constraints/lerobot-<stack>.txt.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

_python_minor() { "$1" -c 'import sys; print(sys.version_info[1] if sys.version_info[0] == 3 else 0)' 2>/dev/null || echo 0; }

_find_python() {  # $1: 0.6 or 0.4 -> path of a suitable interpreter on stdout
    local candidates=() pyenv_root
    [ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
    if [ "$1" = 0.6 ]; then
        pyenv_root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
        for minor in 12 13; do
            candidates+=("python3.$minor" $(ls -d "$pyenv_root/versions/3.$minor".*/bin/python 2>/dev/null | sort -rV))
        done
    else
        candidates+=(python3.11 python3.10 python3)
    fi
    local c minor
    for c in "${candidates[@]}"; do
        command -v "$c" >/dev/null 2>&1 || continue
        minor=$(_python_minor "$c")
        if { [ "$1" = 0.6 ] && [ "$minor" -ge 12 ]; } || { [ "$1" = 0.4 ] && [ "$minor" -ge 10 ] && [ "$minor" -le 11 ]; }; then
            command -v "$c"
            return 0
        fi
    done
    return 1
}

XVLA_STACK=${XVLA_STACK:-auto}
if [ "$XVLA_STACK" = auto ]; then
    if _PY=$(_find_python 0.6); then XVLA_STACK=0.6; elif _PY=$(_find_python 0.4); then XVLA_STACK=0.4; else
        echo "setup: no Python >= 3.12 (LeRobot 0.6) nor 3.10/3.11 (LeRobot 0.4.4) found; set PYTHON=/path/to/python" >&2
        return 1 2>/dev/null || exit 1
    fi
elif [ "$XVLA_STACK" = 0.6 ] || [ "$XVLA_STACK" = 0.4 ]; then
    if ! _PY=$(_find_python "$XVLA_STACK"); then
        echo "setup: XVLA_STACK=$XVLA_STACK needs Python $([ "$XVLA_STACK" = 0.6 ] && echo '>= 3.12' || echo '3.10 or 3.11'); set PYTHON=/path/to/python" >&2
        return 1 2>/dev/null || exit 1
    fi
else
    echo "setup: XVLA_STACK must be 0.6, 0.4 or auto, got '$XVLA_STACK'" >&2
    return 1 2>/dev/null || exit 1
fi
export XVLA_STACK
# The default stack lives in .venv (where editors look), LeRobot 0.4.4 in .venv-lerobot04.
if [ "$XVLA_STACK" = 0.6 ]; then export VENV="$PWD/.venv"; else export VENV="$PWD/.venv-lerobot04"; fi
_CONSTRAINTS="constraints/lerobot-$XVLA_STACK.txt"

if [ -x "$VENV/bin/python" ] && [ "$(_python_minor "$VENV/bin/python")" != "$(_python_minor "$_PY")" ]; then
    echo "setup: $VENV was made with another Python than $_PY; making it anew"
    rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$_PY" -m venv "$VENV"
fi
# Reinstall when the venv misses a test dependency or when the pinned versions changed since the last install.
_STAMP="$VENV/.installed-$(cksum < "$_CONSTRAINTS" | cut -d' ' -f1)-$(cksum < pyproject.toml | cut -d' ' -f1)"
if [ ! -e "$_STAMP" ] || ! "$VENV/bin/python" -c "import lerobot_xvla, pytest, scservo_sdk, gym_pusht, gym_aloha, peft, libero, placo" 2>/dev/null; then
    if ls "$VENV"/.installed-* >/dev/null 2>&1; then
        echo "setup: updating $VENV (pyproject.toml or $_CONSTRAINTS changed since its last install)"
    else
        echo "setup: installing LeRobot $XVLA_STACK stack into $VENV (first time: about 5 minutes and 8-11 GB, a CUDA build of torch included; pip shows each download)"
    fi
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --progress-bar on -c "$_CONSTRAINTS" -e ".[dev]"
    rm -f "$VENV"/.installed-*
    touch "$_STAMP"
fi
_DESCRIBE='import importlib.metadata as m, platform; v = m.version
print("LeRobot %s on Python %s, torch %s, transformers %s" % (v("lerobot"), platform.python_version(), v("torch"), v("transformers")))'
echo "setup: $("$VENV/bin/python" -c "$_DESCRIBE") ($VENV)"
