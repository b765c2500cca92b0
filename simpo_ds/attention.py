"""Attention backends for packed rows: the choice, the forward kwargs, and the ``varlen`` kernel.

A packed micro-batch is ONE row of concatenated sequences (docs/design.md §3)::

    input_ids     [1, T]   position_ids [1, T] (restart at 0 per sequence)
    cu_seqlens    [S+1]    int32, e.g. lengths [5, 3, 3, 3] -> [0, 5, 8, 11, 14]; max_seqlen = 5

and the model is always called as::

    model(input_ids=..., position_ids=..., use_cache=False, **attention_kwargs(batch, impl))

with NO ``attention_mask``. Attention must then be block-diagonal causal; per backend:

- ``sdpa`` / ``eager`` (CPU, reference): transformers builds the block-causal mask from the restarting
  ``position_ids``, but ONLY when ``attention_mask is None`` and no cache is used. An all-ones mask or a
  live cache makes sequences silently attend to each other (tests/test_attention.py guards this).
- ``flash_attention_2`` (flash-attn installed, CUDA, fp16/bf16): transformers' flash path reads the
  ``FlashAttentionKwargs`` (``cu_seq_lens_q/k``, ``max_length_q/k``) and calls the varlen kernel with
  them; without them it would derive them from position_ids (an extra device sync per layer call).
  It loads flash-attn by the model config's attention name, so a wrapper around it (sequence
  parallelism) hands it a view of the module carrying its own name (``simpo_ds.sequence_parallel``).
- ``varlen`` (CUDA, no extra package): :func:`varlen_attention_forward`, registered here through
  ``transformers.AttentionInterface``, runs ``torch.nn.attention.varlen.varlen_attn`` on the same kwargs.
- ``sdpa_varlen`` (CPU default): :func:`sdpa_varlen_attention_forward`, registered the same way, runs
  one causal ``scaled_dot_product_attention`` per sequence of the row. Exact like ``sdpa`` on the packed
  row, but it computes the Σ s_i² scores the sequences need instead of the T² of a block-causal mask
  over the whole row (10× fewer on UltraFeedback-like rows of 8 pairs; see bench/RESULTS.md). The
  loop over sequences is a host loop over ``cu_seqlens``: free on CPU, and GPUs use a varlen kernel.

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

from simpo_ds.config import ConfigError

VARLEN = "varlen"
SDPA_VARLEN = "sdpa_varlen"
IMPLEMENTATIONS = ("auto", "flash_attention_2", VARLEN, SDPA_VARLEN, "sdpa", "eager")
CU_SEQLENS_IMPLEMENTATIONS = (VARLEN, SDPA_VARLEN, "flash_attention_2")  # take cu_seqlens kwargs
HALF_DTYPES = (torch.float16, torch.bfloat16)  # what the CUDA flash kernels (varlen, flash_attention_2) take

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


def refuse_attn_implementation(value: str, why: str) -> ConfigError:
    """The error for an ``attn_implementation`` that cannot run here: a ConfigError naming the key and the
    value (the CLI prints its one line and exits 2)."""
    return ConfigError(f"config key 'attn_implementation': {value!r} {why}")


def choose_attn_implementation(requested: str, device_type: str, packing: bool = True,
                               dtype: torch.dtype | None = None) -> str:
    """Resolve the config's ``attn_implementation`` to the name passed to ``from_pretrained``.

    ``dtype``: the model's compute dtype (None: not known yet, taken as half precision). ``auto``:
    ``flash_attention_2`` on CUDA when flash-attn imports, else ``varlen`` on CUDA when torch has
    ``torch.nn.attention.varlen`` — both for fp16/bf16 only, their CUDA kernels take no fp32 — else
    ``sdpa_varlen`` (CPU, or fp32); ``sdpa`` for padded batches (``packing=False``). Explicit choices are
    checked against the device, the dtype, the batch layout and the installed packages; one that cannot
    run raises :class:`ConfigError` saying why and what to use. Registers ``varlen``/``sdpa_varlen``.
    """
    if requested not in IMPLEMENTATIONS:
        raise refuse_attn_implementation(requested, f"is not one of {', '.join(IMPLEMENTATIONS)}")
    cuda = device_type == "cuda"
    half = dtype is None or dtype in HALF_DTYPES
    if requested == "auto":
        if cuda and half and _flash_attn_available():
            return "flash_attention_2"
        if not packing:
            return "sdpa"
        requested = VARLEN if cuda and half and _varlen_available() else SDPA_VARLEN
    elif requested in (VARLEN, SDPA_VARLEN) and not packing:
        raise refuse_attn_implementation(
            requested, "attends within the sequences of a packed row; padded batches (packing: false) need 'sdpa', "
            "'eager' or 'flash_attention_2'")
    elif requested == "flash_attention_2":
        if not cuda:
            raise refuse_attn_implementation(
                requested, f"needs CUDA (device is {device_type!r}); use 'sdpa_varlen', 'sdpa' or 'eager' here")
        if not _flash_attn_available():
            raise refuse_attn_implementation(
                requested, "needs flash-attn, which is not installed (or does not import): `pip install "
                "simpo-ds[flash]`, or use 'varlen' (torch >= 2.10, no extra package) or 'sdpa'")
    elif requested == VARLEN:
        if not cuda:
            raise refuse_attn_implementation(
                requested, f"runs torch's CUDA flash kernel and cannot run on {device_type!r}; use 'sdpa_varlen' "
                "(one sdpa call per sequence), 'sdpa' or 'eager'")
        if not _varlen_available():
            raise refuse_attn_implementation(
                requested, f"needs torch.nn.attention.varlen (torch >= 2.10, found {torch.__version__}); upgrade "
                "torch, `pip install simpo-ds[flash]`, or use 'sdpa'")
    if requested in (VARLEN, "flash_attention_2") and not half:
        raise refuse_attn_implementation(
            requested, f"runs a flash kernel, which takes float16/bfloat16 only, and the model is {dtype} "
            "(torch_dtype): set torch_dtype bfloat16, or use 'sdpa_varlen' (packed rows) or 'sdpa'")
    if requested in (VARLEN, SDPA_VARLEN):
        register_attention()
    return requested


# ---------------------------------------------------------------------------------------------------
# Forward kwargs for a packed row
# ---------------------------------------------------------------------------------------------------


def attention_kwargs(batch: dict, impl: str) -> dict:
    """Extra model-forward kwargs for a packed ``batch`` under attention implementation ``impl``.

    batch: ``input_ids`` / ``position_ids`` [1, T], ``cu_seqlens`` [S+1] (int), ``max_seqlen`` int
    (computed from cu_seqlens when absent). Returns

    - ``varlen`` / ``sdpa_varlen`` / ``flash_attention_2``: ``{cu_seq_lens_q: cu [S+1] int32, cu_seq_lens_k: cu,
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
    if impl not in CU_SEQLENS_IMPLEMENTATIONS:
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


def check_attention_features(impl: str, module, dropout: float, sliding_window, softcap, kwargs: dict) -> None:
    """Refuse what our packed-row attentions cannot do (softcapping, sliding windows, sinks, non-causal
    layers, dropout), naming the model's attention class and ``impl``."""
    name = module.__class__.__name__  # not type(): a wrapper's view of the module names the module's class
    if softcap is not None:
        raise NotImplementedError(f"{name} uses attention logit softcapping; {impl} attention does not support it")
    if sliding_window is not None:
        raise NotImplementedError(f"{name} uses sliding-window attention; {impl} attention does not support it")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError(f"{name} uses attention sinks; {impl} attention does not support them")
    if not kwargs.get("is_causal", getattr(module, "is_causal", True)):
        raise NotImplementedError(f"{name} is not causal; {impl} attention here is causal only")
    if dropout:
        raise NotImplementedError(f"attention dropout {dropout} with {impl} attention: disable dropout")


def check_packed_row_call(impl: str, attention_mask, kwargs: dict) -> None:
    """A packed-row call of a cu_seqlens attention ``impl``: no mask, and the cu_seqlens kwargs present."""
    if attention_mask is not None:
        raise ValueError(f"{impl} attention takes no attention_mask: call the model on a packed row without one")
    if kwargs.get("cu_seq_lens_q") is None or kwargs.get("max_length_q") is None:
        raise ValueError(
            f"{impl} attention needs cu_seq_lens_q/k and max_length_q/k in the forward kwargs: call the model "
            "with the packed row's **attention_kwargs(batch, kernel) (simpo_ds.attention; padded batches: use sdpa)"
        )


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
    check_attention_features(VARLEN, module, dropout, sliding_window, softcap, kwargs)
    check_packed_row_call(VARLEN, attention_mask, kwargs)
    cu_seqlens, max_seqlen = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    batch, heads, length, head_dim = query.shape  # cu_seqlens[-1] == B·L is checked in attention_kwargs

    def tokens_major(x: torch.Tensor) -> torch.Tensor:  # [B, H, L, d] -> [B·L, H, d]
        return x.transpose(1, 2).reshape(batch * length, x.shape[1], head_dim)

    out = _varlen_kernel(tokens_major(query), tokens_major(key), tokens_major(value), cu_seqlens, max_seqlen, scaling)
    return out.view(batch, length, heads, head_dim), None


def sdpa_varlen_attention_forward(
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
    """transformers attention function for ``attn_implementation="sdpa_varlen"``: one causal sdpa per
    sequence of the packed row, so only the Σ s_i² scores inside the sequences are computed.

    query [1, Hq, T, d], key/value [1, Hkv, T, d] (GQA: Hq a multiple of Hkv), kwargs ``cu_seq_lens_q``
    [S+1] (from :func:`attention_kwargs`) -> (attn_output [1, T, Hq, d], None). A call without
    ``cu_seq_lens_q`` (``generate``, a padded batch, a plain forward of the trained model) is not a
    packed row: it is plain sdpa with the mask transformers built (sdpa's mask function is registered
    for this name), so the model stays usable in memory after training.
    """
    if kwargs.get("cu_seq_lens_q") is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, softcap=softcap, **kwargs)
    check_attention_features(SDPA_VARLEN, module, dropout, sliding_window, softcap, kwargs)
    # transformers' own mask for the row (block-causal from position_ids) is not needed: cu_seqlens cut it
    if query.shape[0] != 1:
        raise ValueError(f"{SDPA_VARLEN} attention takes one packed row, got a batch of {query.shape[0]}")
    bounds = kwargs["cu_seq_lens_q"].tolist()  # a host copy: CPU tensors, no device sync
    gqa = key.shape[1] != query.shape[1]
    outs = [
        F.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling, enable_gqa=gqa
        )
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outs, dim=2).transpose(1, 2), None


def register_attention() -> None:
    """Register ``varlen`` and ``sdpa_varlen`` with transformers' ``AttentionInterface`` (idempotent).

    Call before ``from_pretrained(..., attn_implementation="varlen")``. No mask function is registered
    for ``varlen`` on purpose: transformers then skips mask creation for it (see the module docstring).
    ``sdpa_varlen`` gets sdpa's, for the calls that are not packed rows (generation).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionInterface.register(SDPA_VARLEN, sdpa_varlen_attention_forward)
    AttentionMaskInterface.register(SDPA_VARLEN, sdpa_mask)  # for calls that are not packed rows
