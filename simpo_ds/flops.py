"""Honest FLOP accounting: what a SimPO micro-batch needs, and what its attention path computes.

One function, :func:`training_flops`, counts the matmul FLOPs of a forward + backward::

    body  (4·N_body − 2·N_no_input_grad + 2·N_body_trainable) · body_tokens   decoder matmul weights, NO
                                                            embedding (a lookup)
    head  (4 + 2·[lm_head trainable]) · H · V · head_rows   only the answer-label rows reach the lm_head
    attn  12 · L · H_q · attn_pairs                         QKᵀ and AV: 2·H_q FLOPs per (query, key) pair
                                                            each, forward; the backward costs twice that

where a matmul with a weight of N elements costs 2·N per token forward, 2·N for the input gradient and
2·N for the weight gradient (skipped for frozen weights: LoRA's base, a frozen head). N_no_input_grad:
when the embedding and the first layer's input norm are frozen (LoRA), nothing before the first
layer's q/k/v projections (and their LoRA A matrices) needs a gradient, so neither does their input
(a first-layer key or value projection without an adapter also spares one attention-backward bmm:
not modelled, under 1/(6·L) of the attention term).
Recomputation
(gradient checkpointing, the reducer's chunks) is not counted, as MFU is defined.

``attn_pairs`` is the number of (query, key) score elements, summed over sequences:

- needed (``tflops_per_device`` and ``mfu``): causal pairs of what attends to what — Σ s(s+1)/2 over
  the sequences of a packed or padded row; for prompt sharing the pairs the mask allows,
  Σ [c(c+1) + r(r+1) − p(p+1)]/2 with p the shared prompt. Both are ``(seq_sq_sum + tokens) / 2``.
- computed (``tflops_computed_per_device``): what the attention path evaluates — the varlen /
  FlashAttention / FlexAttention kernels skip masked blocks (≈ needed); ``sdpa_varlen`` runs one sdpa
  per sequence (s² each); a dense mask path computes every element of its square: T² for a packed
  row through sdpa/eager, R·L² for R padded rows of width L. Their ratio shows a path's waste.

Worked example — tests/tiny_models.py's Llama (2 layers, H = H_q = 64, V = 101; per layer q, o 64×64,
k, v 64×32, gate, up, down 64×128: N_body = 73,728 matmul weights, all trainable), one packed row of
the sequences [5, 3, 3, 3] (T = 14 tokens, 8 answer-label rows; docs/design.md §3's example)::

    body  6 · 73,728 · 14                 =  6,193,152
    head  6 · 64 · 101 · 8                =    310,272
    attn  12 · 2 · 64 · (15 + 6 + 6 + 6)  =     50,688     (needed: Σ s(s+1)/2 = 33 pairs)
    total                                    6,554,112 FLOPs

The same pairs padded to 4 rows of width 5 compute the body on 20 tokens and attention over
4 · 25 = 100 pairs; tests/test_flops.py checks every term against
``torch.utils.flop_counter.FlopCounterMode`` on that tiny model for packed, padded and prompt-sharing rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DENSE_ATTENTION = ("sdpa", "eager")  # evaluate the whole (masked) square of their row
BLOCK_SPARSE_ATTENTION = ("flash_attention_2", "varlen", "prompt_sharing_flex")  # skip masked blocks


@dataclass(frozen=True)
class FlopShape:
    """What the FLOP count needs to know about a model (from :func:`flop_shape`)."""

    layers: int
    attn_width: int  # H_q = num_attention_heads · head_dim (queries; GQA shares keys, not the score work)
    hidden: int
    vocab: int
    body_params: int  # matmul weight elements of the decoder layers (no embedding, no norms)
    body_trainable: int
    body_no_input_grad: int  # weights whose input needs no gradient (module docstring)
    head_trainable: bool


def training_flops(shape: FlopShape, body_tokens: float, head_rows: float, attn_pairs: float) -> float:
    """Forward + backward matmul FLOPs (module docstring: formula and worked example)."""
    body = (4 * shape.body_params - 2 * shape.body_no_input_grad + 2 * shape.body_trainable) * body_tokens
    head = (4 + 2 * int(shape.head_trainable)) * shape.hidden * shape.vocab * head_rows
    attn = 12 * shape.layers * shape.attn_width * attn_pairs
    return float(body + head + attn)


def _numel(param: torch.Tensor) -> int:
    return int(getattr(param, "ds_numel", param.numel()))  # ZeRO-3 partitions: the full size


def flop_shape(causal_lm: torch.nn.Module) -> FlopShape:
    """Count the decoder layers' ``nn.Linear`` weights (LoRA adapters included, as trainable) and
    read the attention width, vocabulary and head trainability of a transformers causal LM."""
    config = causal_lm.config.get_text_config() if hasattr(causal_lm.config, "get_text_config") else causal_lm.config
    body_params = body_trainable = 0
    decoder = causal_lm.get_decoder()
    for module in decoder.modules():
        if isinstance(module, torch.nn.Linear):
            body_params += _numel(module.weight)
            body_trainable += _numel(module.weight) if module.weight.requires_grad else 0
    no_input_grad = 0
    first = decoder.layers[0] if hasattr(decoder, "layers") else None
    embed_frozen = not any(p.requires_grad for p in causal_lm.get_input_embeddings().parameters())
    if first is not None and embed_frozen and not any(
            p.requires_grad for n, p in first.named_parameters() if "input_layernorm" in n):
        no_input_grad = sum(_numel(m.weight) for n, m in first.named_modules() if isinstance(m, torch.nn.Linear)
                            and n.split(".")[1:2] in (["q_proj"], ["k_proj"], ["v_proj"], ["qkv_proj"])
                            and "lora_B" not in n)
    head = causal_lm.get_output_embeddings()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return FlopShape(layers=config.num_hidden_layers, attn_width=config.num_attention_heads * head_dim,
                     hidden=config.hidden_size, vocab=_numel(head.weight) // config.hidden_size,
                     body_params=body_params, body_trainable=body_trainable, body_no_input_grad=no_input_grad,
                     head_trainable=head.weight.requires_grad)


def batch_work(batch: dict, attn_impl: str) -> dict[str, float]:
    """The counts of one collated micro-batch (packed, padded or prompt-sharing):

    real        tokens that are data (a prompt-sharing row: its shared prompts once)
    effective   the same pairs in the unshared layout (prompt twice; = real unless prompt sharing)
    processed   tokens the body computes (padding included)
    head_rows   answer-label rows that reach the lm_head
    pairs_needed, pairs_computed   attention score elements (module docstring)
    """
    real = float(batch["num_tokens"])
    if "role_ids" in batch:  # prompt sharing: one [prompt | chosen | rejected] segment per pair
        seq_sq, widths = float(batch["seq_sq_sum"]), [batch["input_ids"].shape[-1]]
        effective = float(batch["unshared_tokens"])
    else:
        if "cu_seqlens" in batch:
            lengths = (batch["cu_seqlens"][1:] - batch["cu_seqlens"][:-1]).double()
            widths = [batch["input_ids"].shape[-1]]
        else:
            lengths = batch["attention_mask"].sum(-1).double()
            widths = [batch["input_ids"].shape[-1]] * batch["input_ids"].shape[0]
        seq_sq, effective = float((lengths**2).sum()), real
    needed = (seq_sq + real) / 2
    if attn_impl in BLOCK_SPARSE_ATTENTION and "attention_mask" not in batch:
        computed = needed
    elif attn_impl == "sdpa_varlen" and "cu_seqlens" in batch:
        computed = seq_sq
    else:  # a dense (masked) square per row
        computed = float(sum(w * w for w in widths))
    return {"real": real, "effective": effective, "processed": float(batch["input_ids"].numel()),
            "head_rows": float(batch["pred_positions"].numel()), "pairs_needed": needed, "pairs_computed": computed}


WORK_KEYS = ("real", "effective", "processed", "head_rows", "pairs_needed", "pairs_computed")
