"""Tiny random-weight fp32 causal LMs (GQA) for CPU tests: no hub, milliseconds to build."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM


def tiny_config(arch: str = "llama", vocab_size: int = 101, attn_implementation: str = "sdpa"):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    cfg = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    cfg._attn_implementation = attn_implementation
    return cfg


def tiny_model(arch: str = "llama", attn_implementation: str = "sdpa", seed: int = 0, vocab_size: int = 101):
    """A 2-layer, 64-wide Llama or Qwen2 (4 heads, 2 KV heads) in fp32 eval mode (no dropout)."""
    torch.manual_seed(seed)
    cls = LlamaForCausalLM if arch == "llama" else Qwen2ForCausalLM
    model = cls(tiny_config(arch, vocab_size, attn_implementation)).float()
    model.config.use_cache = False
    return model


def tiny_logit_transform_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """Tiny models whose ForCausalLM.forward post-processes lm_head's output (eager attention):
    ``gemma2`` final logit softcapping, ``cohere`` logit_scale (multiply), ``granite``
    logits_scaling (divide). Strong settings, so a reducer that skipped them would be far off."""
    from transformers import (CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, GraniteConfig,
                              GraniteForCausalLM)

    common = {k: v for k, v in tiny_config().to_dict().items() if k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
        "tie_word_embeddings")}
    if kind == "gemma2":
        cfg, cls = Gemma2Config(**common, head_dim=16, final_logit_softcapping=0.5, attn_logit_softcapping=None,
                                sliding_window=512), Gemma2ForCausalLM
    elif kind == "cohere":
        cfg, cls = CohereConfig(**common, logit_scale=4.0), CohereForCausalLM
    elif kind == "granite":
        cfg, cls = GraniteConfig(**common, logits_scaling=0.25), GraniteForCausalLM
    else:
        raise ValueError(kind)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    model.config.use_cache = False
    return model
