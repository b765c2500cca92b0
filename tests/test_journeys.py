"""User journeys around the core (issue 23), written from the user's side: the reference's launch
line and last lines, a rollback, a preemption seen from Python, the DeepSpeed JSON of the
transformers docs, callbacks as the transformers Trainer calls them. One test per item.

The runs share ONE single-process worker (tests/journeys_worker.py, ~1 min): it trains with
``SimPOTrainer`` as a reference-style script does; these tests read what it left behind. The on-policy,
data and attention journeys are in test_journeys_onpolicy.py, test_journeys_data.py and
test_journeys_attention.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_assets import make_assets

from simpo_ds.cli import EXIT_PREEMPTED, _split_args
from simpo_ds.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def journeys(tmp_path_factory):
    """Run tests/journeys_worker.py once -> (out dir, exit code, log)."""
    base = tmp_path_factory.mktemp("journeys")
    assets = {k: str(v) for k, v in make_assets(base / "assets", pairs=24).items()}
    (base / "assets.json").write_text(json.dumps(assets))
    out = base / "out"
    out.mkdir()
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    done = subprocess.run([sys.executable, "tests/journeys_worker.py", str(base / "assets.json"), str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    return out, done.returncode, done.stdout + done.stderr


def journey(journeys, name: str) -> Path:
    """The worker's output dir once journey ``name`` ran through (else its traceback fails the test)."""
    out, _, log = journeys
    error = out / f"{name}.error"
    assert not error.exists(), error.read_text()
    assert (out / f"{name}.json").is_file(), log[-6000:]
    return out


def reference_recipe(path: Path) -> Path:
    """A recipe in the reference's training_configs/ format (its keys, its values)."""
    path.write_text(
        "model_name_or_path: princeton-nlp/Llama-3-Base-8B-SFT\ntorch_dtype: null\n"
        "dataset_mixer:\n  HuggingFaceH4/ultrafeedback_binarized: 1.0\n"
        "dataset_splits:\n- train_prefs\n- test_prefs\npreprocessing_num_workers: 12\n"
        "bf16: true\nbeta: 2.0\ngamma_beta_ratio: 0.5\ndo_eval: true\nevaluation_strategy: steps\neval_steps: 400\n"
        "gradient_accumulation_steps: 16\ngradient_checkpointing: true\nlearning_rate: 6.0e-7\n"
        "lr_scheduler_type: cosine\nmax_length: 2048\nmax_prompt_length: 1800\nnum_train_epochs: 1\n"
        "output_dir: outputs/llama-3-8b-base-simpo\nper_device_train_batch_size: 2\npush_to_hub: false\n"
        "save_strategy: steps\nsave_steps: 1000000\nseed: 42\nwarmup_ratio: 0.1\n")
    return path


# ---- 1. the reference's launch line ---------------------------------------------------------
def test_1_reference_launch_line_keeps_every_value_as_typed(tmp_path):
    """`run_simpo.py recipe.yaml --key=value` with hub ids and paths full of dashes: values are kept
    as typed (only a key's dashes become underscores)."""
    argv = [str(reference_recipe(tmp_path / "llama-3-8b-base-simpo.yaml")),
            "--model_name_or_path=meta-llama/Meta-Llama-3-8B-Instruct", "--output_dir=outputs/my-run-2",
            "--hub-model-id=me/llama-3-8b-simpo-v0.2", "--learning-rate", "1e-6", "--run_name=a-b_c"]
    cfg = load_config(*_split_args(argv))
    assert cfg.model_name_or_path == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert cfg.output_dir == "outputs/my-run-2" and cfg.run_name == "a-b_c"
    assert cfg.hub_model_id == "me/llama-3-8b-simpo-v0.2" and cfg.learning_rate == 1e-6
    assert cfg.dataset_mixer == {"HuggingFaceH4/ultrafeedback_binarized": 1.0}


# ---- 2. save_model(output_dir) --------------------------------------------------------------
def test_2_save_model_into_output_dir_keeps_the_run(journeys):
    """The reference script's `trainer.save_model(training_args.output_dir)`: the model lands in
    output_dir, and checkpoints/, metrics.jsonl and the resolved config stay."""
    from transformers import AutoModelForCausalLM

    run = journey(journeys, "reference") / "run"
    assert (run / "checkpoints" / "latest").is_file() and (run / "metrics.jsonl").stat().st_size > 0
    assert (run / "run_config.yaml").is_file() and (run / "trainer_state.json").is_file()
    assert json.loads((run / "config.json").read_text())["use_cache"] is True  # the script's own last line
    assert AutoModelForCausalLM.from_pretrained(run).config.vocab_size > 0
    assert not [p for p in [*run.parent.iterdir(), *run.iterdir()] if p.name.startswith(".")]  # no staging left
    assert not (run / "final").exists()  # SimPOTrainer.train() leaves the export to the script's save_model


