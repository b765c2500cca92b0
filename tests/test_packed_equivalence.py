"""Packed == padded reference: per-sequence log-probs, loss, every metric and every gradient.

The reference is the princeton-nlp/SimPO computation on a padded batch: full logits from
``model(input_ids, attention_mask)``, ``get_batch_logps``, ``simpo_loss``, ``losses.mean()``, the
reference's metric definitions (and its CrossEntropyLoss for sft). The packed side is ours: one varlen
row, the chunked segment reducer and the step-normalised micro-batch loss.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import assert_close, assert_grads_close, assert_metrics_close, grads, reference_step
from tiny_models import tiny_model

from simpo_ds.attention import SDPA_VARLEN, attention_kwargs, register_attention
from simpo_ds.data.packing import collate_packed, plan_step
from simpo_ds.loss import StepNormalizer, finalize_metrics, microbatch_loss
from simpo_ds.model import SimPOPolicy

VOCAB = 101
register_attention()  # sdpa_varlen


def make_pair(rng: random.Random, prompt_len: int, chosen_len: int, rejected_len: int, seam: bool = False) -> dict:
    """A tokenized pair with random ids (never PAD); ``seam`` makes the two prompts differ in the last token."""
    prompt = [rng.randrange(1, VOCAB) for _ in range(prompt_len)]
    rprompt = list(prompt)
    if seam and prompt_len > 1:
        rprompt[-1] = rprompt[-1] % (VOCAB - 1) + 1
    chosen = [rng.randrange(1, VOCAB) for _ in range(chosen_len)]
    rejected = [rng.randrange(1, VOCAB) for _ in range(rejected_len)]
    if rejected[0] == chosen[0]:  # identical answers would tie (validation drops them anyway)
        rejected[0] = rejected[0] % (VOCAB - 1) + 1
    return {
        "chosen_input_ids": prompt + chosen,
        "chosen_prompt_len": prompt_len,
        "rejected_input_ids": rprompt + rejected,
        "rejected_prompt_len": prompt_len,
    }


def varied_pairs(seed: int = 0) -> list[dict]:
    """Very different lengths: 1-token answers, answers longer than prompts, a seam, a 1-token prompt."""
    rng = random.Random(seed)
    shapes = [(5, 1, 1), (3, 17, 2), (12, 4, 9), (1, 6, 3), (20, 2, 25), (4, 1, 13), (7, 30, 1), (2, 3, 3)]
    return [make_pair(rng, *shape, seam=(i == 2)) for i, shape in enumerate(shapes)]


def packed_step(model, pairs, max_tokens=10_000, chunk_size=7, **kw):
    """Our path for one step on one rank: plan -> micro-batches -> reducer -> normalised loss."""
    impl = model.config._attn_implementation
    policy = SimPOPolicy(model, chunk_size=chunk_size, attn_kwargs_fn=lambda b: attention_kwargs(b, impl))
    lengths = [len(p["chosen_input_ids"]) + len(p["rejected_input_ids"]) for p in pairs]
    norm = StepNormalizer(len(pairs), sum(len(p["chosen_input_ids"]) - p["chosen_prompt_len"] for p in pairs))
    return microbatched_step(policy, pairs, lengths, collate_packed, norm, max_tokens, **kw)


def microbatched_step(policy, pairs, lengths, collate, norm, max_tokens, **kw):
    """Plan ``pairs`` by ``lengths`` -> ``collate`` each micro-batch -> policy -> normalised loss,
    backward -> (per-sequence average log-probs [2P] float64: chosen then rejected, metrics)."""
    total_stats, avg_by_pair = 0, {}
    for micro in plan_step(lengths, 1, max_tokens)[0]:
        batch = collate([pairs[i] for i in micro.pairs])
        seq = policy(batch)
        loss, stats = microbatch_loss(seq, batch["chosen_seq"], batch["rejected_seq"], norm, weight=micro.weight, **kw)
        loss.backward()
        total_stats = total_stats + stats
        avg = seq.average.detach()
        for local, i in enumerate(micro.pairs):
            avg_by_pair[i] = (avg[2 * local].item(), avg[2 * local + 1].item())
    chosen = torch.tensor([avg_by_pair[i][0] for i in range(len(pairs))], dtype=torch.float64)
    rejected = torch.tensor([avg_by_pair[i][1] for i in range(len(pairs))], dtype=torch.float64)
    return torch.cat([chosen, rejected]), finalize_metrics(total_stats, kw.get("sft_weight", 0.0))


def check_equivalence(model, pairs, max_tokens=10_000, **kw):
    packed_impl = model.config._attn_implementation
    if packed_impl == SDPA_VARLEN:  # packed rows only: the padded reference runs the same weights with sdpa
        model.config._attn_implementation = "sdpa"
    ref_loss, ref_logps, ref_metrics = reference_step(model, pairs, **{k: v for k, v in kw.items()})
    ref_loss.backward()
    ref_grads = grads(model)
    model.config._attn_implementation = packed_impl
    loss_kw = dict(beta=kw.get("beta", 2.0), gamma_beta_ratio=kw.get("ratio", 0.25),
                   loss_type=kw.get("loss_type", "sigmoid"), label_smoothing=kw.get("eps", 0.0),
                   sft_weight=kw.get("sft_weight", 0.0))
    logps, metrics = packed_step(model, pairs, max_tokens=max_tokens, **loss_kw)
    assert_close(logps, ref_logps, "per-sequence average log-probs")
    assert_metrics_close(metrics, ref_metrics)
    assert_grads_close(grads(model), ref_grads)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager", "sdpa_varlen"])
def test_packed_equals_padded(arch, attn):
    model = tiny_model(arch, attn_implementation=attn, seed=1)
    check_equivalence(model, varied_pairs(0))


@pytest.mark.parametrize("kind", ["gemma2", "cohere", "granite"])
def test_models_that_post_process_logits(kind):
    """Gemma-2's final softcapping, Cohere's logit_scale, Granite's logits_scaling happen in the model's
    forward after lm_head; the reducer calls lm_head itself and must apply them too."""
    from tiny_models import tiny_logit_transform_model

    check_equivalence(tiny_logit_transform_model(kind, seed=4), varied_pairs(3))


def test_unknown_logit_scale_is_refused():
    from transformers import LlamaConfig

    from simpo_ds.config import ConfigError
    from simpo_ds.model import logits_transform

    assert logits_transform(LlamaConfig()) is None
    odd = LlamaConfig()
    odd.logits_scaling = 8.0  # e.g. a remote-code model: multiply or divide?
    with pytest.raises(ConfigError, match="model type 'llama' sets logits_scaling=8.0"):
        logits_transform(odd)


@pytest.mark.parametrize(
    "kw",
    [
        dict(loss_type="hinge"),
        dict(eps=0.1),
        dict(sft_weight=0.5),
        dict(beta=10.0, ratio=0.6),
    ],
    ids=["hinge", "label_smoothing", "sft_weight", "beta10"],
)
def test_packed_equals_padded_loss_variants(kw):
    model = tiny_model("llama", attn_implementation="sdpa", seed=2)
    check_equivalence(model, varied_pairs(1), **kw)


@pytest.mark.parametrize("max_tokens", [40, 64, 128])
def test_micro_batch_split_gives_same_step(max_tokens):
    """Many small micro-batches (token budget) == one padded batch: logps, metrics, gradients."""
    model = tiny_model("qwen2", attn_implementation="sdpa", seed=3)
    check_equivalence(model, varied_pairs(2), max_tokens=max_tokens, sft_weight=0.3)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=st.lists(
        st.tuples(st.integers(1, 24), st.integers(1, 24), st.integers(1, 24)), min_size=1, max_size=6
    ),
    max_tokens=st.integers(8, 120),
    seed=st.integers(0, 1000),
)
def test_property_packed_equals_padded(shapes, max_tokens, seed):
    rng = random.Random(seed)
    pairs = [make_pair(rng, *s, seam=bool(rng.getrandbits(1))) for s in shapes]
    model = tiny_model("llama", attn_implementation="sdpa", seed=4)
    check_equivalence(model, pairs, max_tokens=max_tokens, sft_weight=0.1)
