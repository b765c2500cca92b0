"""Prompt sharing ([prompt | chosen | rejected] once per pair) == standard packing == padded reference.

The shared path (plan by shared lengths, ``collate_shared``, ``SimPOPolicy`` with the explicit 4-D mask,
the chunked reducer, the step-normalised loss) must give the same per-sequence log-probs, every metric
and every gradient as the standard packed path AND the princeton-nlp/SimPO padded reference (fp32,
relative 1e-5, tests/reference.py): Llama and Qwen2, sdpa and eager, 1-token answers and prompts, seams,
truncated text, gradient checkpointing, LoRA, random shapes. Plus the worked example's exact tensors,
the mask rule, FlexAttention's mask_mod (and its registered forward, on CPU without grad), the trainer
hooks, and an end-to-end ZeRO-3 run whose step-1 loss equals the unshared run's.
"""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import assert_close, assert_grads_close, assert_metrics_close, grads, reference_step
from test_packed_equivalence import VOCAB, make_pair, microbatched_step, packed_step, varied_pairs
from tiny_models import tiny_model

from simpo_ds.config import SimPOConfig
from simpo_ds.data.sharing import (
    collate_shared,
    shared_attention_mask,
    shared_pair_num_tokens,
    shared_prefix_len,
)
from simpo_ds.loss import StepNormalizer
from simpo_ds.model import SimPOPolicy, prepare_model
from simpo_ds.shared_attention import (
    FLEX,
    choose_shared_attn_implementation,
    flex_shared_attention_forward,
    prompt_sharing_mask,
    register_shared_attention,
    shared_block_mask,
    shared_mask_mod,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def pair(chosen_prompt, rejected_prompt, chosen, rejected) -> dict:
    return {
        "chosen_input_ids": chosen_prompt + chosen,
        "chosen_prompt_len": len(chosen_prompt),
        "rejected_input_ids": rejected_prompt + rejected,
        "rejected_prompt_len": len(rejected_prompt),
    }


# The module docstring's example (docs/design.md §3 pairs + a seam pair).
EXAMPLE = [
    pair([10, 11], [10, 11], [20, 21, 22], [30]),
    pair([12], [12], [23, 24], [31, 32]),
    pair([13, 14], [13, 15], [25], [33, 34]),
]


def seam_pairs(seed: int = 0) -> list[dict]:
    """Edge cases of the shared prefix: 1-token prompts (equal, and differing: nothing shared), prompts
    of different lengths (the seam token merged into one answer), 1-token answers, a 2-token prompt
    differing in its last token."""
    rng = random.Random(seed)

    def ids(n):
        return [rng.randrange(1, VOCAB) for _ in range(n)]

    p = ids(6)
    return [
        pair([7], [7], ids(1), ids(1)),  # 1-token prompt, 1-token answers
        pair([7], [8], ids(3), ids(2)),  # 1-token prompts that differ: s = 0
        pair(p, p[:-1], ids(1), ids(4)),  # rejected's seam token merged into its answer: s = 5
        pair(p[:-1], p, ids(5), ids(1)),  # the other way round
        pair([3, 4], [3, 5], ids(2), ids(1)),  # seam in the last of 2 tokens: s = 1
        pair(ids(9), ids(9), ids(1), ids(6)),  # random prompts: s = 0 almost surely
    ]


# ---------------------------------------------------------------------------------------------
# our shared step (mirrors test_packed_equivalence.packed_step)
# ---------------------------------------------------------------------------------------------
def shared_step(model, pairs, max_tokens=10_000, chunk_size=7, **kw):
    """Plan by shared lengths -> collate_shared micro-batches -> policy -> normalised loss, backward."""
    policy = SimPOPolicy(model, chunk_size=chunk_size)
    lengths = [shared_pair_num_tokens(p) for p in pairs]
    norm = StepNormalizer(len(pairs), sum(len(p["chosen_input_ids"]) - max(p["chosen_prompt_len"], 1) for p in pairs))

    def collate(micro_pairs):
        batch = collate_shared(micro_pairs)
        assert batch["num_tokens"] <= max(max_tokens, max(lengths))
        return batch

    return microbatched_step(policy, pairs, lengths, collate, norm, max_tokens, **kw)


def check_three_way(model, pairs, max_tokens=10_000, **kw):
    """shared == padded reference and shared == standard packed: logps, metrics, gradients."""
    ref_loss, ref_logps, ref_metrics = reference_step(model, pairs, **kw)
    ref_loss.backward()
    ref_grads = grads(model)
    loss_kw = dict(beta=kw.get("beta", 2.0), gamma_beta_ratio=kw.get("ratio", 0.25),
                   loss_type=kw.get("loss_type", "sigmoid"), label_smoothing=kw.get("eps", 0.0),
                   sft_weight=kw.get("sft_weight", 0.0))
    logps, metrics = shared_step(model, pairs, max_tokens=max_tokens, **loss_kw)
    shared_grads = grads(model)
    packed_logps, packed_metrics = packed_step(model, pairs, max_tokens=max_tokens, **loss_kw)
    packed_grads = grads(model)
    assert_close(logps, ref_logps, "shared vs reference: per-sequence average log-probs")
    assert_metrics_close(metrics, ref_metrics)
    assert_grads_close(shared_grads, ref_grads)
    assert_close(logps, packed_logps, "shared vs packed: per-sequence average log-probs")
    assert_metrics_close(metrics, {**packed_metrics, "_logit_scale": ref_metrics["_logit_scale"]})
    assert_grads_close(shared_grads, packed_grads)


# ---------------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------------
def test_worked_example_exact_tensors():
    """simpo_ds/data/sharing.py's docstring example, tensor by tensor."""
    b = collate_shared(EXAMPLE)
    assert b["input_ids"].tolist() == [[10, 11, 20, 21, 22, 30, 12, 23, 24, 31, 32, 13, 14, 25, 15, 33, 34]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 0, 1, 2, 1, 2, 0, 1, 2, 1, 2, 3]]
    assert b["segment_ids"].tolist() == [[0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2]]
    assert b["role_ids"].tolist() == [[0, 0, 1, 1, 1, 2, 0, 1, 1, 2, 2, 0, 1, 1, 2, 2, 2]]
    assert b["pred_positions"].tolist() == [1, 2, 3, 1, 6, 7, 6, 9, 12, 14, 15]
    assert b["pred_labels"].tolist() == [20, 21, 22, 30, 23, 24, 31, 32, 25, 33, 34]
    assert b["pred_seq"].tolist() == [0, 0, 0, 1, 2, 2, 3, 3, 4, 5, 5]
    assert b["seq_num_tokens"].tolist() == [3, 1, 2, 2, 1, 2]
    assert b["chosen_seq"].tolist() == [0, 2, 4] and b["rejected_seq"].tolist() == [1, 3, 5]
    assert b["seq_to_pair"].tolist() == [0, 0, 1, 1, 2, 2]
    assert b["seq_is_chosen"].tolist() == [True, False] * 3
    assert (b["num_pairs"], b["num_tokens"], b["seq_sq_sum"]) == (3, 17, (25 + 9 - 4) + (9 + 9 - 1) + (9 + 16 - 1))
    assert "attention_mask" not in b and "cu_seqlens" not in b and "labels" not in b
    assert [shared_prefix_len(p) for p in EXAMPLE] == [2, 1, 1]
    assert [shared_pair_num_tokens(p) for p in EXAMPLE] == [6, 5, 6]
    dtypes = {k: b[k].dtype for k in ("input_ids", "position_ids", "segment_ids", "role_ids", "pred_positions",
                                       "pred_labels", "pred_seq", "seq_num_tokens", "chosen_seq", "rejected_seq")}
    assert set(dtypes.values()) == {torch.int64}
    assert b["input_ids"].shape == b["position_ids"].shape == b["segment_ids"].shape == b["role_ids"].shape == (1, 17)
    # pair 0's rows of the mask: prompt causal; chosen sees prompt + itself; rejected (row 5) NOT chosen
    m = shared_attention_mask(b["segment_ids"], b["role_ids"])[0, 0].int().tolist()
    assert [row[:6] for row in m[:6]] == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 0, 0, 0, 1],
    ]
    assert m[14][11:17] == [1, 0, 0, 1, 0, 0]  # pair 2's rejected seam token 15 sees 13, not 14/25
    assert all(m[q][k] == 0 for q in range(6, 17) for k in range(6))  # block-diagonal across pairs


