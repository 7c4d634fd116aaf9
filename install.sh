#!/usr/bin/env bash
# Set up nnscd in ./.venv on a fresh machine: Python >= 3.11, no GPU needed. Safe to run again.
# uv resolves the same packages as pip (nnunetv2 pulls torch from PyPI) in a fraction of the time.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! .venv/bin/python -m uv --version >/dev/null 2>&1; then
  .venv/bin/python -m pip --version >/dev/null 2>&1 || .venv/bin/python -m ensurepip >/dev/null  # venvs made without pip
  .venv/bin/python -m pip install -q --disable-pip-version-check uv
fi
# --compile-bytecode: where PYTHONDONTWRITEBYTECODE is set (CI machines), Python would otherwise recompile torch and
# nnunetv2 from source in every process: about 18 s instead of 9 s per nnScd_ command start on 2 cores.
.venv/bin/python -m uv pip install -q --compile-bytecode --python .venv/bin/python -e ".[test]"
