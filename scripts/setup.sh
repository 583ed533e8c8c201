#!/usr/bin/env bash
# Create .venv in the checkout and install so8t_exp (editable) with its test tools.
# PyTorch is installed first and pinned, so pip does not pull a multi-GB build on its own;
# set SO8T_TORCH to choose another (e.g. a CUDA build: SO8T_TORCH="torch --index-url ...").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python3 -m venv .venv
py=.venv/bin/python
if ! "$py" -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086
  "$py" -m pip install -q ${SO8T_TORCH:-torch==2.13.0}
fi
# The rest with uv when it can be had (about twice as fast; compiled to bytecode, as pip
# does, so that every process does not compile MLflow and transformers again); else pip.
if "$py" -m pip install -q uv 2>/dev/null; then
  "$py" -m uv pip install -q --compile-bytecode --python "$py" -e ".[dev]"
else
  "$py" -m pip install -q -e ".[dev]"
fi
# The package's bytecode, written once: where PYTHONDONTWRITEBYTECODE is set (CI sandboxes),
# every `python -m so8t_exp...` would otherwise compile it again (~0.4 s a process).
"$py" -m compileall -q so8t_exp hydra_plugins > /dev/null || true
echo "so8t_exp installed in $root/.venv"
