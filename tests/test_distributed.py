"""DeepSpeed runs under the real launcher on CPU (gloo): ZeRO-1/2/3, 1 vs 2 ranks, budgets.

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

pytestmark = pytest.mark.distributed
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
    port = free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
           "--master_port", str(port), script, *args]
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
    leaked = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not leaked, f"DeepSpeed shm buffers left in /dev/shm (RAM) after the run: {leaked}"
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
        (2, "ds_configs/zero1.json", ["--max_tokens_per_microbatch", "128"]),
    ],  # ZeRO-3 + CPU offload == the reference: tests/test_sequence_parallel.py (N = 2, the same DeepSpeed path)
    ids=["zero3-2ranks-small-budget", "zero3-1rank-one-microbatch", "zero2-2ranks", "zero1-2ranks"],
)
def test_one_step_equals_reference(assets, reference, tmp_path, ranks, ds_config, extra):
    metrics, dump = run_one_step(assets, tmp_path, ranks, ds_config, extra)
    check_against_reference(metrics, dump, reference)


def train_args(assets, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", assets["model"], "--train_data", assets["train"], "--output_dir", str(out),
            "--ds", "ds_configs/zero3.json", "--max_tokens_per_microbatch", "128", *COMMON, *extra]


def test_resume_equals_uninterrupted(assets, tmp_path):
    """Train 4 steps saving at 2; a new run resumed from step 2 logs the same steps 3-4. Both under
    sequence parallelism (N = 2: the 2 ranks share each row); resuming without it is covered by
    test_preemption and test_multinode."""
    full = tmp_path / "full"
    sp = ["--sequence_parallel_size", "2"]
    launch("tests/dist_worker.py", train_args(assets, full, "--max_steps", "4", "--save_steps", "2",
                                              "--save_final", "false", *sp), ranks=2)
    assert sorted(p.name for p in (full / "checkpoints").glob("step_*")) == ["step_2", "step_4"]
    assert (full / "checkpoints" / "latest").read_text() == "step_4"
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(full / "checkpoints" / "step_2", resumed / "checkpoints" / "step_2")
    (resumed / "checkpoints" / "latest").write_text("step_2")
    launch("tests/dist_worker.py", train_args(assets, resumed, "--max_steps", "4", "--save_final", "false",
                                              "--resume_from_checkpoint", "latest", *sp), ranks=2)
    expected = {r["step"]: r for r in read_metrics(full)}
    got = read_metrics(resumed)
    assert [r["step"] for r in got] == [3, 4]
    for record in got:
        for name in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm", "lr"):
            assert_close(record[name], expected[record["step"]][name], f"step {record['step']} {name}")


def test_export_logits_equal_trained_engine(assets, tmp_path):
    """The exported final/ model (plain transformers) gives the trained ZeRO-3 engine's logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "export"
    launch("tests/dist_worker.py", train_args(assets, out, "--max_steps", "2", "--dump_logits",
                                              str(tmp_path / "logits.pt")), ranks=2)
    model = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    AutoTokenizer.from_pretrained(out / "final")
    from dist_worker import PROBE_IDS

    with torch.no_grad():
        logits = model(input_ids=PROBE_IDS, use_cache=False).logits
    expected = torch.load(tmp_path / "logits.pt")
    assert_close(logits, expected, "exported logits", scale=expected.abs().max().item())
    assert not (out / "final.partial").exists()


def test_lora_zero3_trains_adapter_only_and_exports(assets, tmp_path):
    """LoRA under ZeRO-3 (2 ranks): frozen weights unchanged, adapter trained, merged export loads
    and generates, adapter-only export applies to the base model with the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj,v_proj",
            "--learning_rate", "5e-2", "--max_steps", "2"]
    merged_dir, adapter_dir = tmp_path / "merged", tmp_path / "adapter"
    launch("tests/dist_worker.py", train_args(assets, merged_dir, *lora), ranks=2)
    launch("tests/dist_worker.py", train_args(assets, adapter_dir, *lora, "--save_adapter_only", "true"), ranks=2)

    base = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir / "final", dtype=torch.float32)
    base_sd, merged_sd = base.state_dict(), merged.state_dict()
    changed = {k for k in base_sd if not torch.equal(base_sd[k], merged_sd[k])}
    assert changed, "the LoRA delta never reached the merged export"
    assert all(".q_proj." in k or ".v_proj." in k for k in changed), f"frozen weights changed: {changed}"
    generated = merged.generate(torch.tensor([[1, 7, 8, 9]]), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9)

    assert (adapter_dir / "final" / "adapter_config.json").is_file()
    adapted = PeftModel.from_pretrained(base, adapter_dir / "final").merge_and_unload()
    ids = torch.tensor([[1, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        a, b = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
    assert_close(a, b, "adapter-only vs merged export", scale=b.abs().max().item())


def test_uneven_ranks_and_empty_rank_do_not_hang(tmp_path):
    """Pairs of very different lengths, a budget that forces splits, and a step of ONE pair on two
    ranks (rank 1 has nothing: it runs zero-weight fillers). Must finish well inside the timeout."""
    from run_assets import make_rows, write_jsonl

    assets = make_assets(tmp_path / "assets", pairs=8)
    write_jsonl(Path(assets["train"]), make_rows(24, seed=3, long_every=3))
    out = tmp_path / "uneven"
    args = train_args(assets, out, "--max_steps", "3", "--max_tokens_per_microbatch", "64", "--save_final", "false")
    launch("tests/dist_worker.py", args, ranks=2, timeout=240)
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    out1 = tmp_path / "one_pair"
    args = train_args(assets, out1, "--max_steps", "2", "--save_final", "false", "--train_batch_size", "1")
    launch("tests/dist_worker.py", args, ranks=2, timeout=240)
    records = read_metrics(out1)
    assert [r["step"] for r in records] == [1, 2] and all(r["loss"] > 0 for r in records)
