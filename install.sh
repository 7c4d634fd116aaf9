#!/usr/bin/env bash
# Set up nnscd in ./.venv on a fresh machine: Python >= 3.11, no GPU needed. Safe to run again.
# uv resolves the same packages as pip (nnunetv2 pulls torch from PyPI) in a fraction of the time.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check uv
.venv/bin/python -m uv pip install -q --python .venv/bin/python -e ".[test]"