def test_every_answer_token_is_predicted_by_its_unshared_context():
    """For each pred row: the tokens it may attend to (mask) at their positions are exactly the
    sequence's prefix before the label in the unshared layout."""
    pairs = EXAMPLE + seam_pairs(1) + varied_pairs(3)
    b = collate_shared(pairs)
    ids, pos = b["input_ids"][0].tolist(), b["position_ids"][0].tolist()
    mask = shared_attention_mask(b["segment_ids"], b["role_ids"])[0, 0]
    seqs = [s for p in pairs for s in ((p["chosen_input_ids"], p["chosen_prompt_len"]),
                                       (p["rejected_input_ids"], p["rejected_prompt_len"]))]
    expected = [(s, j) for s, (seq, plen) in enumerate(seqs) for j in range(max(plen, 1), len(seq))]
    got = list(zip(b["pred_seq"].tolist(), b["pred_positions"].tolist(), b["pred_labels"].tolist()))
    assert len(got) == len(expected)
    for (s, row, label), (s2, j) in zip(got, expected):
        seq = seqs[s][0]
        assert s == s2 and label == seq[j]
        context = sorted((pos[k], ids[k]) for k in mask[row].nonzero().flatten().tolist())
        assert context == list(enumerate(seq[:j])), (s, j)


