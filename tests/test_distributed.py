"""DeepSpeed runs under the real launcher on CPU (gloo): ZeRO-2/3/3+offload, 1 vs 2 ranks, budgets.

Each run trains the tiny model from disk for one step (``tests/dist_worker.py`` dumps the gathered
full gradients between backward and the optimizer step); the step-1 loss, metrics and gradients
must equal the single-process padded reference (princeton-nlp/SimPO maths) to 1e-5 relative.
Every launch has a timeout and kills its whole process group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import assert_close, assert_grads_close, assert_metrics_close, reference_step
from run_assets import make_assets, make_tokenizer

from simpo_ds.config import SimPOConfig
from simpo_ds.data.load import load_pairs, tokenize_dataset
from simpo_ds.trainer import PairData

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
COMMON = [
    "--train_batch_size", "8",
    "--max_length", "128",
    "--max_prompt_length", "64",
    "--learning_rate", "1e-3",
    "--report_to", "none",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, args: list[str], ranks: int, timeout: int = TIMEOUT_S, check: bool = True):
    """``deepspeed --num_gpus N script args`` in its own process group; killed whole on timeout."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
           "--master_port", str(free_port()), script, *args]
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"launch timed out after {timeout}s (process group killed):\n{out[-4000:]}")
    if check and proc.returncode != 0:
        pytest.fail(f"launch failed with exit code {proc.returncode}:\n{out[-6000:]}")
    return proc.returncode, out


def read_metrics(output_dir: Path, split: str = "train") -> list[dict]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"), arch="llama", pairs=48)


@pytest.fixture(scope="module")
def reference(assets):
    """Reference loss/metrics/grads of step 1 for the pairs the trainer picks (seeded permutation)."""
    from transformers import AutoModelForCausalLM

    cfg = SimPOConfig(max_length=128, max_prompt_length=64)
    data = PairData(tokenize_dataset(load_pairs(assets["train"]), make_tokenizer(), cfg)[0])
    model = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32, attn_implementation="sdpa")
    import numpy as np

    pair_ids = np.random.default_rng(cfg.seed).permutation(len(data))[:8]
    loss, _, metrics = reference_step(model, data.pairs(pair_ids))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return {"pair_ids": [int(i) for i in pair_ids], "metrics": metrics, "grads": grads, "loss": loss.item()}


def run_one_step(assets, tmp_path, ranks: int, ds_config: str, extra: list[str] = ()) -> tuple[dict, dict]:
    out = tmp_path / f"run_{ranks}_{Path(ds_config).stem}"
    dump = tmp_path / f"grads_{ranks}_{Path(ds_config).stem}.pt"
    args = ["--dump", str(dump), "--model_name_or_path", assets["model"], "--train_data", assets["train"],
            "--output_dir", str(out), "--ds", ds_config, "--max_steps", "1", "--save_final", "false",
            *COMMON, *extra]
    launch("tests/dist_worker.py", args, ranks)
    return read_metrics(out)[0], torch.load(dump)


def check_against_reference(metrics, dump, reference):
    assert dump["pair_ids"] == reference["pair_ids"]
    assert_metrics_close(metrics, reference["metrics"])
    assert_grads_close(dump["grads"], reference["grads"])


@pytest.mark.parametrize(
    "ranks,ds_config,extra",
    [
        (2, "ds_configs/zero3.json", ["--max_tokens_per_microbatch", "96"]),
        (1, "ds_configs/zero3.json", ["--max_tokens_per_microbatch", "4096"]),
        (2, "ds_configs/zero2.json", ["--max_tokens_per_microbatch", "128"]),
        (2, "ds_configs/zero3_offload.json", ["--max_tokens_per_microbatch", "128"]),
    ],
    ids=["zero3-2ranks-small-budget", "zero3-1rank-one-microbatch", "zero2-2ranks", "zero3-offload-2ranks"],
)
def test_one_step_equals_reference(assets, reference, tmp_path, ranks, ds_config, extra):
    metrics, dump = run_one_step(assets, tmp_path, ranks, ds_config, extra)
    check_against_reference(metrics, dump, reference)
