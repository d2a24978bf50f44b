#!/usr/bin/env bash
# OMP on this machine's accelerator (bench/accelerator.py), in under 8 minutes. Where JAX sees
# no GPU but nvidia-smi finds one, it first installs the project's gpu extra.
#   bash bench/accelerator.sh [bench/accelerator.py options]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python=${PYTHON:-python3}
if ! "$python" -c 'import jax, sys; sys.exit(jax.default_backend() == "cpu")' 2>/dev/null \
    && command -v nvidia-smi >/dev/null; then
    "$python" -m pip install --quiet -e '.[gpu]'
fi
export PYTHONUNBUFFERED=1
exec timeout 480 "$python" bench/accelerator.py "$@"