def test_mask_equals_rule_bool_and_additive():
    b = collate_shared(seam_pairs(2) + EXAMPLE)
    seg, role = b["segment_ids"][0].tolist(), b["role_ids"][0].tolist()
    n = len(seg)
    rule = torch.tensor([[seg[q] == seg[k] and k <= q and not (role[q] == 2 and role[k] == 1) for k in range(n)]
                         for q in range(n)])
    dense = shared_attention_mask(b["segment_ids"], b["role_ids"])
    assert dense.shape == (1, 1, n, n) and dense.dtype == torch.bool
    assert torch.equal(dense[0, 0], rule)
    assert torch.equal(shared_attention_mask(b["segment_ids"][0], b["role_ids"][0]), dense)  # [T] ids too
    for dtype in (torch.float32, torch.bfloat16):
        additive = shared_attention_mask(b["segment_ids"], b["role_ids"], dtype)
        assert additive.dtype == dtype
        assert torch.equal(additive[0, 0] == 0, rule)
        assert (additive[0, 0][~rule] == torch.finfo(dtype).min).all()


def test_flex_mask_mod_equals_dense_mask():
    """FlexAttention's mask_mod over every (q, k) index pair == the dense mask (broadcast and torch's
    own create_mask), and the BlockMask built from it densifies to the same mask."""
    from torch.nn.attention.flex_attention import create_mask

    b = collate_shared(EXAMPLE + seam_pairs(3) + varied_pairs(4))
    seg, role = b["segment_ids"], b["role_ids"]
    n = seg.shape[1]
    dense = shared_attention_mask(seg, role)[0, 0]
    mask_mod = shared_mask_mod(seg, role)
    zero = torch.tensor(0)
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    assert torch.equal(mask_mod(zero, zero, q, k), dense)
    for qi, ki in itertools.product(range(0, n, 7), range(n)):  # scalar index pairs, as the kernel sees them
        assert bool(mask_mod(zero, zero, torch.tensor(qi), torch.tensor(ki))) == bool(dense[qi, ki])
    assert torch.equal(create_mask(mask_mod, 1, 1, n, n, device="cpu")[0, 0], dense)
    block = shared_block_mask(seg, role)
    assert block.shape == (1, 1, n, n)
    assert torch.equal(create_mask(block.mask_mod, 1, 1, n, n, device="cpu")[0, 0], dense)


