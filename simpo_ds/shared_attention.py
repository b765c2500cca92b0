"""Attention for prompt-sharing rows: backend choice, the mask passed to the model, and FlexAttention.

A shared row (``simpo_ds.data.sharing.collate_shared``) lays each pair out once as
[prompt | chosen | rejected]; rejected must not see chosen, so block-diagonal-causal kernels
(``varlen``, ``flash_attention_2``) cannot run it. The model is called as::

    body(input_ids=[1, T], position_ids=[1, T], attention_mask=prompt_sharing_mask(batch, impl, dtype),
         use_cache=False)

transformers 5 passes any 4-D ``attention_mask`` (tensor or ``BlockMask``) through unchanged
(``masking_utils._preprocess_mask_arguments`` returns early on ``len(mask.shape) == 4``), for every model
and every attention implementation. Per backend:

- ``sdpa``: a dense bool [1, 1, T, T] mask (True = attend) -> ``scaled_dot_product_attention(attn_mask=...)``;
- ``eager``: a dense additive [1, 1, T, T] mask in the model dtype (0 / finfo.min): eager adds it to the scores;
- ``prompt_sharing_flex`` (CUDA; chosen by ``auto``): :func:`flex_shared_attention_forward`, registered
  through ``transformers.AttentionInterface``, runs ``torch.nn.attention.flex_attention`` (compiled) with
  a ``BlockMask`` built from the row's segment/role ids: no T x T tensor, fully masked 128 x 128 blocks
  skipped. FlexAttention has no CPU backward (torch 2.13), so CPU training uses sdpa/eager; the CPU tests
  check the mask_mod against the dense mask and run the registered function's forward on CPU.
"""

from __future__ import annotations

import torch

from simpo_ds.attention import check_attention_features, refuse_attn_implementation
from simpo_ds.data.sharing import shared_attention_allowed, shared_attention_mask

FLEX = "prompt_sharing_flex"
DENSE = ("sdpa", "eager")

_UNSUPPORTED = (
    "only does block-diagonal causal attention: prompt_sharing needs an attention that takes a "
    "[prompt | chosen | rejected] mask (rejected must not see chosen). Use attn_implementation 'auto' "
    "(FlexAttention on CUDA, sdpa on CPU), 'sdpa' or 'eager' — or set prompt_sharing false"
)


# ---------------------------------------------------------------------------------------------------
# Backend choice
# ---------------------------------------------------------------------------------------------------


def flex_available() -> bool:
    """True when this torch ships ``torch.nn.attention.flex_attention`` (torch >= 2.5)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except Exception:
        return False
    return True


def choose_shared_attn_implementation(requested: str, device_type: str) -> str:
    """``attn_implementation`` for a prompt-sharing run (replaces ``choose_attn_implementation``).

    ``auto``: ``prompt_sharing_flex`` on CUDA (FlexAttention available; registered here), else ``sdpa``.
    ``sdpa`` / ``eager``: as asked (dense T x T mask). Anything else (``varlen``, ``sdpa_varlen``,
    ``flash_attention_2``, FlexAttention off CUDA): a :class:`ConfigError` naming ``attn_implementation``
    and saying what to use instead.
    """
    if requested in ("varlen", "sdpa_varlen", "flash_attention_2"):
        raise refuse_attn_implementation(requested, _UNSUPPORTED)
    if requested == "auto":
        requested = FLEX if device_type == "cuda" and flex_available() else "sdpa"
    if requested == FLEX:
        if device_type != "cuda":
            raise refuse_attn_implementation(
                requested, f"(FlexAttention) has no CPU backward in torch (device is {device_type!r}): use 'sdpa' or "
                "'eager' here")
        register_shared_attention()
    elif requested not in DENSE:
        raise refuse_attn_implementation(requested, "is not one of auto, sdpa, eager for prompt_sharing")
    return requested


# ---------------------------------------------------------------------------------------------------
# The mask handed to the model
# ---------------------------------------------------------------------------------------------------


def shared_mask_mod(segment_ids: torch.Tensor, role_ids: torch.Tensor):
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` of a shared row ([T] or [1, T] ids).

    Same rule as :func:`simpo_ds.data.sharing.shared_attention_mask` (one function implements it).
    """
    seg, rol = segment_ids.reshape(-1), role_ids.reshape(-1)

    def mask_mod(b, h, q_idx, kv_idx):
        return shared_attention_allowed(seg[q_idx], rol[q_idx], q_idx, seg[kv_idx], rol[kv_idx], kv_idx)

    return mask_mod


