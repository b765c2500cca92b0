"""CLI contracts: recipes parse, bad configuration and bad data exit non-zero naming the key/column."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from run_assets import make_assets

from simpo_ds.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="disabled")
    return subprocess.run([sys.executable, "launch/train.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_every_recipe_parses(recipe):
    cfg = load_config(str(ROOT / "recipes" / recipe))
    assert cfg.model_name_or_path and cfg.train_data


def test_cli_overrides_and_booleans(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("beta: 2.5\npacking: true\nreport_to: [wandb]\n")
    cfg = load_config(str(recipe), ["--packing", "false", "--beta=3", "--eval_on_start", "--ds", "x.json"])
    assert (cfg.packing, cfg.beta, cfg.eval_on_start, cfg.deepspeed, cfg.report_to) == (False, 3.0, True, "x.json", ["wandb"])


def test_unknown_key_in_recipe_names_file_and_key(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("betta: 2.0\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'betta' in .*bad.yaml; did you mean 'beta'"):
        load_config(str(recipe))


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--no_such_key", "1"], "no_such_key"),
        (["--simpo_gamma", "1.0", "--gamma_beta_ratio", "0.5"], "'simpo_gamma' and 'gamma_beta_ratio'"),
        (["--max_length", "512", "--max_prompt_length", "512"], "max_prompt_length"),
        (["--loss_type", "ipo"], "loss_type"),
        (["--packing", "maybe"], "packing"),
        (["--train_data", "x.jsonl"], "model_name_or_path"),
        (["--prompt_sharing", "true", "--packing", "false"], "prompt_sharing"),
    ],
)
def test_config_errors_exit_nonzero_naming_the_key(args, needle):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("cli_assets"), pairs=8)


def test_missing_column_exits_naming_column_and_file(assets, tmp_path):
    bad = tmp_path / "no_rejected.jsonl"
    rows = [json.loads(line) for line in Path(assets["train"]).read_text().splitlines()]
    bad.write_text("".join(json.dumps({"chosen": r["chosen"]}) + "\n" for r in rows))
    result = run_cli("--model_name_or_path", assets["model"], "--train_data", str(bad),
                     "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "missing column 'rejected'" in result.stderr and "no_rejected.jsonl" in result.stderr
    assert not (tmp_path / "out" / "final").exists()


def test_missing_data_file_exits_naming_path(assets, tmp_path):
    result = run_cli("--model_name_or_path", assets["model"], "--train_data", str(tmp_path / "nope.jsonl"),
                     "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2 and "nope.jsonl" in result.stderr


@pytest.mark.parametrize(
    "ds_text,needle",
    [
        ('{"zero_optimization": {"stage": 0}}', "zero_optimization.stage must be 1, 2 or 3, got 0"),
        ('{"train_batch_size": "auto"}', "zero_optimization.stage must be 1, 2 or 3, got 0"),
        ('{"zero_optimization": {"stage": 3,}}', "not valid JSON"),
        ('{"zero_optimization": {"stage": 2, "sub_group_size": "auto"}}', "cannot fill 'auto' for zero_optimization.sub_group_size"),
    ],
    ids=["stage0", "no-zero-section", "bad-json", "unfillable-auto"],
)
def test_bad_deepspeed_config_exits_naming_file_and_key(assets, tmp_path, ds_text, needle):
    ds = tmp_path / "my_ds.json"
    ds.write_text(ds_text)
    result = run_cli("--model_name_or_path", assets["model"], "--train_data", assets["train"],
                     "--output_dir", str(tmp_path / "out"), "--ds", str(ds))
    assert result.returncode == 2, result.stderr[-3000:]
    assert needle in result.stderr and "my_ds.json" in result.stderr and "Traceback" not in result.stderr


def test_training_arguments_batch_mapping():
    assert load_config(None, ["--train_batch_size", "64"]).resolve_batch_size(4) == 64
    cfg = load_config(None, ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "16"])
    assert cfg.resolve_batch_size(4) == 128
    assert load_config(None, ["--per_device_train_batch_size", "3"]).resolve_batch_size(2) == 6


def test_readme_config_reference_is_current():
    """docs/configuration.md's table is generated (``python -m simpo_ds.config``): a new or changed key must show."""
    from simpo_ds.config import config_reference_markdown

    assert config_reference_markdown() in (ROOT / "docs" / "configuration.md").read_text(), \
        "regenerate the config table in docs/configuration.md"