# ---------------------------------------------------------------------------------------------
# equivalence: shared == packed == padded reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_equals_packed_and_padded(arch, attn):
    model = tiny_model(arch, attn_implementation=attn, seed=11)
    check_three_way(model, varied_pairs(0) + seam_pairs(0), sft_weight=0.2)


def test_edge_cases_one_token_prompts_answers_and_seams_several_microbatches():
    model = tiny_model("qwen2", attn_implementation="sdpa", seed=12)
    check_three_way(model, seam_pairs(5), max_tokens=16)
    check_three_way(model, seam_pairs(6), max_tokens=16, loss_type="hinge")


@pytest.mark.parametrize("mode, arch", [("keep_end", "llama"), ("keep_start", "qwen2")])
def test_truncated_text_shared_equals_packed_and_padded(mode, arch):
    """Text -> tokenize_dataset (chat template, truncation of prompts and answers) -> all three paths."""
    from test_truncated_equivalence import TOKENIZER, TRUNCATION_ROWS, tokenize

    cfg = SimPOConfig(max_length=24, max_prompt_length=12, truncation_mode=mode)
    pairs = tokenize(TRUNCATION_ROWS, cfg)
    assert [p["chosen_prompt_len"] for p in pairs] == [9, 12, 12, 9, 8]  # prompts really were cut
    assert all(shared_prefix_len(p) == p["chosen_prompt_len"] for p in pairs)
    model = tiny_model(arch, seed=13, vocab_size=len(TOKENIZER))
    check_three_way(model, pairs, max_tokens=48, sft_weight=0.2)


def test_seam_from_real_tokenizer():
    """A tokenizer that merges across the seam: the prompts differ in their last token / length."""
    from test_truncated_equivalence import TOKENIZER, tokenize

    rows = [{"prompt": "w1 w2 w3", "chosen": " w4 w5", "rejected": "w6 w7"},  # 'w3w6' -> <unk>: seam merge
            {"prompt": "w8", "chosen": "w9", "rejected": " w10"}]
    pairs = tokenize(rows, SimPOConfig(max_length=64, max_prompt_length=32))
    prompts = [(p["chosen_input_ids"][: p["chosen_prompt_len"]], p["rejected_input_ids"][: p["rejected_prompt_len"]])
               for p in pairs]
    assert any(c != r for c, r in prompts), prompts  # the seam rule really split a prompt
    model = tiny_model("llama", seed=14, vocab_size=len(TOKENIZER))
    check_three_way(model, pairs)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shapes=st.lists(st.tuples(st.integers(1, 20), st.integers(1, 20), st.integers(1, 20), st.integers(0, 3)),
                    min_size=1, max_size=6),
    max_tokens=st.integers(8, 120),
    seed=st.integers(0, 1000),
)
def test_property_shared_equals_packed_and_padded(shapes, max_tokens, seed):
    """Random prompt/answer lengths, seams (last token differs, or one prompt a token shorter), budgets."""
    rng = random.Random(seed)
    pairs = []
    for prompt_len, chosen_len, rejected_len, seam in shapes:
        p = make_pair(rng, prompt_len, chosen_len, rejected_len, seam=seam == 1)
        if seam == 2 and prompt_len > 1:  # rejected's last prompt token merged into its answer
            p["rejected_prompt_len"] -= 1
        pairs.append(p)
    model = tiny_model("llama", attn_implementation="sdpa", seed=15)
    check_three_way(model, pairs, max_tokens=max_tokens, sft_weight=0.1)


