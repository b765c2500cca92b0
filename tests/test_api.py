"""The reference-style Python API: constructor contract, reference maths, the example script."""

from __future__ import annotations

import json
import math

import pytest
import torch
from reference import assert_close, assert_metrics_close, reference_step
from test_distributed import COMMON, launch
from test_packed_equivalence import varied_pairs
from tiny_models import tiny_model

from simpo_ds import SimPOConfig, SimPOTrainer
from simpo_ds.config import ConfigError

REFERENCE_METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                     "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"]


def make_trainer(**kw) -> SimPOTrainer:
    return SimPOTrainer(model="unused", args=SimPOConfig(**kw), train_dataset=[{"prompt": "a"}])


@pytest.mark.parametrize(
    "arg,value,needle",
    [
        ("data_collator", object(), "packs pairs itself"),
        ("model_init", lambda: None, "model="),
        ("optimizers", (object(), None), "DeepSpeed JSON"),
        ("preprocess_logits_for_metrics", lambda a, b: a, "never materialises"),
        ("compute_metrics", lambda p: {}, "logs the reference metrics"),
    ],
)
def test_unsupported_arguments_say_what_to_use(arg, value, needle):
    with pytest.raises(ValueError, match=needle):
        SimPOTrainer(model="m", args=SimPOConfig(), train_dataset=[{}], **{arg: value})


def test_peft_config_maps_onto_config_fields():
    from peft import LoraConfig

    args = SimPOConfig()
    SimPOTrainer(model="m", args=args, train_dataset=[{}],
                 peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["v_proj", "q_proj"]))
    assert (args.use_peft, args.lora_r, args.lora_alpha, args.lora_target_modules) == (True, 8, 16, ["q_proj", "v_proj"])
    with pytest.raises(ConfigError, match="use_rslora"):
        SimPOTrainer(model="m", args=SimPOConfig(), train_dataset=[{}], peft_config=LoraConfig(r=8, use_rslora=True))


def test_simpo_loss_hand_values():
    """chosen r=-1, rejected r=-2, beta=2, gamma/beta=0.25: z = 1 - 0.25 = 0.75, beta z = 1.5,
    sigmoid loss = log(1 + e^-1.5) = 0.201413; rewards = beta r = (-2, -4). Hinge: relu(1 - 1.5) = 0;
    with rejected -1.2: z = -0.05, beta z = -0.1, hinge = 1.1."""
    t = make_trainer(beta=2.0, gamma_beta_ratio=0.25)
    losses, chosen, rejected = t.simpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]))
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1.5)), rel=1e-6)
    assert (chosen.item(), rejected.item()) == (-2.0, -4.0)
    hinge = make_trainer(beta=2.0, gamma_beta_ratio=0.25, loss_type="hinge")
    assert hinge.simpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]))[0].item() == 0.0
    assert hinge.simpo_loss(torch.tensor([-1.0]), torch.tensor([-1.2]))[0].item() == pytest.approx(1.1, rel=1e-6)


def test_get_batch_logps_hand_values():
    """logits [1, 3, 2]; labels [-100, 1, 0]: position 0 predicts label 1 with logits (0, ln 3):
    log p = ln(3/4); position 1 predicts label 0 with logits (0, 0): log p = ln(1/2).
    average = (ln 0.75 + ln 0.5) / 2 = -0.490414; sum = -0.980829."""
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[-100, 1, 0]])
    expected = (math.log(0.75) + math.log(0.5))
    assert SimPOTrainer.get_batch_logps(logits, labels).item() == pytest.approx(expected / 2, rel=1e-6)
    assert SimPOTrainer.get_batch_logps(logits, labels, average_log_prob=False).item() == pytest.approx(expected, rel=1e-6)


