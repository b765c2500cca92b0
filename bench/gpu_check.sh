#!/usr/bin/env bash
# The prepared GPU check (issue 18): ONE command on a bare lent H200, inside 9 minutes.
#
# Here, once (the wheels the GPU image lacks; see /work/.library/device/KINDS.md's package list):
#   echo /.whl/ >> .git/info/exclude
#   bash bench/gpu_check.sh --download      # into .whl/: deepspeed (built with pip wheel), datasets, trl, ...
# Then one device call, carrying .whl:
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
# It writes bench/RESULTS_gpu.md and bench/RESULTS_gpu.json (copied to $OUT when set).
set -euo pipefail
cd "$(dirname "$0")/.."
# what the GPU image (torch 2.11, transformers, peft, accelerate, pyarrow, ...) does not have
PKGS="deepspeed==0.19.8 hjson pydantic pydantic-core annotated-types typing-inspection datasets dill multiprocess xxhash trl==1.16.0"
if [ "${1:-}" = "--download" ]; then
  mkdir -p .whl
  python3 -m pip wheel --no-deps -w .whl "deepspeed==0.19.8"   # an sdist: build the wheel here
  for p in $PKGS; do
    case "$p" in deepspeed*) continue ;; esac
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$p"
  done
  exit 0
fi
START=$SECONDS
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
echo "[gpu_check.sh] install: $((SECONDS - START)) s"
export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
status=0
python3 -m bench.gpu_check "$@" || status=$?
if [ -n "${OUT:-}" ]; then cp bench/RESULTS_gpu.md bench/RESULTS_gpu.json "$OUT"/ 2>/dev/null || true; fi
echo "[gpu_check.sh] total: $((SECONDS - START)) s (exit $status)"
exit $status
