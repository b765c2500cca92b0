"""Packed and padded collation (docs/design.md §3) and the step planner (§5), exactly and by property."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from simpo_ds.data.packing import (
    MicroBatchPlan,
    balance_across_ranks,
    collate_packed,
    collate_padded,
    pair_num_tokens,
    plan_step,
)

M = -100  # label of positions without loss


def pair(prompt: list[int], chosen: list[int], rejected: list[int]) -> dict:
    return {
        "chosen_input_ids": prompt + chosen,
        "chosen_prompt_len": len(prompt),
        "rejected_input_ids": prompt + rejected,
        "rejected_prompt_len": len(prompt),
    }


# docs/design.md §3: pairs (P=2, C=3, R=1) and (P=1, C=2, R=2), with ids you can follow by eye.
EXAMPLE = [pair([10, 11], [20, 21, 22], [30]), pair([12], [23, 24], [31, 32])]


def test_packed_design_example():
    """Sequences c0 = [10 11 | 20 21 22], r0 = [10 11 | 30], c1 = [12 | 23 24], r1 = [12 | 31 32]."""
    b = collate_packed(EXAMPLE)
    assert b["input_ids"].tolist() == [[10, 11, 20, 21, 22, 10, 11, 30, 12, 23, 24, 12, 31, 32]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 0, 1, 2]]
    assert b["cu_seqlens"].tolist() == [0, 5, 8, 11, 14]
    assert b["max_seqlen"] == 5
    assert b["labels"].tolist() == [[M, M, 20, 21, 22, M, M, 30, M, 23, 24, M, 31, 32]]
    assert b["seq_to_pair"].tolist() == [0, 0, 1, 1]
    assert b["seq_is_chosen"].tolist() == [True, False, True, False]
    # positions whose NEXT token is a label, that label, its sequence; |y| per sequence
    assert b["pred_positions"].tolist() == [1, 2, 3, 6, 8, 9, 11, 12]
    assert b["pred_labels"].tolist() == [20, 21, 22, 30, 23, 24, 31, 32]
    assert b["pred_seq"].tolist() == [0, 0, 0, 1, 2, 2, 3, 3]
    assert b["seq_num_tokens"].tolist() == [3, 1, 2, 2]
    assert b["chosen_seq"].tolist() == [0, 2] and b["rejected_seq"].tolist() == [1, 3]
    assert (b["num_pairs"], b["num_tokens"]) == (2, 14)
    assert "attention_mask" not in b  # a packed row must never carry an all-ones mask (§3)
    dtypes = {k: b[k].dtype for k in ("input_ids", "position_ids", "labels", "cu_seqlens", "seq_to_pair",
                                       "seq_is_chosen", "pred_positions", "pred_labels", "pred_seq",
                                       "seq_num_tokens", "chosen_seq", "rejected_seq")}
    assert dtypes == {**{k: torch.int64 for k in dtypes}, "cu_seqlens": torch.int32, "seq_is_chosen": torch.bool}
    assert b["input_ids"].shape == b["position_ids"].shape == b["labels"].shape == (1, 14)


def test_padded_design_example():
    """Rows [c0, c1, r0, r1] right-padded to 5 with pad id 0; pred positions index the [4 x 5] grid."""
    b = collate_padded(EXAMPLE, pad_token_id=0)
    assert b["input_ids"].tolist() == [
        [10, 11, 20, 21, 22],
        [12, 23, 24, 0, 0],
        [10, 11, 30, 0, 0],
        [12, 31, 32, 0, 0],
    ]
    assert b["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert b["labels"].tolist() == [[M, M, 20, 21, 22], [M, 23, 24, M, M], [M, M, 30, M, M], [M, 31, 32, M, M]]
    assert b["pred_positions"].tolist() == [1, 2, 3, 5, 6, 11, 15, 16]
    assert b["pred_labels"].tolist() == [20, 21, 22, 23, 24, 30, 31, 32]
    assert b["pred_seq"].tolist() == [0, 0, 0, 1, 1, 2, 3, 3]
    assert b["seq_num_tokens"].tolist() == [3, 2, 1, 2]
    assert b["seq_to_pair"].tolist() == [0, 1, 0, 1]
    assert b["seq_is_chosen"].tolist() == [True, True, False, False]
    assert b["chosen_seq"].tolist() == [0, 1] and b["rejected_seq"].tolist() == [2, 3]
    assert (b["num_pairs"], b["num_tokens"]) == (2, 14)


def test_empty_prompt_still_leaves_first_position_unlabelled():
    """prompt_len 0: the first answer token has no previous position in its sequence, so no label
    (|y| = len - 1, as the reference's labels[:, 1:]); nothing predicts across the boundary."""
    b = collate_packed([pair([], [20, 21], [30, 31, 32])])
    assert b["labels"].tolist() == [[M, 21, M, 31, 32]]
    assert b["pred_positions"].tolist() == [0, 2, 3] and b["seq_num_tokens"].tolist() == [1, 2]


pair_shapes = st.lists(st.tuples(st.integers(0, 6), st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=5)


@settings(max_examples=60, deadline=None)
@given(shapes=pair_shapes)
def test_packed_and_padded_index_the_same_tokens(shapes):
    """For any pairs: packed labels never cross a boundary, position ids restart, and per sequence
    the packed and padded reducer indices name the same label tokens."""
    next_id = iter(range(1, 10_000))
    pairs = [pair(*[[next(next_id) for _ in range(n)] for n in s]) for s in shapes]
    packed, padded = collate_packed(pairs), collate_padded(pairs, pad_token_id=0)
    ids, labels, cu = packed["input_ids"][0], packed["labels"][0], packed["cu_seqlens"].long()
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    assert torch.equal(labels[starts], torch.full_like(starts, M))
    assert torch.equal(packed["position_ids"][0], torch.cat([torch.arange(n) for n in lengths.tolist()]))
    assert packed["max_seqlen"] == lengths.max().item()
    pos, seq = packed["pred_positions"], packed["pred_seq"]
    assert torch.equal(torch.searchsorted(cu, pos + 1, right=True) - 1, seq)  # p + 1 in p's own sequence
    assert torch.equal(torch.searchsorted(cu, pos, right=True) - 1, seq)
    assert torch.equal(labels[pos + 1], packed["pred_labels"]) and torch.equal(ids[pos + 1], packed["pred_labels"])
    assert (labels != M).sum().item() == len(pos) == packed["seq_num_tokens"].sum().item()
    n = len(pairs)
    to_padded = [i // 2 if i % 2 == 0 else n + i // 2 for i in range(2 * n)]  # c0 r0 c1 r1 -> c0 c1 r0 r1
    for s in range(2 * n):
        got = packed["pred_labels"][packed["pred_seq"] == s]
        ref = padded["pred_labels"][padded["pred_seq"] == to_padded[s]]
        assert torch.equal(got, ref)
        assert packed["seq_num_tokens"][s] == padded["seq_num_tokens"][to_padded[s]]
    plen = [p[f"{k}_prompt_len"] for p in pairs for k in ("chosen", "rejected")]
    assert packed["seq_num_tokens"].tolist() == [length - max(p, 1) for length, p in zip(lengths.tolist(), plen)]


# ---------------------------------------------------------------------------------------------
# planning
# ---------------------------------------------------------------------------------------------
def plan_quietly(lengths, world_size, max_tokens):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_step(lengths, world_size, max_tokens)
    return plan, [w for w in caught if "exceeds max_tokens_per_microbatch" in str(w.message)]


@settings(max_examples=300, deadline=None)
@given(
    lengths=st.lists(st.integers(2, 300), min_size=1, max_size=40),
    world_size=st.integers(1, 4),
    max_tokens=st.integers(4, 600),
)
def test_plan_step_properties(lengths, world_size, max_tokens):
    plan, oversize_warnings = plan_quietly(lengths, world_size, max_tokens)
    assert len(plan) == world_size
    count = len(plan[0])
    assert count >= 1 and all(len(rank) == count for rank in plan), "ranks must run the same number of passes"
    real = Counter(i for rank in plan for mb in rank if mb.weight == 1.0 for i in mb.pairs)
    assert real == Counter(range(len(lengths))), "every pair exactly once with weight 1"
    shortest = min(range(len(lengths)), key=lambda i: (lengths[i], i))
    loads = []
    for rank in plan:
        load = 0
        for mb in rank:
            assert isinstance(mb, MicroBatchPlan) and mb.pairs and mb.weight in (0.0, 1.0)
            tokens = sum(lengths[i] for i in mb.pairs)
            if mb.weight == 0.0:
                assert mb.pairs == (shortest,), "a filler is one copy of the step's shortest pair"
                continue
            load += tokens
            if len(mb.pairs) >= 2:
                assert tokens <= max_tokens, "a packed micro-batch exceeds the token budget"
            if any(lengths[i] > max_tokens for i in mb.pairs):
                assert len(mb.pairs) == 1, "an over-budget pair must be alone"
        loads.append(load)
    assert max(loads) <= min(loads) + max(lengths), f"unbalanced rank loads {loads}"
    assert bool(oversize_warnings) == any(n > max_tokens for n in lengths)
    assert plan_quietly(list(lengths), world_size, max_tokens)[0] == plan, "the plan must be deterministic"
    assert plan_quietly(tuple(lengths), world_size, max_tokens)[0] == plan


def test_rank_without_pairs_still_runs_filler_microbatches():
    """World 4, 2 pairs: two ranks get one pair each, the other two one zero-weight filler each."""
    plan = plan_step([9, 7], world_size=4, max_tokens=100)
    assert [len(rank) for rank in plan] == [1, 1, 1, 1]
    assert sorted(mb.pairs for rank in plan for mb in rank if mb.weight == 1.0) == [(0,), (1,)]
    fillers = [mb for rank in plan for mb in rank if mb.weight == 0.0]
    assert fillers == [MicroBatchPlan((1,), weight=0.0)] * 2  # pair 1 is the shortest


def test_ranks_with_fewer_bins_split_before_using_fillers():
    """Lengths 30, 30, 25, 20 over 2 ranks, budget 50: rank 0 gets 30 + 25 (two micro-batches),
    rank 1 gets 30 + 20 (fits one) and is split to two, so no compute is wasted on fillers."""
    plan = plan_step([30, 30, 25, 20], world_size=2, max_tokens=50)
    assert plan == [[MicroBatchPlan((0,)), MicroBatchPlan((2,))], [MicroBatchPlan((1,)), MicroBatchPlan((3,))]]


def test_over_budget_pair_gets_its_own_microbatch_with_a_warning():
    with pytest.warns(UserWarning, match=r"a pair of 50 tokens exceeds max_tokens_per_microbatch=20"):
        plan = plan_step([50, 5, 5, 4], world_size=1, max_tokens=20)
    (rank,) = plan
    assert (0,) in [mb.pairs for mb in rank]
    assert sorted(i for mb in rank for i in mb.pairs) == [0, 1, 2, 3]
    assert len(rank) == 2  # 5 + 5 + 4 share one micro-batch


def test_balance_across_ranks_longest_first():
    """Lengths 10, 9, 8, 1 over 2 ranks: 10 -> r0, 9 -> r1, 8 -> r1 (9 < 10), 1 -> r0: loads 11 / 17."""
    assert balance_across_ranks([10, 9, 8, 1], 2) == [[0, 3], [1, 2]]


def test_pair_num_tokens_counts_the_prompt_twice():
    assert [pair_num_tokens(p) for p in EXAMPLE] == [8, 6]
    assert plan_step([pair_num_tokens(p) for p in EXAMPLE], 1, 14)[0] == [MicroBatchPlan((0, 1))]


def test_plan_step_needs_a_pair():
    with pytest.raises(ValueError, match="at least one pair"):
        plan_step([], 2, 100)
