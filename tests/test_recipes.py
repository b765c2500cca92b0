"""Drop-in for princeton-nlp/SimPO users (issue 16): the reference's recipe format and key set, its
positional launch form, and ``accelerate launch`` with an accelerate DeepSpeed config.

A recipe written in the reference's shape (every key its ``training_configs/*-simpo*.yaml`` use, the
model and data pointed at local tiny assets, ``dataset_mixer`` with two local datasets and a
fraction) trains under the deepspeed launcher and under ``accelerate launch`` (2 CPU processes,
ZeRO-3) and gives the same step and eval metrics as the equivalent native config.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from run_assets import CHATML, make_assets, make_rows, write_jsonl
from test_distributed import ROOT, free_port, launch, read_metrics

from simpo_ds.config import ConfigError, load_config
from simpo_ds.data.mixer import load_split_kind
from simpo_ds.data.tokenize import DataError

COMPARED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "logits/chosen", "logits/rejected", "grad_norm", "lr")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny model; two mixer datasets (directories of train.jsonl / test.jsonl); the native files
    holding the same rows: A's train + the first half of B's train, A's test + B's test."""
    root = tmp_path_factory.mktemp("recipes")
    assets = make_assets(root, pairs=8)
    a, b = root / "mix_a", root / "mix_b"
    rows = {}
    for directory, seed, n in ((a, 10, 12), (b, 20, 10)):
        directory.mkdir()
        rows[directory] = (make_rows(n, seed), make_rows(4, seed + 1))
        write_jsonl(directory / "train.jsonl", rows[directory][0])
        write_jsonl(directory / "test.jsonl", rows[directory][1])
    assets["mix_a"], assets["mix_b"] = str(a), str(b)
    write_jsonl(root / "native_train.jsonl", rows[a][0] + rows[b][0][:5])
    write_jsonl(root / "native_eval.jsonl", rows[a][1] + rows[b][1])
    assets["native_train"], assets["native_eval"] = str(root / "native_train.jsonl"), str(root / "native_eval.jsonl")
    assets["b_train_rows"] = rows[b][0]
    return assets


def reference_format_recipe(assets, out: Path) -> Path:
    """Every key of the reference's SimPO training configs, in their shape (alignment-handbook)."""
    recipe = {
        # Model arguments
        "model_name_or_path": assets["model"], "torch_dtype": None, "attn_implementation": "sdpa",
        # Data training arguments
        "chat_template": CHATML,
        "dataset_mixer": {assets["mix_a"]: 1.0, assets["mix_b"]: 0.5},
        "dataset_splits": ["train", "test"], "preprocessing_num_workers": 1,
        # SimPOTrainer arguments
        "bf16": False, "beta": 2.5, "gamma_beta_ratio": 0.4, "do_eval": True, "evaluation_strategy": "steps",
        "eval_steps": 2, "gradient_accumulation_steps": 2, "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": False}, "hub_model_id": "simpo-exps",
        "learning_rate": "5e-4",  # PyYAML reads 5e-4 without a dot as a string
        "log_level": "info", "logging_steps": 1, "lr_scheduler_type": "cosine", "max_length": 128,
        "max_prompt_length": 64, "num_train_epochs": 1, "optim": "adamw_torch", "output_dir": str(out),
        "run_name": "tiny-simpo", "per_device_train_batch_size": 2, "per_device_eval_batch_size": 4,
        "push_to_hub": False, "save_strategy": "steps", "save_steps": 1000000, "report_to": ["none"],
        "save_total_limit": 20, "seed": 42, "warmup_ratio": 0.1,
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text("# Model arguments\n" + yaml.safe_dump(recipe, sort_keys=False).replace("learning_rate: '5e-4'", "learning_rate: 5e-4"))
    return path


def native_recipe(assets, out: Path) -> Path:
    recipe = {
        "model_name_or_path": assets["model"], "train_data": assets["native_train"], "eval_data": assets["native_eval"],
        "attn_implementation": "sdpa", "output_dir": str(out), "beta": 2.5, "gamma_beta_ratio": 0.4,
        "eval_steps": 2, "gradient_checkpointing": True, "learning_rate": 5e-4, "max_length": 128,
        "max_prompt_length": 64, "train_batch_size": 8, "report_to": [], "run_name": "tiny-simpo", "warmup_ratio": 0.1,
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_every_published_key_is_read_with_its_meaning(assets, tmp_path):
    cfg = load_config(str(reference_format_recipe(assets, tmp_path / "run")))
    assert cfg.learning_rate == 5e-4 and cfg.torch_dtype == "auto" and cfg.eval_strategy == "steps"
    assert cfg.dataset_num_proc == 1 and cfg.chat_template == CHATML and cfg.resolve_batch_size(2) == 8
    assert cfg.dataset_mixer == {assets["mix_a"]: 1.0, assets["mix_b"]: 0.5}


def test_unknown_and_unsupported_keys_are_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: x\ndataset_mixr: {a: 1.0}\n")
    with pytest.raises(ConfigError, match="unknown config key 'dataset_mixr'.*did you mean 'dataset_mixer'"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="'optim'.*adamw_torch, adamw_torch_fused"):
        load_config(None, ["--optim", "adafactor"])
    with pytest.raises(ConfigError, match="fraction of 'a' must be in"):
        load_config(None, ["--dataset_mixer", '{"a": 1.5}'])


def test_fraction_keeps_the_first_rows_of_the_train_split(assets):
    cfg = load_config(None, ["--dataset_mixer", json.dumps({assets["mix_b"]: 0.5})])
    train, evaluation = load_split_kind(cfg, "train"), load_split_kind(cfg, "test")
    expected = assets["b_train_rows"][:5]
    assert [r["chosen"] for r in train] == [r["chosen"] for r in expected]
    assert len(evaluation) == 4  # evaluation splits whole


def test_missing_mixer_split_names_entry_and_split(assets):
    cfg = load_config(None, ["--dataset_mixer", json.dumps({assets["mix_a"]: 1.0}), "--dataset_splits", "train_prefs"])
    with pytest.raises(DataError, match=r"mix_a'?, split 'train_prefs'"):
        load_split_kind(cfg, "train")


def test_push_to_hub_without_token_stops_before_training(assets, tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled", HF_TOKEN="", HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_TOKEN")
    cmd = [sys.executable, "launch/train.py", str(reference_format_recipe(assets, tmp_path / "push")),
           "--push_to_hub", "true", "--max_steps=1"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "config key 'push_to_hub' is true but no Hugging Face token is set" in result.stderr
    assert not (tmp_path / "push" / "metrics.jsonl").exists()  # stopped before any data or model work


def accelerate_launch(config: Path, args: list[str], timeout: int = 400) -> str:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "launch/train.py", *args]
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"accelerate launch timed out after {timeout}s")
    assert proc.returncode == 0, out[-5000:]
    return out


