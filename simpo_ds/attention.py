"""Attention backends for packed rows: the choice, the forward kwargs, and the ``varlen`` kernel.

A packed micro-batch is ONE row of concatenated sequences (DESIGN.md §3)::

    input_ids     [1, T]   position_ids [1, T] (restart at 0 per sequence)
    cu_seqlens    [S+1]    int32, e.g. lengths [5, 3, 3, 3] -> [0, 5, 8, 11, 14]; max_seqlen = 5

and the model is always called as::

    model(input_ids=..., position_ids=..., use_cache=False, **attention_kwargs(batch, impl))

with NO ``attention_mask``. Attention must then be block-diagonal causal; per backend:

- ``sdpa`` / ``eager`` (CPU, reference): transformers builds the block-causal mask from the restarting
  ``position_ids``, but ONLY when ``attention_mask is None`` and no cache is used. An all-ones mask or a
  live cache makes sequences silently attend to each other (tests/test_attention.py guards this).
- ``flash_attention_2`` (flash-attn installed, CUDA): transformers' flash path reads the
  ``FlashAttentionKwargs`` (``cu_seq_lens_q/k``, ``max_length_q/k``) and calls the varlen kernel with
  them; without them it would derive them from position_ids (an extra device sync per layer call).
- ``varlen`` (CUDA, no extra package): :func:`varlen_attention_forward`, registered here through
  ``transformers.AttentionInterface``, runs ``torch.nn.attention.varlen.varlen_attn`` on the same kwargs.

Masks for ``varlen``: transformers 5 only builds a mask for implementations listed in
``AttentionMaskInterface``; for any other registered name ``_preprocess_mask_arguments`` exits early and
the attention function gets ``attention_mask=None``. We deliberately register no mask function, so no
mask (dense or otherwise) and no packed-sequence detection is ever computed for ``varlen``.
"""

from __future__ import annotations

import importlib
import inspect
import math

import torch
import torch.nn.functional as F

VARLEN = "varlen"
IMPLEMENTATIONS = ("auto", "flash_attention_2", VARLEN, "sdpa", "eager")

# The FlashAttentionKwargs names: transformers 5.24 forwards every extra forward kwarg unchanged from
# XxxForCausalLM / XxxModel through the decoder layers to the attention function (checked for Llama
# and Qwen2), and its flash_attention_2 path uses exactly these four to call the varlen kernel.
CU_SEQLENS_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k")
MAX_SEQLEN_KWARGS = ("max_length_q", "max_length_k")


# ---------------------------------------------------------------------------------------------------
# Backend choice
# ---------------------------------------------------------------------------------------------------


def _flash_attn_available() -> bool:
    """True when the ``flash_attn`` package imports (a broken CUDA build counts as absent)."""
    try:
        importlib.import_module("flash_attn")
    except Exception:
        return False
    return True


