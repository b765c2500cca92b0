"""Model preparation: gradient checkpointing stays exact; LoRA merge math equals peft's."""

from __future__ import annotations

import torch
from reference import assert_grads_close, grads, reference_step
from test_packed_equivalence import packed_step, varied_pairs
from tiny_models import tiny_model

from simpo_ds.config import SimPOConfig
from simpo_ds.model import merge_lora_state_dict, prepare_model


def test_gradient_checkpointing_packed_equals_padded_reference():
    model = tiny_model("qwen2", seed=5)
    pairs = varied_pairs(4)
    loss, _, _ = reference_step(model, pairs)
    loss.backward()
    expected = grads(model)
    model = prepare_model(model, SimPOConfig(gradient_checkpointing=True))
    model.train()
    assert model.is_gradient_checkpointing
    packed_step(model, pairs, max_tokens=60, beta=2.0, gamma_beta_ratio=0.25)
    assert_grads_close(grads(model), expected)


def test_merge_lora_state_dict_equals_peft_merge():
    cfg = SimPOConfig(use_peft=True, lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"])
    model = prepare_model(tiny_model("llama", seed=6), cfg)
    with torch.no_grad():  # LoRA B starts at zero: give it values so the merge is non-trivial
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    merged = merge_lora_state_dict(model.state_dict(), cfg.lora_alpha / cfg.lora_r)
    reference = model.merge_and_unload().state_dict()
    assert merged.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(merged[key], reference[key], rtol=1e-6, atol=1e-6)
