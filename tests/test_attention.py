"""Packed-row attention: block-diagonal causal on every backend, and the guards that keep it so.

Reference throughout: each sequence run ALONE through the same weights with sdpa (no packing at all).
The ``varlen`` path runs on CPU with its one kernel call (``attention._varlen_kernel``) replaced by a
per-segment sdpa, or by fakes with the torch 2.10 / 2.12+ ``varlen_attn`` signatures driven through the
real adapter (``call_varlen_attn``), so kwargs propagation, layout, GQA, scaling and the signature
adaptation are all checked here; only the CUDA flash kernel itself is not.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_config, tiny_model
from transformers import AttentionInterface, AutoModelForCausalLM

from simpo_ds import attention
from simpo_ds.attention import (
    SDPA_VARLEN,
    VARLEN,
    attention_kwargs,
    call_varlen_attn,
    choose_attn_implementation,
    reference_varlen_attention,
    register_attention,
    varlen_attention_forward,
)

ARCHS = ("llama", "qwen2")
LENGTHS = (5, 3, 7, 1, 4)  # includes a 1-token sequence
TOL = 1e-5
LEAK = 1e-2  # a cross-sequence leak moves logits by ~0.5 on these models


@pytest.fixture(autouse=True, scope="module")
def _registered():
    register_attention()


def packed_row(lengths=LENGTHS, seed: int = 0, vocab: int = 101) -> tuple[dict, list[torch.Tensor]]:
    """A packed batch (docs/design.md §3) of random sequences, and the sequences themselves."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, vocab, (n,), generator=g) for n in lengths]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    batch = {
        "input_ids": torch.cat(seqs)[None],
        "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
        "cu_seqlens": cu,
        "max_seqlen": max(lengths),
    }
    return batch, seqs


def per_sequence_logits(model, seqs) -> torch.Tensor:
    """[T, V]: every sequence alone (no packing, no mask needed) through sdpa, concatenated."""
    impl, model.config._attn_implementation = model.config._attn_implementation, "sdpa"
    try:
        return torch.cat([model(input_ids=s[None], use_cache=False).logits[0] for s in seqs])
    finally:
        model.config._attn_implementation = impl


def packed_logits(model, batch, impl: str) -> torch.Tensor:
    """[T, V]: the packed row, called exactly as the trainer calls it."""
    out = model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        use_cache=False,
        **attention_kwargs(batch, impl),
    )
    return out.logits[0]


# --- sdpa / eager ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("impl", ["sdpa", "eager", SDPA_VARLEN])
def test_packed_equals_per_sequence(arch, impl):
    model = tiny_model(arch, impl)
    batch, seqs = packed_row()
    with torch.no_grad():
        packed, ref = packed_logits(model, batch, impl), per_sequence_logits(model, seqs)
    torch.testing.assert_close(packed, ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_on_leaks_across_sequences(arch):
    """Why the trainer must pass use_cache=False: with a cache (the loaded-model default), transformers
    builds a plain causal mask over the whole row and packed sequences attend to each other."""
    model = tiny_model(arch, "sdpa")
    batch, seqs = packed_row()
    with torch.no_grad():
        ref = per_sequence_logits(model, seqs)
        explicit = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits[0]
        model.config.use_cache = True  # as after from_pretrained, when use_cache=False is dropped from the call
        dropped = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    assert (explicit - ref).abs().max() > LEAK
    assert (dropped - ref).abs().max() > LEAK


@pytest.mark.parametrize("arch", ARCHS)
def test_all_ones_attention_mask_leaks_across_sequences(arch):
    """Why no attention_mask may be passed on a packed row: an all-ones mask disables the block mask."""
    model = tiny_model(arch, "sdpa")
    batch, seqs = packed_row()
    ones = torch.ones_like(batch["input_ids"])
    with torch.no_grad():
        ref = per_sequence_logits(model, seqs)
        leaky = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=ones, use_cache=False
        ).logits[0]
    assert (leaky - ref).abs().max() > LEAK
    for impl in ("sdpa", "eager", VARLEN, SDPA_VARLEN, "flash_attention_2"):
        with pytest.raises(ValueError, match="attention_mask"):
            attention_kwargs({**batch, "attention_mask": ones}, impl)


