"""A CPU stand-in for the ``flash_attn`` package (FlashAttention-2), so transformers' own
``flash_attention_2`` code path (``integrations.flash_attention`` -> ``_flash_attention_forward`` ->
``flash_attn_varlen_func``) runs in CPU tests.

flash-attn itself needs CUDA and cannot be installed here; transformers only takes its flash path when
``is_flash_attn_2_available()`` is true (which asks for CUDA). :func:`install` (pytest: ``monkeypatch``)
and :func:`install_in_process` (a spawned worker) put a fake ``flash_attn`` module into ``sys.modules``,
make transformers' availability check say yes, and forget any flash functions transformers cached.

The two kernels keep flash-attn 2's signatures and conventions: tokens-major tensors, q [.., Hq, d] and
k/v [.., Hkv, d] with Hq a multiple of Hkv (query head h reads kv head h // (Hq / Hkv)), ``causal``
top-left == bottom-right here (every segment has as many queries as keys), ``softmax_scale`` None ->
1/sqrt(d), the output alone unless ``return_attn_probs``. Each segment is one causal
``scaled_dot_product_attention`` (exact, differentiable). Every call is appended to :data:`CALLS`
(the kernel name, shapes and the varlen arguments), so tests can check what reached the kernel.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types

import torch
import torch.nn.functional as F

CALLS: list[dict] = []  # one entry per kernel call, newest last


def _segment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale, causal: bool) -> torch.Tensor:
    """q [l, Hq, d], k/v [l, Hkv, d] -> [l, Hq, d]: one sdpa call, GQA as flash-attn maps it."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=causal,
                                         scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(0, 1)


def _check_options(dropout_p, window_size, softcap, alibi_slopes) -> None:
    if dropout_p or tuple(window_size) != (-1, -1) or softcap or alibi_slopes is not None:
        raise NotImplementedError("the flash_attn stand-in computes plain (causal) attention only: no dropout, window, "
                                  f"softcap or alibi (got {dropout_p}, {window_size}, {softcap}, {alibi_slopes})")


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """q [T, Hq, d], k/v [T, Hkv, d], cu_seqlens_q/k [S+1] int32 -> out [T, Hq, d] (flash-attn 2 API)."""
    _check_options(dropout_p, window_size, softcap, alibi_slopes)
    if cu_seqlens_q.dtype != torch.int32 or not torch.equal(cu_seqlens_q, cu_seqlens_k):
        raise ValueError("the flash_attn stand-in takes int32 cu_seqlens, the same for queries and keys")
    bounds = cu_seqlens_q.tolist()
    if bounds[-1] != q.shape[0] or max(b - a for a, b in zip(bounds[:-1], bounds[1:])) > max_seqlen_q:
        raise ValueError(f"cu_seqlens {bounds} / max_seqlen {max_seqlen_q} do not describe {q.shape[0]} tokens")
    CALLS.append({"fn": "flash_attn_varlen_func", "q_shape": tuple(q.shape), "k_shape": tuple(k.shape),
                  "cu_seqlens_q": cu_seqlens_q.clone(), "cu_seqlens_k": cu_seqlens_k.clone(),
                  "max_seqlen_q": max_seqlen_q, "max_seqlen_k": max_seqlen_k, "causal": causal,
                  "softmax_scale": softmax_scale})
    out = torch.cat([_segment(q[a:b], k[a:b], v[a:b], softmax_scale, causal) for a, b in zip(bounds[:-1], bounds[1:])])
    return (out, None, None) if return_attn_probs else out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q [B, L, Hq, d], k/v [B, L, Hkv, d] -> out [B, L, Hq, d] (flash-attn 2 API)."""
    _check_options(dropout_p, window_size, softcap, alibi_slopes)
    if q.shape[1] != k.shape[1]:
        raise NotImplementedError("the flash_attn stand-in needs as many queries as keys")
    CALLS.append({"fn": "flash_attn_func", "q_shape": tuple(q.shape), "k_shape": tuple(k.shape), "causal": causal,
                  "softmax_scale": softmax_scale})
    out = torch.stack([_segment(q[i], k[i], v[i], softmax_scale, causal) for i in range(q.shape[0])])
    return (out, None, None) if return_attn_probs else out


def flash_attn_with_kvcache(*args, **kwargs):
    raise NotImplementedError("the flash_attn stand-in has no KV-cache kernel")


def _not_in_standin(*args, **kwargs):
    raise NotImplementedError("the flash_attn stand-in has no (un)padding helpers: call it on packed rows")


def _modules() -> dict[str, types.ModuleType]:
    package = types.ModuleType("flash_attn")
    package.__version__ = "2.8.3"
    package.__path__ = []  # a package, so `from flash_attn.bert_padding import ...` resolves
    package.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None, is_package=True)  # find_spec() works
    package.flash_attn_func, package.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    package.flash_attn_with_kvcache = flash_attn_with_kvcache
    padding = types.ModuleType("flash_attn.bert_padding")
    padding.__spec__ = importlib.machinery.ModuleSpec("flash_attn.bert_padding", None)
    padding.pad_input = padding.unpad_input = _not_in_standin
    package.bert_padding = padding
    return {"flash_attn": package, "flash_attn.bert_padding": padding}


def _patches() -> list[tuple[object, str, object]]:
    """(object, attribute, value): transformers' FA2 availability says yes (FA3/FA4: no); its cached
    flash functions (module globals filled by ``lazy_import_flash_attention``) are forgotten, so the
    stand-in is loaded."""
    import transformers.modeling_flash_attention_utils as fa_utils

    return [(fa_utils, "is_flash_attn_2_available", lambda *a, **k: True),
            (fa_utils, "is_flash_attn_3_available", lambda *a, **k: False),
            (fa_utils, "is_flash_attn_4_available", lambda *a, **k: False),
            *((fa_utils, name, None) for name in ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn",
                                                  "_flash_with_kvcache_fn", "_pad_fn", "_unpad_fn",
                                                  "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn"))]


def install(monkeypatch) -> list[dict]:
    """Install the stand-in for one test (undone by ``monkeypatch``); returns :data:`CALLS`, emptied."""
    for name, module in _modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    for obj, attr, value in _patches():
        monkeypatch.setattr(obj, attr, value)
    CALLS.clear()
    return CALLS


def install_in_process() -> list[dict]:
    """Install the stand-in for the rest of this process (a spawned test worker); returns :data:`CALLS`."""
    sys.modules.update(_modules())
    for obj, attr, value in _patches():
        setattr(obj, attr, value)
    CALLS.clear()
    return CALLS