def _varlen_available() -> bool:
    """True when this torch ships ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except Exception:
        return False
    return True


def choose_attn_implementation(requested: str, device_type: str) -> str:
    """Resolve the config's ``attn_implementation`` to the name passed to ``from_pretrained``.

    ``auto``: ``flash_attention_2`` on CUDA when flash-attn imports, else ``varlen`` on CUDA when torch has
    ``torch.nn.attention.varlen``, else ``sdpa``. Explicit choices are checked against the device and the
    installed packages and fail with a message saying what to do. Returning ``varlen`` also registers it.
    """
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={requested!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    cuda = device_type == "cuda"
    if requested == "auto":
        if cuda and _flash_attn_available():
            return "flash_attention_2"
        requested = VARLEN if cuda and _varlen_available() else "sdpa"
    elif requested == "flash_attention_2":
        if not cuda:
            raise ValueError(
                f"attn_implementation='flash_attention_2' needs CUDA (device is {device_type!r}); "
                "use 'sdpa' or 'eager' here"
            )
        if not _flash_attn_available():
            raise ValueError(
                "attn_implementation='flash_attention_2' but flash-attn is not installed (or does not import): "
                "`pip install simpo-ds[flash]`, or use attn_implementation='varlen' (torch >= 2.10, no extra "
                "package) or 'sdpa'"
            )
    elif requested == VARLEN:
        if not cuda:
            raise ValueError(
                f"attn_implementation='varlen' runs torch's CUDA flash kernel and cannot run on {device_type!r}; "
                "use 'sdpa' or 'eager' (they mask packed rows from position_ids)"
            )
        if not _varlen_available():
            raise ValueError(
                f"attn_implementation='varlen' needs torch.nn.attention.varlen (torch >= 2.10, found "
                f"{torch.__version__}); upgrade torch, `pip install simpo-ds[flash]`, or use 'sdpa'"
            )
    if requested == VARLEN:
        register_attention()
    return requested


# ---------------------------------------------------------------------------------------------------
# Forward kwargs for a packed row
# ---------------------------------------------------------------------------------------------------


def attention_kwargs(batch: dict, impl: str) -> dict:
    """Extra model-forward kwargs for a packed ``batch`` under attention implementation ``impl``.

    batch: ``input_ids`` / ``position_ids`` [1, T], ``cu_seqlens`` [S+1] (int), ``max_seqlen`` int
    (computed from cu_seqlens when absent). Returns

    - ``varlen`` / ``flash_attention_2``: ``{cu_seq_lens_q: cu [S+1] int32, cu_seq_lens_k: cu,
      max_length_q: int, max_length_k: int}`` on the device of ``input_ids``;
    - ``sdpa`` / ``eager``: ``{}`` (transformers masks from the restarting position_ids).

    The caller adds ``use_cache=False`` and never an attention mask: a packed batch carrying an
    ``attention_mask`` is rejected here, because an all-ones mask makes sequences attend to each other.
    """
    if "attention_mask" in batch:
        raise ValueError(
            "packed batch carries an 'attention_mask': pass none (with use_cache=False) so attention stays "
            "block-diagonal; an all-ones mask lets packed sequences attend to each other"
        )
    if "position_ids" not in batch:
        raise ValueError("packed batch needs 'position_ids' restarting at 0 at every sequence start")
    if impl in ("sdpa", "eager"):
        return {}
    if impl not in (VARLEN, "flash_attention_2"):
        raise ValueError(f"no packed-row attention kwargs for attn_implementation={impl!r}")
    tokens = batch["input_ids"].numel()
    if int(batch["cu_seqlens"][-1]) != tokens:  # once per micro-batch, not per layer (a sync on CUDA)
        raise ValueError(f"cu_seqlens ends at {int(batch['cu_seqlens'][-1])} but the row holds {tokens} tokens")
    cu_seqlens = batch["cu_seqlens"].to(device=batch["input_ids"].device, dtype=torch.int32)
    max_seqlen = batch.get("max_seqlen")
    max_seqlen = int(max_seqlen) if max_seqlen is not None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return {
        **dict.fromkeys(CU_SEQLENS_KWARGS, cu_seqlens),
        **dict.fromkeys(MAX_SEQLEN_KWARGS, max_seqlen),
    }


# ---------------------------------------------------------------------------------------------------
# The varlen kernel
# ---------------------------------------------------------------------------------------------------


def reference_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Slow, exact varlen causal attention: one ``scaled_dot_product_attention`` per segment.

    q [T, Hq, d], k/v [T, Hkv, d] (Hq a multiple of Hkv: query head h uses kv head h // (Hq/Hkv)),
    cu_seqlens [S+1] with cu_seqlens[-1] == T -> out [T, Hq, d]. ``max_seqlen`` is unused (signature
    parity with the kernel); ``scale`` None means 1/sqrt(d). For CPU tests and debugging.
    """
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (x[start:end].transpose(0, 1) for x in (q, k, v))  # [H, l, d]
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(outs, dim=0)