@pytest.mark.parametrize("arch", ARCHS)
def test_sdpa_varlen_gradients_equal_sdpa_on_the_packed_row(arch):
    """The CPU default (one sdpa per sequence) and sdpa with the block-causal mask: same gradients."""
    batch, _ = packed_row()
    grads = {}
    for impl in ("sdpa", SDPA_VARLEN):
        model = tiny_model(arch, impl)
        packed_logits(model, batch, impl).float().logsumexp(-1).sum().backward()
        grads[impl] = {n: p.grad for n, p in model.named_parameters()}
    for name, ref in grads["sdpa"].items():
        torch.testing.assert_close(grads[SDPA_VARLEN][name], ref, rtol=TOL, atol=TOL, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_sdpa_varlen_without_cu_seqlens_is_plain_sdpa(arch):
    """Outside packed rows (generate, a left-padded batch, a packed row called without the kwargs) the
    in-memory model stays correct: sdpa with the mask transformers builds."""
    batch, seqs = packed_row()
    model, ref_model = tiny_model(arch, SDPA_VARLEN), tiny_model(arch, "sdpa")
    padded = torch.zeros(2, 7, dtype=torch.long)
    padded[0, 2:], padded[1] = seqs[0], seqs[2]  # left padding, as for generation
    mask = (torch.arange(7) >= torch.tensor([[2], [0]])).long()
    with torch.no_grad():
        for kwargs in (dict(input_ids=padded, attention_mask=mask),
                       dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"])):
            got, ref = model(**kwargs, use_cache=False).logits, ref_model(**kwargs, use_cache=False).logits
            torch.testing.assert_close(got, ref, rtol=0, atol=TOL)
        generated = model.generate(padded, attention_mask=mask, max_new_tokens=3, do_sample=False)
        expected = ref_model.generate(padded, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, expected)


# --- varlen plumbing on CPU --------------------------------------------------------------------------


def _assert_varlen_inputs(query, key, cu_seq_q, cu_seq_k, max_q, max_k):
    assert query.dim() == 3 and key.dim() == 3, "varlen takes [T, H, d]"
    assert cu_seq_q.dtype == torch.int32 and cu_seq_k is cu_seq_q
    assert max_q == max_k == max(LENGTHS)


def varlen_attn_torch210(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """torch 2.10 signature: is_causal, no GQA, no scale (kernel default 1/sqrt(d))."""
    _assert_varlen_inputs(query, key, cu_seq_q, cu_seq_k, max_q, max_k)
    assert is_causal is True
    assert key.shape[1] == query.shape[1], "2.10 has no GQA: kv heads must arrive repeated"
    varlen_attn_torch210.calls += 1
    return reference_varlen_attention(query, key, value, cu_seq_q, max_q)


def varlen_attn_torch212(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    return_aux=None,
    scale=None,
    window_size=(-1, -1),
    enable_gqa=False,
    seqused_k=None,
    block_table=None,
    num_splits=None,
):
    """torch 2.12+ signature: causal is window_size == (-1, 0) (compared as a tuple), native GQA."""
    _assert_varlen_inputs(query, key, cu_seq_q, cu_seq_k, max_q, max_k)
    assert window_size == (-1, 0), "the real kernel is only causal for the tuple (-1, 0)"
    assert enable_gqa == (key.shape[1] != query.shape[1])
    varlen_attn_torch212.calls += 1
    return reference_varlen_attention(query, key, value, cu_seq_q, max_q, scale=scale)


KERNELS = {
    "reference": reference_varlen_attention,
    "torch2.10": lambda q, k, v, cu, m, s: call_varlen_attn(varlen_attn_torch210, q, k, v, cu, m, s),
    "torch2.12": lambda q, k, v, cu, m, s: call_varlen_attn(varlen_attn_torch212, q, k, v, cu, m, s),
}


@pytest.fixture
def fake_counts():
    varlen_attn_torch210.calls = varlen_attn_torch212.calls = 0
    return lambda: varlen_attn_torch210.calls + varlen_attn_torch212.calls


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_varlen_logits_and_grads_equal_per_sequence_sdpa(arch, kernel, monkeypatch, fake_counts):
    monkeypatch.setattr(attention, "_varlen_kernel", KERNELS[kernel])
    ref_model = tiny_model(arch, "sdpa")
    model = tiny_model(arch, VARLEN)
    model.load_state_dict(ref_model.state_dict())
    batch, seqs = packed_row()
    g = torch.Generator().manual_seed(1)
    weights = torch.randn(batch["input_ids"].shape[1], model.config.vocab_size, generator=g)

    logits = packed_logits(model, batch, VARLEN)
    ref = per_sequence_logits(ref_model, seqs)
    torch.testing.assert_close(logits, ref, rtol=0, atol=TOL)
    if kernel != "reference":
        assert fake_counts() == model.config.num_hidden_layers

    (logits * weights).sum().backward()
    (ref * weights).sum().backward()
    ref_grads = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        g, g_ref = p.grad, ref_grads[name].grad
        assert (g - g_ref).abs().max() <= TOL * g_ref.abs().max(), name


@pytest.mark.parametrize("kernel", KERNELS)
def test_varlen_forward_layout_gqa_and_scaling(kernel, monkeypatch):
    """Direct call with a non-default scale, against a dense block-diagonal causal mask (independent of
    reference_varlen_attention): exercises the 2.10 pre-scaling of q and the GQA repeat."""
    monkeypatch.setattr(attention, "_varlen_kernel", KERNELS[kernel])
    batch, _ = packed_row()
    t, hq, hkv, d, scale = batch["input_ids"].shape[1], 4, 2, 8, 0.3
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, h, t, d, generator=g) for h in (hq, hkv, hkv))
    out, weights = varlen_attention_forward(
        torch.nn.Module(), q, k, v, None, scaling=scale, **attention_kwargs(batch, VARLEN)
    )
    seg = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    mask = (seg[:, None] == seg[None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    assert weights is None and out.shape == (1, t, hq, d)
    torch.testing.assert_close(out, dense.transpose(1, 2), rtol=0, atol=TOL)


def test_varlen_rejects_what_it_cannot_compute(monkeypatch):
    monkeypatch.setattr(attention, "_varlen_kernel", reference_varlen_attention)
    batch, _ = packed_row()
    kw = attention_kwargs(batch, VARLEN)
    q = torch.randn(1, 2, batch["input_ids"].shape[1], 8)
    module = torch.nn.Module()
    with pytest.raises(NotImplementedError, match="sliding-window"):
        varlen_attention_forward(module, q, q, q, None, sliding_window=4, **kw)
    with pytest.raises(NotImplementedError, match="softcapping"):
        varlen_attention_forward(module, q, q, q, None, softcap=30.0, **kw)
    with pytest.raises(NotImplementedError, match="dropout"):
        varlen_attention_forward(module, q, q, q, None, dropout=0.1, **kw)
    with pytest.raises(ValueError, match="attention_kwargs"):
        varlen_attention_forward(module, q, q, q, None)
    with pytest.raises(ValueError, match="no attention_mask"):
        varlen_attention_forward(module, q, q, q, torch.ones(1, 1, 19, 19, dtype=torch.bool), **kw)


@pytest.mark.skipif(not attention._varlen_available(), reason="torch without torch.nn.attention.varlen")
def test_real_varlen_kernel_refuses_cpu_fp32():
    x = torch.randn(4, 2, 8)
    with pytest.raises(RuntimeError, match="fp16/bf16 CUDA"):
        attention._varlen_kernel(x, x, x, torch.tensor([0, 4], dtype=torch.int32), 4, None)


def test_register_is_idempotent_and_loadable():
    register_attention()
    register_attention()
    assert AttentionInterface()[VARLEN] is varlen_attention_forward
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation=VARLEN)  # load-time check
    assert model.config._attn_implementation == VARLEN


# --- attention_kwargs ---------------------------------------------------------------------------------


def test_attention_kwargs():
    batch, _ = packed_row()
    assert attention_kwargs(batch, "sdpa") == {} and attention_kwargs(batch, "eager") == {}
    for impl in (VARLEN, "flash_attention_2"):
        kw = attention_kwargs({**batch, "cu_seqlens": batch["cu_seqlens"].long()}, impl)
        assert set(kw) == {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}
        assert kw["cu_seq_lens_q"].dtype == torch.int32 and kw["cu_seq_lens_q"].tolist() == [0, 5, 8, 15, 16, 20]
        assert kw["max_length_q"] == kw["max_length_k"] == 7
    no_max = {k: v for k, v in batch.items() if k != "max_seqlen"}
    assert attention_kwargs(no_max, VARLEN)["max_length_q"] == 7
    with pytest.raises(ValueError, match="position_ids"):
        attention_kwargs({k: v for k, v in batch.items() if k != "position_ids"}, "sdpa")
    with pytest.raises(ValueError, match="cu_seqlens ends at 20 but the row holds 19"):
        attention_kwargs({**batch, "input_ids": batch["input_ids"][:, :-1]}, VARLEN)
    with pytest.raises(ValueError, match="flex_attention"):
        attention_kwargs(batch, "flex_attention")


# --- flash_attention_2: transformers' own flash path, over the CPU stand-in of flash-attn --------------


def _pairs(seed: int = 0, n: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt, chosen, rejected = (torch.randint(3, 100, (int(torch.randint(1, 7, (1,), generator=g)),),
                                                  generator=g).tolist() for _ in range(3))
        out.append({"chosen_input_ids": prompt + chosen, "chosen_prompt_len": len(prompt),
                    "rejected_input_ids": prompt + rejected, "rejected_prompt_len": len(prompt)})
    return out


def _policy_logps_and_grads(model, batch, impl: str):
    """Per-sequence average answer log-probs [2P] (chosen then rejected) and the gradients of a weighted sum."""
    from simpo_ds.model import SimPOPolicy

    avg = SimPOPolicy(model, chunk_size=4, attn_kwargs_fn=lambda b: attention_kwargs(b, impl))(batch).average
    avg = avg[torch.cat([batch["chosen_seq"], batch["rejected_seq"]])]
    (avg * torch.arange(1.0, len(avg) + 1)).sum().backward()
    return avg.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ARCHS)
def test_flash_attention_2_packed_row_equals_sdpa_reference(arch, monkeypatch):
    """attn_implementation="flash_attention_2" on a packed row (restarting position_ids, the row's
    cu_seqlens kwargs) == the padded sdpa reference: per-sequence log-probs and every gradient (1e-5).
    flash-attn runs as tests/flash_attn_standin.py, so transformers' own flash path (name lookup,
    kwargs, layout) is what is tested; each layer's kernel call gets the row's cu_seqlens / max_seqlen."""
    import flash_attn_standin

    from simpo_ds.data.packing import collate_packed, collate_padded

    calls = flash_attn_standin.install(monkeypatch)
    pairs = _pairs()
    ref_logps, ref_grads = _policy_logps_and_grads(tiny_model(arch, "sdpa"), collate_padded(pairs, 0), "sdpa")
    model = tiny_model(arch, "sdpa")  # same seed, same weights; built as sdpa (transformers' init check wants CUDA)
    model.config._attn_implementation = "flash_attention_2"
    batch = collate_packed(pairs)
    logps, grads = _policy_logps_and_grads(model, batch, "flash_attention_2")
    torch.testing.assert_close(logps, ref_logps, rtol=0, atol=TOL)
    for name, ref in ref_grads.items():
        assert (grads[name] - ref).abs().max() <= TOL * ref.abs().max(), name
    cfg, tokens = model.config, batch["input_ids"].shape[1]
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert len(calls) == cfg.num_hidden_layers
    for call in calls:
        assert call["fn"] == "flash_attn_varlen_func" and call["causal"]
        assert call["q_shape"] == (tokens, cfg.num_attention_heads, head_dim)
        assert call["k_shape"] == (tokens, cfg.num_key_value_heads, head_dim)  # GQA handed to the kernel
        assert torch.equal(call["cu_seqlens_q"], batch["cu_seqlens"])
        assert torch.equal(call["cu_seqlens_k"], batch["cu_seqlens"])
        assert call["max_seqlen_q"] == call["max_seqlen_k"] == batch["max_seqlen"]


# --- choose_attn_implementation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "flash, varlen, device, expected",
    [
        (True, True, "cuda", "flash_attention_2"),
        (False, True, "cuda", VARLEN),
        (False, False, "cuda", SDPA_VARLEN),
        (True, True, "cpu", SDPA_VARLEN),
    ],
)
def test_choose_auto(flash, varlen, device, expected, monkeypatch):
    monkeypatch.setattr(attention, "_flash_attn_available", lambda: flash)
    monkeypatch.setattr(attention, "_varlen_available", lambda: varlen)
    assert choose_attn_implementation("auto", device) == expected
    assert choose_attn_implementation("auto", device, dtype=torch.bfloat16) == expected
    # fp32 (torch_dtype float32): the CUDA flash kernels take none, so auto stays on sdpa
    assert choose_attn_implementation("auto", device, dtype=torch.float32) == SDPA_VARLEN
    assert choose_attn_implementation("auto", device, packing=False, dtype=torch.float32) == "sdpa"


def test_choose_for_padded_batches(monkeypatch):
    """packing: false (the padded reference path) takes an attention mask: varlen kinds are refused."""
    monkeypatch.setattr(attention, "_flash_attn_available", lambda: False)
    monkeypatch.setattr(attention, "_varlen_available", lambda: True)
    assert choose_attn_implementation("auto", "cuda", packing=False) == "sdpa"
    assert choose_attn_implementation("auto", "cpu", packing=False) == "sdpa"
    for impl in (VARLEN, SDPA_VARLEN):
        with pytest.raises(ValueError, match="padded batches .packing: false. need 'sdpa'"):
            choose_attn_implementation(impl, "cuda", packing=False)


def test_impossible_choices_are_config_errors_naming_the_key(monkeypatch):
    """Every refusal is the project's ConfigError (the CLI: one line, exit 2), naming attn_implementation
    and the value."""
    from simpo_ds.config import ConfigError
    from simpo_ds.shared_attention import FLEX, choose_shared_attn_implementation

    installed = {"flash": False, "varlen": False}
    monkeypatch.setattr(attention, "_flash_attn_available", lambda: installed["flash"])
    monkeypatch.setattr(attention, "_varlen_available", lambda: installed["varlen"])
    refusals = [lambda: choose_attn_implementation("flash", "cuda"),
                lambda: choose_attn_implementation("flash_attention_2", "cpu"),
                lambda: choose_attn_implementation("flash_attention_2", "cuda"),
                lambda: choose_attn_implementation(VARLEN, "cpu"),
                lambda: choose_attn_implementation(VARLEN, "cuda"),
                lambda: choose_attn_implementation(SDPA_VARLEN, "cpu", packing=False),
                lambda: choose_shared_attn_implementation(VARLEN, "cuda"),
                lambda: choose_shared_attn_implementation(SDPA_VARLEN, "cpu"),
                lambda: choose_shared_attn_implementation(FLEX, "cpu"),
                lambda: choose_shared_attn_implementation("flex_attention", "cuda")]
    for refuse in refusals:
        with pytest.raises(ConfigError, match=r"^config key 'attn_implementation': '[a-z_0-9]+' ") as err:
            refuse()
        assert "\n" not in str(err.value)
    installed.update(flash=True, varlen=True)  # a GPU node with both kernels, and a model in fp32
    for impl in (VARLEN, "flash_attention_2"):
        with pytest.raises(ConfigError, match=rf"^config key 'attn_implementation': '{impl}' runs a flash kernel, "
                                              r"which takes float16/bfloat16 only, and the model is torch.float32 "
                                              r"\(torch_dtype\): set torch_dtype bfloat16"):
            choose_attn_implementation(impl, "cuda", dtype=torch.float32)
        assert choose_attn_implementation(impl, "cuda", dtype=torch.bfloat16) == impl


def test_choose_explicit(monkeypatch):
    monkeypatch.setattr(attention, "_flash_attn_available", lambda: False)
    monkeypatch.setattr(attention, "_varlen_available", lambda: True)
    for impl in ("sdpa", "eager"):
        assert choose_attn_implementation(impl, "cpu") == impl
        assert choose_attn_implementation(impl, "cuda") == impl
    assert choose_attn_implementation(VARLEN, "cuda") == VARLEN
    assert choose_attn_implementation(SDPA_VARLEN, "cpu") == SDPA_VARLEN
    assert VARLEN in AttentionInterface() and SDPA_VARLEN in AttentionInterface()  # choosing registers them
    with pytest.raises(ValueError, match=r"pip install simpo-ds\[flash\]"):
        choose_attn_implementation("flash_attention_2", "cuda")
    with pytest.raises(ValueError, match="needs CUDA"):
        choose_attn_implementation("flash_attention_2", "cpu")
    with pytest.raises(ValueError, match="cannot run on 'cpu'.*sdpa"):
        choose_attn_implementation(VARLEN, "cpu")
    with pytest.raises(ValueError, match="not one of"):
        choose_attn_implementation("flash", "cuda")
    monkeypatch.setattr(attention, "_varlen_available", lambda: False)
    with pytest.raises(ValueError, match="torch >= 2.10"):
        choose_attn_implementation(VARLEN, "cuda")
    monkeypatch.setattr(attention, "_flash_attn_available", lambda: True)
    assert choose_attn_implementation("flash_attention_2", "cuda") == "flash_attention_2"


@pytest.mark.skipif(not attention._varlen_available(), reason="torch without torch.nn.attention.varlen")
def test_installed_varlen_attn_signature_is_understood():
    """The adapter knows the installed torch's signature (a causal option, and scale or the q pre-scale)."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    assert "window_size" in params or "is_causal" in params