ACCELERATE_ZERO3 = """compute_environment: LOCAL_MACHINE
debug: false
deepspeed_config:
  deepspeed_multinode_launcher: standard
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: true
  zero3_save_16bit_model: true
  zero_stage: 3
distributed_type: DEEPSPEED
downcast_bf16: 'no'
machine_rank: 0
main_process_port: {port}
main_training_function: main
mixed_precision: 'no'
num_machines: 1
num_processes: 2
rdzv_backend: static
same_network: true
tpu_env: []
tpu_use_cluster: false
tpu_use_sudo: false
use_cpu: false
"""


@pytest.mark.distributed
def test_reference_recipe_under_deepspeed_and_accelerate_equals_native(assets, tmp_path):
    steps = ["--max_steps=4"]  # the reference's --key=value form
    native = tmp_path / "native"
    launch("launch/train.py", ["--config", str(native_recipe(assets, native)), "--ds", "ds_configs/zero3.json",
                               "--max_steps", "4"], ranks=2)
    runs = {"native": native, "deepspeed": tmp_path / "deepspeed", "accelerate": tmp_path / "accelerate"}
    out = launch("launch/train.py", [str(reference_format_recipe(assets, runs["deepspeed"])), "--ds",
                                     "ds_configs/zero3.json", *steps], ranks=2)[1]
    assert "config key 'per_device_eval_batch_size' is accepted for recipe compatibility and has no effect" in out
    config = tmp_path / "deepspeed_zero3.yaml"
    config.write_text(ACCELERATE_ZERO3.format(port=free_port()))
    out = accelerate_launch(config, [str(reference_format_recipe(assets, runs["accelerate"])), *steps])
    assert "DeepSpeed: ZeRO-3 from the accelerate launch config" in out, out[-3000:]
    records = {name: read_metrics(path) for name, path in runs.items()}
    evals = {name: read_metrics(path, "eval") for name, path in runs.items()}
    assert [r["step"] for r in records["native"]] == [1, 2, 3, 4] and [r["step"] for r in evals["native"]] == [2, 4]
    for name in ("deepspeed", "accelerate"):
        assert [r["step"] for r in records[name]] == [1, 2, 3, 4] and [r["step"] for r in evals[name]] == [2, 4]
        for got, expected in zip(records[name] + evals[name], records["native"] + evals["native"]):
            for key in COMPARED:
                if key in expected:
                    assert abs(got[key] - expected[key]) <= 1e-6 * max(abs(expected[key]), 1e-3), (name, key, got, expected)
    data = {name: [r for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines()) if r["split"] == "data"]
            for name, path in runs.items()}
    assert data["accelerate"][0]["kept"] == data["native"][0]["kept"] == 17  # 12 rows of A + the first 5 of B


def test_accelerate_settings_become_the_deepspeed_config(monkeypatch, tmp_path):
    """ZeRO stage, offload devices, mixed precision and deepspeed_config_file from accelerate's
    environment go through the one place that fills "auto"."""
    import torch

    from simpo_ds.config import SimPOConfig
    from simpo_ds.engine import fill_ds_config, launcher_dtype

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "cpu")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    cfg = SimPOConfig()
    ds = fill_ds_config(None, cfg, 2, torch.bfloat16, 64)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    assert zero["reduce_bucket_size"] == 64 * 64 and ds["bf16"] == {"enabled": True}
    assert ds["zero_force_ds_cpu_optimizer"] is False  # the client AdamW runs on the offloaded copy
    assert launcher_dtype("auto") == "bfloat16" and launcher_dtype("float32") == "float32"
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")
    assert fill_ds_config(None, cfg, 2, torch.float32, 64)["zero_optimization"] == {"stage": 2, "offload_param": {"device": "cpu", "pin_memory": True}}
    own = tmp_path / "own.json"
    own.write_text('{"zero_optimization": {"stage": 1}, "gradient_clipping": "auto"}')
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(own))
    assert fill_ds_config(None, cfg, 2, torch.float32, 64)["zero_optimization"]["stage"] == 1