def call_varlen_attn(
    varlen_attn,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None,
) -> torch.Tensor:
    """Call a ``varlen_attn`` of any torch version as causal attention; returns out [T, Hq, d].

    q [T, Hq, d], k/v [T, Hkv, d], cu_seqlens [S+1] int32. The signature is read with ``inspect``:

    - torch 2.10: ``(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None)`` — no GQA, no
      scale: kv heads are repeated here and q is pre-multiplied by scale·sqrt(d) (softmax(s·qkᵀ) with
      s = scale equals the kernel's default 1/sqrt(d) applied to the rescaled q);
    - torch 2.12+: ``(..., *, scale=None, window_size=(-1, -1), enable_gqa=False, ...)`` — causal is
      ``window_size=(-1, 0)`` (a tuple: the kernel compares with ``==``), GQA native.
    """
    params = inspect.signature(varlen_attn).parameters
    kwargs = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    if "is_causal" in params:
        kwargs["is_causal"] = True
    if not kwargs:
        raise RuntimeError(f"unknown varlen_attn signature {inspect.signature(varlen_attn)}: no causal option")
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if "scale" in params:
        kwargs["scale"] = scale
    elif scale is not None and not math.isclose(scale, q.shape[-1] ** -0.5, rel_tol=1e-12):
        q = q * (scale * math.sqrt(q.shape[-1]))
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


def _varlen_kernel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> torch.Tensor:
    """The one kernel call of the ``varlen`` path (CPU tests substitute this function).

    q [T, Hq, d], k/v [T, Hkv, d] fp16/bf16 on CUDA, cu_seqlens [S+1] int32 -> out [T, Hq, d].
    """
    from torch.nn.attention.varlen import varlen_attn

    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(
            f"attn_implementation='varlen' runs torch's flash kernel: it needs fp16/bf16 CUDA tensors, got "
            f"{q.dtype} on {q.device}; use torch_dtype bfloat16, or attn_implementation='sdpa'"
        )
    return call_varlen_attn(varlen_attn, q, k, v, cu_seqlens, max_seqlen, scale)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function for ``attn_implementation="varlen"`` (block-diagonal causal).

    query [B, Hq, L, d], key/value [B, Hkv, L, d] (transformers layout), kwargs ``cu_seq_lens_q``
    [S+1] int32 over the B·L flattened tokens and ``max_length_q`` (from :func:`attention_kwargs`)
    -> (attn_output [B, L, Hq, d], None). Honours ``scaling``; dropout must be 0 (varlen has none).
    """
    name = type(module).__name__
    if softcap is not None:
        raise NotImplementedError(f"{name} uses attention logit softcapping; varlen attention does not support it")
    if sliding_window is not None:
        raise NotImplementedError(f"{name} uses sliding-window attention; varlen attention does not support it")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError(f"{name} uses attention sinks; varlen attention does not support them")
    if not kwargs.get("is_causal", getattr(module, "is_causal", True)):
        raise NotImplementedError(f"{name} is not causal; varlen attention here is causal only")
    if dropout:
        raise NotImplementedError(f"attention dropout {dropout} with varlen attention: disable dropout")
    if attention_mask is not None:
        raise ValueError("varlen attention takes no attention_mask: call the model on a packed row without one")
    cu_seqlens, max_seqlen = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu_seqlens is None or max_seqlen is None:
        raise ValueError(
            "varlen attention needs cu_seq_lens_q/k and max_length_q/k in the forward kwargs: call the model "
            "with **attention_kwargs(batch, 'varlen') on a packed row (padded batches: use sdpa)"
        )
    batch, heads, length, head_dim = query.shape  # cu_seqlens[-1] == B·L is checked in attention_kwargs

    def tokens_major(x: torch.Tensor) -> torch.Tensor:  # [B, H, L, d] -> [B·L, H, d]
        return x.transpose(1, 2).reshape(batch * length, x.shape[1], head_dim)

    out = _varlen_kernel(tokens_major(query), tokens_major(key), tokens_major(value), cu_seqlens, max_seqlen, scaling)
    return out.view(batch, length, heads, head_dim), None


def register_attention() -> None:
    """Register ``varlen`` with transformers' ``AttentionInterface`` (idempotent).

    Call before ``from_pretrained(..., attn_implementation="varlen")``. No mask function is registered
    on purpose: transformers then skips mask creation for this name (see the module docstring).
    """
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