def test_get_batch_loss_metrics_on_packed_batch_equals_reference():
    model = tiny_model("llama", seed=7)
    pairs = varied_pairs(5)
    t = make_trainer(sft_weight=0.2)
    loss, metrics = t.get_batch_loss_metrics(model, pairs, train_eval="train")
    ref_loss, _, ref_metrics = reference_step(model, pairs, sft_weight=0.2)
    assert_close(loss.item(), ref_loss.item(), "loss")
    assert_metrics_close(metrics, ref_metrics)
    chosen, rejected, _, _ = t.concatenated_forward(model, pairs)
    assert chosen.shape == rejected.shape == (len(pairs),)
    _, eval_metrics = t.get_batch_loss_metrics(model, pairs, train_eval="eval")
    assert set(eval_metrics) == {f"eval_{k}" for k in metrics}


@pytest.mark.distributed
def test_reference_style_example_under_deepspeed(tmp_path):
    """examples/reference_style.py (the reference script's last lines) with 2 CPU ranks (ZeRO-3, LoRA)
    returns every reference metric and writes the model into output_dir beside the run's files."""
    from run_assets import make_assets
    from transformers import AutoModelForCausalLM

    assets = make_assets(tmp_path / "assets", pairs=24)
    out = tmp_path / "out"
    args = ["--model_name_or_path", assets["model"], "--train_data", assets["train"], "--eval_data", assets["eval"],
            "--output_dir", str(out), "--ds", "ds_configs/zero3.json", "--max_steps", "2", "--use_peft", "true",
            "--lora_r", "4", "--lora_target_modules", "q_proj,v_proj", *COMMON]
    launch("examples/reference_style.py", args, ranks=2)
    results = json.loads((out / "all_results.json").read_text())  # the reference's save_metrics files
    assert results["epoch"] > 0 and results["train_samples"] == 24 and math.isfinite(results["train_loss"])
    for name in REFERENCE_METRICS + ["loss"]:
        assert name in results and f"eval_{name}" in results, name
    AutoModelForCausalLM.from_pretrained(out)  # save_model(output_dir), as the reference script
    assert (out / "metrics.jsonl").is_file() and (out / "trainer_state.json").is_file()
    assert "base_model:" in (out / "README.md").read_text()


@pytest.mark.distributed
def test_trainer_callback_stops_both_ranks_with_a_checkpoint(tmp_path):
    """A TrainerCallback setting control.should_training_stop at step 2 stops a 2-rank run at step 2
    on both ranks, with a checkpoint; on_log receives every logging event (train and eval)."""
    from run_assets import make_assets

    assets = make_assets(tmp_path / "assets", pairs=24)
    out = tmp_path / "out"
    events = out / "events"
    args = ["--model_name_or_path", assets["model"], "--train_data", assets["train"], "--eval_data",
            assets["eval"], "--output_dir", str(out), "--ds", "ds_configs/zero3.json", "--max_steps", "5",
            "--eval_steps", "1", *COMMON]
    launch("tests/callback_worker.py", args, ranks=2)
    seen = [json.loads((events / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert seen[0]["events"] == seen[1]["events"]
    events0 = seen[0]["events"]
    assert events0[0] == ["train_begin", 0, 5] and events0[-1] == ["train_end", 2]
    assert [e for e in events0 if e[0] in ("step_end", "save")] == [["step_end", 1], ["step_end", 2], ["save", 2]]
    assert (out / "checkpoints" / "step_2").is_dir() and (out / "checkpoints" / "latest").read_text() == "step_2"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if r["split"] in ("train", "eval")]
    assert [r["step"] for r in logged] == [1, 1, 2, 2]  # train 1, eval 1, train 2, final eval at 2
    assert len(seen[0]["logs"]) == len(logged) and seen[0]["log_history"] == seen[0]["logs"]
    for got, record in zip(seen[0]["logs"], logged):
        prefix = "eval_" if record["split"] == "eval" else ""
        assert got["step"] == record["step"] and got[f"{prefix}loss"] == pytest.approx(record["loss"], rel=1e-12)