def test_2_an_export_replaces_model_files_only(tmp_path):
    """Into a directory holding the user's files and an earlier adapter export: the adapter (which
    transformers would load instead) and stale shards go, everything else stays; a failed export
    leaves the earlier one whole."""
    from simpo_ds.io import install_model_files, staging_dir

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    for name in ("metrics.jsonl", "notes.txt", "adapter_config.json", "adapter_model.safetensors",
                 "model-00001-of-00002.safetensors", "model.safetensors.index.json"):
        (out / name).write_text("old")
    staged = staging_dir(out)
    for name in ("model.safetensors", "config.json"):
        (staged / name).write_text("new")
    removed = install_model_files(staged, out)
    assert removed == ["adapter_config.json", "adapter_model.safetensors", "model-00001-of-00002.safetensors",
                       "model.safetensors.index.json"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json", "metrics.jsonl",
                                                       "model.safetensors", "notes.txt"]
    assert not staged.exists() and (out / "model.safetensors").read_text() == "new"


# ---- 3. a rollback ----------------------------------------------------------------------------
def test_3_rollback_starts_a_branch_and_latest_follows_it(journeys):
    """Run A saved step_2 and step_4; run B resumed from step_2 (keeping 1 checkpoint) and saved
    step_3. step_4 of the abandoned branch is kept aside; `latest` names the new branch's step_3."""
    from simpo_ds.engine import resolve_checkpoint

    root = journey(journeys, "rollback") / "run" / "checkpoints"
    (moved,) = list((root / "abandoned").iterdir())
    assert moved.name.endswith("_after_step_2") and [p.name for p in moved.iterdir()] == ["step_4"]
    assert sorted(p.name for p in root.glob("step_*")) == ["step_3"]
    assert resolve_checkpoint(root, "latest") == root / "step_3" == resolve_checkpoint(root, "auto")
    assert "a new branch starts here" in journeys[2]


# ---- 7. the DeepSpeed JSON users have ----------------------------------------------------------
DOCS_JSON = {"fp16": {"enabled": "auto", "loss_scale": 0}, "bf16": {"enabled": "auto"},
             "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                       "weight_decay": "auto"}},
             "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                               "warmup_num_steps": "auto", "total_num_steps": "auto"}},
             "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"},
             "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
             "train_micro_batch_size_per_gpu": "auto"}


def fill(tmp_path, ds: dict, dtype=torch.float32, **cfg_values):
    from simpo_ds.config import SimPOConfig
    from simpo_ds.engine import fill_ds_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    cfg = SimPOConfig(learning_rate=5e-7, **cfg_values)
    return fill_ds_config(str(path), cfg, 8, dtype, 64, global_batch=cfg.resolve_batch_size(8), dp_size=8,
                          total_steps=100, warmup_steps=10)