def test_gradient_checkpointing_shared_equals_reference():
    model = tiny_model("llama", seed=16)
    pairs = varied_pairs(5) + seam_pairs(7)
    loss, ref_logps, _ = reference_step(model, pairs)
    loss.backward()
    expected = grads(model)
    model = prepare_model(model, SimPOConfig(gradient_checkpointing=True))
    model.train()
    assert model.is_gradient_checkpointing
    logps, _ = shared_step(model, pairs, max_tokens=60, beta=2.0, gamma_beta_ratio=0.25)
    assert_close(logps, ref_logps, "per-sequence average log-probs")
    assert_grads_close(grads(model), expected)


def test_lora_shared_equals_packed_and_padded():
    cfg = SimPOConfig(use_peft=True, lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "k_proj", "v_proj"])
    model = prepare_model(tiny_model("qwen2", attn_implementation="eager", seed=17), cfg)
    with torch.no_grad():  # LoRA B starts at zero (and A's gradient with it): give it values
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    check_three_way(model, varied_pairs(6) + seam_pairs(8), max_tokens=64)
    model.zero_grad()


# ---------------------------------------------------------------------------------------------
# attention backends
# ---------------------------------------------------------------------------------------------
def test_flex_attention_forward_on_cpu_equals_dense_sdpa():
    """The registered FlexAttention function with the row's BlockMask, through the model body (CPU,
    forward only: torch's unfused flex implementation) == the dense sdpa path."""
    register_shared_attention()
    pairs = varied_pairs(7) + seam_pairs(9)
    batch = collate_shared(pairs)
    dense_model = tiny_model("llama", attn_implementation="sdpa", seed=18)
    flex_model = tiny_model("llama", attn_implementation=FLEX, seed=18)
    assert flex_model.config._attn_implementation == FLEX
    with torch.no_grad():
        expected = SimPOPolicy(dense_model)(batch).average
        got = SimPOPolicy(flex_model)(batch).average
    assert_close(got, expected, "flex vs dense sdpa: per-sequence average log-probs")
    with pytest.raises(RuntimeError, match="no backward on cpu"):  # training on CPU: a clear message
        SimPOPolicy(flex_model)(batch).average.sum().backward()


def test_backend_choice_for_prompt_sharing():
    assert choose_shared_attn_implementation("auto", "cpu") == "sdpa"
    assert choose_shared_attn_implementation("eager", "cpu") == "eager"
    assert choose_shared_attn_implementation("sdpa", "cuda") == "sdpa"
    assert choose_shared_attn_implementation("auto", "cuda") == FLEX
    for impl in ("varlen", "flash_attention_2"):
        with pytest.raises(ValueError, match="'auto' .*'sdpa' or 'eager'"):
            choose_shared_attn_implementation(impl, "cuda")
    with pytest.raises(ValueError, match="no CPU backward"):
        choose_shared_attn_implementation(FLEX, "cpu")


def test_policy_refuses_a_block_diagonal_only_attention():
    """A model loaded with varlen (e.g. prompt_sharing switched on after loading) fails with a message."""
    from simpo_ds.attention import register_attention

    register_attention()
    model = tiny_model("llama", attn_implementation="varlen", seed=19)
    with pytest.raises(ValueError, match="prompt_sharing needs an attention that takes"):
        SimPOPolicy(model)(collate_shared(EXAMPLE))
    with pytest.raises(ValueError, match="prompt_sharing needs an attention that takes"):
        prompt_sharing_mask(collate_shared(EXAMPLE), "flash_attention_2", torch.float32)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(softcap=30.0), "softcapping"),
    (dict(sliding_window=4), "sliding-window"),
    (dict(dropout=0.1), "dropout"),
    (dict(is_causal=False), "not causal"),
])
def test_flex_function_refuses_what_the_mask_cannot_express(kwargs, needle):
    q = torch.zeros(1, 4, 5, 8)
    block = shared_block_mask(*(collate_shared([EXAMPLE[1]])[k] for k in ("segment_ids", "role_ids")))
    with pytest.raises(NotImplementedError, match=needle):
        flex_shared_attention_forward(torch.nn.Module(), q, q, q, block, **kwargs)
    with pytest.raises(ValueError, match="BlockMask"):
        flex_shared_attention_forward(torch.nn.Module(), q, q, q, None)


