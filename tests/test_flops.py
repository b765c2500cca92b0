"""The FLOP count (``simpo_ds.flops``) against the matmuls actually executed, counted by
``torch.utils.flop_counter.FlopCounterMode`` on a tiny model, for packed, padded and prompt-sharing
rows — and the worked example of the module docstring."""

from __future__ import annotations

import random

import pytest
import torch
from test_packed_equivalence import make_pair
from tiny_models import tiny_model
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from simpo_ds.attention import SDPA_VARLEN, attention_kwargs, register_attention
from simpo_ds.data.packing import collate_packed, collate_padded
from simpo_ds.data.sharing import collate_shared
from simpo_ds.flops import batch_work, flop_shape, training_flops
from simpo_ds.loss import StepNormalizer, microbatch_loss
from simpo_ds.model import SimPOPolicy, prepare_model
from simpo_ds.config import SimPOConfig

register_attention()


def pairs(seed: int = 0):
    rng = random.Random(seed)
    return [make_pair(rng, 5, 7, 3), make_pair(rng, 2, 1, 9, seam=True), make_pair(rng, 11, 4, 4)]


def executed_flops(model, batch, impl: str) -> int:
    """Forward + backward of one micro-batch's loss; FLOPs counted by torch, rotary frequencies aside."""
    policy = SimPOPolicy(model, chunk_size=10_000, attn_kwargs_fn=lambda b: attention_kwargs(b, impl))  # one chunk
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):  # math sdpa: bmm, counted
        seq = policy(batch)
        loss, _ = microbatch_loss(seq, batch["chosen_seq"], batch["rejected_seq"], StepNormalizer(3, 10), beta=2.0,
                                  gamma_beta_ratio=0.25)
        loss.backward()
    rotary = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items()
                 if name.endswith("rotary_emb"))  # cos/sin table: inv_freq @ positions, no parameter
    return counter.get_total_flops() - rotary


@pytest.mark.parametrize(
    "layout,impl",
    [("packed", SDPA_VARLEN), ("packed", "eager"), ("padded", "eager"), ("shared", "eager")],
)
def test_count_equals_the_executed_matmuls(layout, impl):
    model = tiny_model(attn_implementation="sdpa" if impl == SDPA_VARLEN else impl)
    if impl == SDPA_VARLEN:
        model.config._attn_implementation = SDPA_VARLEN
    batch = {"packed": collate_packed, "padded": lambda p: collate_padded(p, 0), "shared": collate_shared}[layout](pairs())
    work = batch_work(batch, impl)
    expected = training_flops(flop_shape(model), work["processed"], work["head_rows"], work["pairs_computed"])
    assert executed_flops(model, batch, impl) == expected
    lengths = [len(p["chosen_input_ids"]) for p in pairs()] + [len(p["rejected_input_ids"]) for p in pairs()]
    if layout != "shared":  # needed: causal pairs of every sequence, whatever the path computes
        assert work["pairs_needed"] == sum(s * (s + 1) / 2 for s in lengths)
    if layout == "padded":
        assert work["pairs_computed"] == 6 * max(lengths) ** 2 and work["processed"] == 6 * max(lengths)


def test_lora_counts_no_weight_gradient_for_frozen_weights():
    cfg = SimPOConfig(use_peft=True, lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "k_proj", "v_proj"])
    model = prepare_model(tiny_model(attn_implementation="eager"), cfg)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)  # a non-zero B: the A gradient is then non-zero too
    batch = collate_packed(pairs())
    shape = flop_shape(model.get_base_model())
    assert 0 < shape.body_trainable < shape.body_params and not shape.head_trainable
    work = batch_work(batch, "eager")
    expected = training_flops(shape, work["processed"], work["head_rows"], work["pairs_computed"])
    assert executed_flops(model, batch, "eager") == expected


def test_worked_example_of_the_docstring():
    ex = [{"chosen_input_ids": [1, 10, 11, 20, 21], "chosen_prompt_len": 2, "rejected_input_ids": [1, 10, 30],
           "rejected_prompt_len": 2},
          {"chosen_input_ids": [1, 23, 24], "chosen_prompt_len": 1, "rejected_input_ids": [1, 31, 32],
           "rejected_prompt_len": 1}]
    # the §3 pairs with 3-token answer 20 21 22 -> here (P=2, C=3, R=1), (P=1, C=2, R=2)
    ex[0]["chosen_input_ids"] = [1, 10, 20, 21, 22]
    ex[0]["rejected_input_ids"] = [1, 10, 30]
    shape = flop_shape(tiny_model())
    assert (shape.body_params, shape.attn_width, shape.vocab) == (73_728, 64, 101)
    work = batch_work(collate_packed(ex), "varlen")
    assert (work["real"], work["head_rows"], work["pairs_needed"]) == (14, 8, 33)
    assert training_flops(shape, work["real"], work["head_rows"], work["pairs_needed"]) == 6_554_112