def test_7_transformers_docs_json_trains_and_its_autos_follow_the_run(journeys, tmp_path):
    """The docs' ZeRO-3 + offload JSON trained run A as it is; its autos follow the run (fp32 here):
    fp16/bf16 off, the optimizer's params from the run, the scheduler block not used (the trainer's)."""
    ds = json.loads((journey(journeys, "reference") / "reference.json").read_text())["ds_config"]
    assert ds["fp16"]["enabled"] is False and ds["bf16"]["enabled"] is False and "scheduler" not in ds
    assert ds["optimizer"]["params"] == {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
    bf16 = fill(tmp_path, DOCS_JSON, torch.bfloat16)
    assert bf16["bf16"]["enabled"] is True and bf16["fp16"]["enabled"] is False and "scheduler" not in bf16


def test_7_explicit_values_that_contradict_the_run_are_named(tmp_path):
    """As transformers' Trainer: every explicit value contradicting the run is listed in one error."""
    ds = json.loads(json.dumps(DOCS_JSON))
    ds["fp16"]["enabled"] = True
    ds["optimizer"]["params"]["lr"] = 1e-5
    ds["scheduler"]["params"]["warmup_num_steps"] = 500
    ds["train_batch_size"] = 64
    ds["gradient_clipping"] = 0.5
    with pytest.raises(ConfigError) as err:
        fill(tmp_path, ds)  # fp32 run, lr 5e-7, 128 pairs, 10 warmup steps, max_grad_norm 1.0
    text = str(err.value)
    for needle in ("fp16.enabled=true", "optimizer.params.lr=1e-05", "scheduler.params.warmup_num_steps=500",
                   "train_batch_size=64", "gradient_clipping=0.5"):
        assert needle in text, text
    agreeing = {**json.loads(json.dumps(DOCS_JSON)), "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 8}
    assert fill(tmp_path, agreeing, per_device_train_batch_size=2, gradient_accumulation_steps=8)["train_batch_size"] == 8


# ---- 8. --train_batch_size over a recipe's per-device batch ------------------------------------
def test_8_train_batch_size_on_the_command_line_replaces_the_recipes_per_device_form(tmp_path):
    """All reference recipes set per_device_train_batch_size / gradient_accumulation_steps; the
    resume error advises --train_batch_size N: the flag now wins. Both forms in one source,
    disagreeing, is an error naming both."""
    recipe = str(reference_recipe(tmp_path / "r.yaml"))
    assert load_config(recipe, []).resolve_batch_size(4) == 2 * 16 * 4
    assert load_config(recipe, ["--train_batch_size", "64"]).resolve_batch_size(4) == 64
    assert load_config(recipe, ["--gradient_accumulation_steps", "4"]).resolve_batch_size(4) == 2 * 4 * 4
    both = tmp_path / "both.yaml"
    both.write_text("train_batch_size: 64\nper_device_train_batch_size: 2\n")
    with pytest.raises(ConfigError, match="'train_batch_size' .*'per_device_train_batch_size'.* disagree"):
        load_config(str(both), []).resolve_batch_size(4)
    assert load_config(str(both), []).resolve_batch_size(32) == 64  # 2 x 1 x 32 agrees


# ---- 9. push_to_hub ----------------------------------------------------------------------------
def test_9_push_to_hub_pushes_the_model_and_never_the_checkpoints(journeys):
    """push_to_hub: true with the reference's last lines: save_model pushes ("Model save", as the
    transformers Trainer), trainer.push_to_hub(**kwargs) pushes with the model card; checkpoints/ never."""
    pushes = json.loads((journey(journeys, "reference") / "hub" / "pushes.json").read_text())
    assert [(p["repo_id"], p["message"]) for p in pushes] == [("me/simpo-tiny", "Model save"),
                                                              ("me/simpo-tiny", "End of training")]
    for push in pushes:
        assert "model.safetensors" in push["files"] and "config.json" in push["files"]
        assert not [f for f in push["files"] if f.startswith(("checkpoints/", "final/", "."))]
    assert "README.md" in pushes[1]["files"]
    card = (journeys[0] / "hub" / "1" / "README.md").read_text()
    assert "base_model:" in card and "alignment-handbook" in card


# ---- 10. callbacks as the transformers Trainer calls them ---------------------------------------
def test_10_callbacks_order_names_and_control(journeys):
    """on_step_end -> on_log -> on_evaluate -> on_save; learning_rate (not lr) and epoch in train
    logs; a named eval set reports eval_{name}_*; control.should_log / should_evaluate are honoured."""
    events = json.loads((journey(journeys, "reference") / "reference.json").read_text())["events"]
    hooks = [(e[0], e[1]) for e in events]
    assert hooks == [("on_step_end", 1), ("on_log", 1), ("on_log", 1), ("on_evaluate", 1),  # asked at step 1
                     ("on_step_end", 2), ("on_log", 2), ("on_save", 2),  # logging_steps 2, save_steps 2
                     ("on_step_end", 3),
                     ("on_step_end", 4), ("on_log", 4), ("on_log", 4), ("on_evaluate", 4), ("on_save", 4)]
    train_keys, eval_keys = events[1][2], events[2][2]
    assert "learning_rate" in train_keys and "lr" not in train_keys and "epoch" in train_keys
    assert "eval_uf_loss" in eval_keys and "eval_loss" not in eval_keys and events[3][2] == eval_keys


# ---- 11. a preemption seen from the Python API --------------------------------------------------
def test_11_preempted_train_stops_the_script_with_exit_3(journeys):
    """SIGUSR1 during SimPOTrainer.train(): a checkpoint, then TrainingPreempted — the script's
    save_model line after train() never runs, and the process exits 3 (requeue)."""
    out, code, log = journeys
    assert code == EXIT_PREEMPTED, log[-4000:]
    run = out / "preempted"
    assert (run / "checkpoints" / "latest").read_text() == "step_2"
    assert not (run / "exported_after_train").exists() and not (run / "model.safetensors").exists()


# ---- 16. what the code cites exists ---------------------------------------------------------------
def test_16_citations_version_and_run_config(journeys):
    """Every `docs/design.md §N` cited in code and docs exists; the version is written once;
    `simpo-ds plot` reads the config the trainer writes."""
    from simpo_ds import __version__
    from simpo_ds.plot import load_config as plot_config

    design = (ROOT / "docs" / "design.md").read_text()
    cited = set()
    for path in [*ROOT.glob("simpo_ds/**/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("docs/*.md"), ROOT / "README.md"]:
        text = path.read_text()
        assert "DESIGN" + ".md" not in text and "DESIGN" + " §" not in text, f"{path} cites a file the repository lacks"
        cited |= set(re.findall(r"docs/design\.md §(\d)", text))
    assert cited and all(f"## §{n} " in design for n in cited), cited
    assert re.search(r'version=VERSION', (ROOT / "setup.py").read_text()) and re.fullmatch(r"\d+\.\d+\.\d+", __version__)
    config, source = plot_config(out := journey(journeys, "reference") / "run", None)
    assert source == "run_config.yaml" and config["output_dir"] == str(out) and config["train_batch_size"] == 8