# ---------------------------------------------------------------------------------------------
# trainer hooks
# ---------------------------------------------------------------------------------------------
def test_trainer_token_counts_and_pair_data_shared_lengths():
    import datasets

    from simpo_ds.data.packing import collate_packed, pair_num_tokens
    from simpo_ds.flops import batch_work
    from simpo_ds.trainer import PairData

    pairs = EXAMPLE + seam_pairs(10)
    data = PairData(datasets.Dataset.from_list(pairs))
    assert data.shared_tokens.tolist() == [shared_pair_num_tokens(p) for p in pairs]
    assert data.pair_tokens.tolist() == [pair_num_tokens(p) for p in pairs]
    assert (data.shared_tokens <= data.pair_tokens).all()
    shared, packed = collate_shared(pairs), collate_packed(pairs)
    work, unshared = batch_work(shared, "sdpa"), batch_work(packed, "sdpa_varlen")
    assert work["real"] == work["processed"] == shared["num_tokens"] == data.shared_tokens.sum()
    assert work["effective"] == unshared["real"] == data.pair_tokens.sum()  # prompts counted twice
    # Σ s_i² of the unshared layout minus one prompt square per pair
    assert shared["seq_sq_sum"] == unshared["pairs_computed"] - sum(shared_prefix_len(p) ** 2 for p in pairs)
    # the needed attention pairs are exactly the (q, k) pairs the mask allows
    allowed = int(shared_attention_mask(shared["segment_ids"], shared["role_ids"]).sum())
    assert work["pairs_needed"] == allowed and work["pairs_computed"] == shared["num_tokens"] ** 2


@pytest.mark.distributed
def test_end_to_end_zero3_step1_loss_equals_unshared(tmp_path):
    """``python launch/train.py ... --prompt_sharing true`` (one process, ZeRO-3): step-1 loss and
    metrics == the same run with prompt_sharing false; fewer tokens processed."""
    from run_assets import make_assets
    from test_distributed import COMMON, ROOT, read_metrics

    assets = make_assets(tmp_path / "assets", pairs=48)
    runs = {}
    for sharing in ("false", "true"):
        out = tmp_path / f"sharing_{sharing}"
        args = ["--model_name_or_path", assets["model"], "--train_data", assets["train"], "--output_dir", str(out),
                "--ds", "ds_configs/zero3.json", "--max_tokens_per_microbatch", "128", "--save_final", "false",
                "--max_steps", "2", "--attn_implementation", "auto", "--prompt_sharing", sharing, *COMMON]
        result = subprocess.run([sys.executable, "launch/train.py", *args], cwd=ROOT, capture_output=True, text=True,
                                env=dict(os.environ, WANDB_MODE="disabled"), timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        runs[sharing] = read_metrics(out)
    base, shared = runs["false"], runs["true"]
    assert [r["step"] for r in shared] == [1, 2]
    for name in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert shared[0][name] == pytest.approx(base[0][name], rel=1e-5), name
    assert shared[0]["rewards/accuracies"] == base[0]["rewards/accuracies"]
    assert shared[1]["loss"] == pytest.approx(base[1]["loss"], rel=1e-3)  # after one (equal) update
    assert shared[0]["tokens/real"] < base[0]["tokens/real"]  # each prompt computed once
