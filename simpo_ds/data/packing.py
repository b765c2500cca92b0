"""Step planning and collation: token-budget packing of preference pairs into varlen rows.

A tokenized pair (``simpo_ds.data.tokenize.tokenize_pair``) is a dict::

    {"chosen_input_ids": [p.., c..], "chosen_prompt_len": len(p),
     "rejected_input_ids": [p.., r..], "rejected_prompt_len": len(p)}

**Planning** (pure Python, deterministic, computed identically on every rank — no collective needed):
the pairs of one optimizer step are balanced across ranks by tokens, packed per rank into micro-batches
under ``max_tokens`` (pairs are atomic), and every rank gets the SAME number of micro-batches (ZeRO-3
all-gathers parameters in every forward: a rank with fewer forwards would hang the job). Ranks short of
micro-batches split their fullest ones; a rank with nothing left to split (or no pairs at all) runs a
zero-weight copy of a pair.

**Packed collation** (docs/design.md §3): ONE row per micro-batch, for each pair i: ``prompt_i+chosen_i``
then ``prompt_i+rejected_i``. Example, pairs (P=2, C=3, R=1) and (P=1, C=2, R=2)::

    lengths      [5, 3, 3, 3]
    cu_seqlens   [0, 5, 8, 11, 14]            int32, max_seqlen = 5
    position_ids [0 1 2 3 4 | 0 1 2 | 0 1 2 | 0 1 2]
    labels       [- - c c c | - - r | - c c | - r r]   (- = -100: prompt, or a sequence's 1st token)
    seq_to_pair  [0, 0, 1, 1]   seq_is_chosen [T, F, T, F]

**Padded collation** is the reference layout (``SimPOTrainer.concatenated_inputs``): all chosen rows,
then all rejected rows, right-padded to the longest, with an attention mask. Both collators add the
prediction index the reducer needs, so no device sync is needed to find valid labels::

    pred_positions [N]  flat index into input_ids.view(-1) of the positions whose NEXT token is a label
    pred_labels    [N]  that next token;   pred_seq [N] its sequence
    seq_num_tokens [S]  answer tokens per sequence (|y|, EOS included)
    chosen_seq / rejected_seq [P]  sequence index of each pair's chosen / rejected
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

Pair = dict  # a tokenized pair, see module docstring


def pair_num_tokens(pair: Pair) -> int:
    """Tokens the pair occupies in a packed row (prompt counted twice)."""
    return len(pair["chosen_input_ids"]) + len(pair["rejected_input_ids"])


# ---------------------------------------------------------------------------------------------
# planning
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MicroBatchPlan:
    """Pair indices (into the step's pair list) of one micro-batch; ``weight`` 0 marks a filler."""

    pairs: tuple[int, ...]
    weight: float = 1.0


def balance_across_ranks(lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Longest-first greedy: each pair goes to the rank with the fewest tokens so far.

    Returns per-rank lists of pair indices (each list in ascending index order).
    """
    loads = [0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], len(shards[r]), r))
        loads[rank] += lengths[i]
        shards[rank].append(i)
    return [sorted(s) for s in shards]


def pack_by_tokens(indices: Sequence[int], lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """First-fit decreasing bin packing of ``indices`` under ``max_tokens`` tokens per bin.

    A pair longer than the budget gets a bin of its own (with a warning), never dropped.
    """
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        if lengths[i] > max_tokens:
            warnings.warn(
                f"a pair of {lengths[i]} tokens exceeds max_tokens_per_microbatch={max_tokens}; "
                "it gets a micro-batch of its own",
                stacklevel=2,
            )
        for b, load in enumerate(loads):
            if load + lengths[i] <= max_tokens:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    return [sorted(b) for b in bins]


def _split_to_count(bins: list[list[int]], lengths: Sequence[int], count: int) -> list[list[int]]:
    """Split the bins with the most tokens (and >= 2 pairs) until there are ``count`` bins."""
    bins = [list(b) for b in bins]
    while len(bins) < count:
        splittable = [b for b in bins if len(b) >= 2]
        if not splittable:
            break
        big = max(splittable, key=lambda b: (sum(lengths[i] for i in b), -b[0]))
        bins.remove(big)
        half, acc, total = [], 0, sum(lengths[i] for i in big)
        for i in big:  # first half by tokens, at least one pair on each side
            if half and (acc + lengths[i] > total / 2 or len(half) == len(big) - 1):
                break
            half.append(i)
            acc += lengths[i]
        bins += [half, [i for i in big if i not in half]]
    return bins


def plan_step(lengths: Sequence[int], world_size: int, max_tokens: int) -> list[list[MicroBatchPlan]]:
    """Plan one optimizer step: ``[rank][micro-batch] -> MicroBatchPlan``.

    Every rank gets the same number of micro-batches; every pair appears exactly once with weight 1.
    Fillers (weight 0) reuse the step's shortest pair so the forward is cheap.
    """
    if not lengths:
        raise ValueError("plan_step needs at least one pair")
    shards = balance_across_ranks(lengths, world_size)
    per_rank = [pack_by_tokens(s, lengths, max_tokens) for s in shards]
    count = max(len(b) for b in per_rank)
    shortest = min(range(len(lengths)), key=lambda i: (lengths[i], i))
    plan = []
    for bins in per_rank:
        bins = _split_to_count(bins, lengths, count)
        bins.sort(key=lambda b: b[0])
        micro = [MicroBatchPlan(tuple(b)) for b in bins]
        micro += [MicroBatchPlan((shortest,), weight=0.0)] * (count - len(micro))
        plan.append(micro)
    return plan


# ---------------------------------------------------------------------------------------------
# collation
# ---------------------------------------------------------------------------------------------
def _sequences(pairs: Sequence[Pair]) -> list[tuple[list[int], int]]:
    """(ids, prompt_len) of every sequence in packed order: chosen_0, rejected_0, chosen_1, ..."""
    out = []
    for p in pairs:
        out.append((p["chosen_input_ids"], p["chosen_prompt_len"]))
        out.append((p["rejected_input_ids"], p["rejected_prompt_len"]))
    return out


def _label_range(length: int, prompt_len: int) -> range:
    """Positions (within a sequence) that carry a label: the answer, never position 0."""
    return range(max(prompt_len, 1), length)


def collate_packed(pairs: Sequence[Pair], label_pad_token_id: int = -100) -> dict:
    """Pack pairs into one varlen row (module docstring); all tensors on CPU.

    Returns input_ids/position_ids/labels [1, T] int64, cu_seqlens [S+1] int32, max_seqlen int,
    seq_to_pair [S] int64, seq_is_chosen [S] bool, the reducer index (pred_*), seq_num_tokens [S],
    chosen_seq/rejected_seq [P], num_pairs int, num_tokens int.
    """
    seqs = _sequences(pairs)
    ids, pos, labels, pred_pos, pred_seq = [], [], [], [], []
    cu, num_tok = [0], []
    for s, (seq, plen) in enumerate(seqs):
        offset = cu[-1]
        lab = [label_pad_token_id] * len(seq)
        answer = _label_range(len(seq), plen)
        for j in answer:
            lab[j] = seq[j]
        ids += seq
        pos += range(len(seq))
        labels += lab
        pred_pos += [offset + j - 1 for j in answer]
        pred_seq += [s] * len(answer)
        num_tok.append(len(answer))
        cu.append(offset + len(seq))
    n_pairs = len(pairs)
    flat_ids = torch.tensor(ids, dtype=torch.long)
    pred_positions = torch.tensor(pred_pos, dtype=torch.long)
    return {
        "input_ids": flat_ids[None],
        "position_ids": torch.tensor(pos, dtype=torch.long)[None],
        "labels": torch.tensor(labels, dtype=torch.long)[None],
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
        "max_seqlen": max(len(s) for s, _ in seqs),
        "pred_positions": pred_positions,
        "pred_labels": flat_ids[pred_positions + 1],
        "pred_seq": torch.tensor(pred_seq, dtype=torch.long),
        "seq_num_tokens": torch.tensor(num_tok, dtype=torch.long),
        **interleaved_pair_index(n_pairs),
        "num_pairs": n_pairs,
        "num_tokens": len(ids),
    }


def interleaved_pair_index(n_pairs: int) -> dict:
    """Sequence bookkeeping of a packed row holding chosen, rejected of pair 0, then of pair 1, ...:
    seq_to_pair [2P], seq_is_chosen [2P] bool, chosen_seq [P] = 0, 2, ..., rejected_seq [P] = 1, 3, ..."""
    return {
        "seq_to_pair": torch.arange(n_pairs).repeat_interleave(2),
        "seq_is_chosen": torch.tensor([True, False] * n_pairs),
        "chosen_seq": torch.arange(0, 2 * n_pairs, 2),
        "rejected_seq": torch.arange(1, 2 * n_pairs, 2),
    }


def collate_padded(pairs: Sequence[Pair], pad_token_id: int, label_pad_token_id: int = -100) -> dict:
    """The reference padded layout: rows [chosen_0..chosen_{P-1}, rejected_0..rejected_{P-1}].

    Returns input_ids/attention_mask/labels [2P, L] (L = longest sequence), the same reducer
    index as ``collate_packed`` (flat positions into the [2P*L] grid), seq_num_tokens [2P],
    chosen_seq = [0..P-1], rejected_seq = [P..2P-1], num_pairs, num_tokens (real, unpadded).
    """
    n_pairs = len(pairs)
    seqs = [(p["chosen_input_ids"], p["chosen_prompt_len"]) for p in pairs]
    seqs += [(p["rejected_input_ids"], p["rejected_prompt_len"]) for p in pairs]
    width = max(len(s) for s, _ in seqs)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), label_pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    pred_pos, pred_seq, num_tok = [], [], []
    for s, (seq, plen) in enumerate(seqs):
        input_ids[s, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[s, : len(seq)] = 1
        answer = _label_range(len(seq), plen)
        labels[s, answer.start : answer.stop] = input_ids[s, answer.start : answer.stop]
        pred_pos += [s * width + j - 1 for j in answer]
        pred_seq += [s] * len(answer)
        num_tok.append(len(answer))
    pred_positions = torch.tensor(pred_pos, dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "seq_to_pair": torch.arange(n_pairs).repeat(2),
        "seq_is_chosen": torch.arange(2 * n_pairs) < n_pairs,
        "pred_positions": pred_positions,
        "pred_labels": input_ids.view(-1)[pred_positions + 1],
        "pred_seq": torch.tensor(pred_seq, dtype=torch.long),
        "seq_num_tokens": torch.tensor(num_tok, dtype=torch.long),
        "chosen_seq": torch.arange(n_pairs),
        "rejected_seq": torch.arange(n_pairs, 2 * n_pairs),
        "num_pairs": n_pairs,
        "num_tokens": sum(len(s) for s, _ in seqs),
    }