def shared_block_mask(segment_ids: torch.Tensor, role_ids: torch.Tensor):
    """``BlockMask`` [1, 1, T, T] of a shared row, on the ids' device (compiled builder on CUDA)."""
    from torch.nn.attention.flex_attention import create_block_mask

    length = segment_ids.numel()
    return create_block_mask(
        shared_mask_mod(segment_ids, role_ids), None, None, length, length,
        device=segment_ids.device, _compile=segment_ids.is_cuda,
    )


def prompt_sharing_mask(batch: dict, attn_impl: str, dtype: torch.dtype):
    """The 4-D ``attention_mask`` for a shared ``batch`` under ``attn_impl`` (module docstring).

    batch: ``segment_ids`` / ``role_ids`` [1, T]; ``dtype``: the model's compute dtype (eager's additive mask).
    """
    if batch["input_ids"].shape[0] != 1:
        raise ValueError(f"a prompt-sharing batch is one row, got input_ids of shape {tuple(batch['input_ids'].shape)}")
    seg, role = batch["segment_ids"], batch["role_ids"]
    if attn_impl == "sdpa":
        return shared_attention_mask(seg, role, torch.bool)
    if attn_impl == "eager":
        return shared_attention_mask(seg, role, dtype)
    if attn_impl == FLEX:
        return shared_block_mask(seg, role)
    raise ValueError(f"attn_implementation={attn_impl!r} " + _UNSUPPORTED)


# ---------------------------------------------------------------------------------------------------
# FlexAttention kernel
# ---------------------------------------------------------------------------------------------------

_compiled_flex = None


def _flex_kernel(query, key, value, block_mask, scale, enable_gqa):
    """flex_attention, compiled once on CUDA (dynamic shapes after the first recompile); the unfused
    eager version elsewhere (forward only: torch has no FlexAttention backward on CPU)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if not query.is_cuda:
        if torch.is_grad_enabled() and query.requires_grad:
            raise RuntimeError(
                f"{FLEX}: FlexAttention has no backward on {query.device.type}; train with attn_implementation "
                "'sdpa' or 'eager' there"
            )
        return flex_attention(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


def flex_shared_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function for ``attn_implementation="prompt_sharing_flex"``.

    query [B, Hq, L, d], key/value [B, Hkv, L, d], ``attention_mask`` the row's ``BlockMask`` (from
    :func:`prompt_sharing_mask`) -> (attn_output [B, L, Hq, d], None). Fails with a clear message for
    what the mask cannot express (softcapping, sliding windows, sinks, non-causal layers, dropout).
    """
    from torch.nn.attention.flex_attention import BlockMask

    check_attention_features(FLEX, module, dropout, sliding_window, softcap, kwargs)
    if not isinstance(attention_mask, BlockMask):
        raise ValueError(
            f"{FLEX} needs the row's BlockMask as attention_mask (SimPOPolicy builds it from a prompt-sharing "
            f"batch); got {type(attention_mask).__name__}"
        )
    heads, kv_heads = query.shape[1], key.shape[1]
    enable_gqa = heads != kv_heads
    if enable_gqa and heads & (heads - 1):  # FlexAttention GQA wants power-of-two query heads
        key, value = key.repeat_interleave(heads // kv_heads, dim=1), value.repeat_interleave(heads // kv_heads, dim=1)
        enable_gqa = False
    out = _flex_kernel(query, key, value, attention_mask, scaling, enable_gqa)
    return out.transpose(1, 2).contiguous(), None


def register_shared_attention() -> None:
    """Register ``prompt_sharing_flex`` with transformers' ``AttentionInterface`` (idempotent).

    No mask function is registered: the policy always passes the 4-D BlockMask, which transformers
    forwards unchanged.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(FLEX, flex_shared_attention_forward)
