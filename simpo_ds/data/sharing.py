"""Shared-prompt packing (``prompt_sharing: true``): each pair laid out ONCE as [prompt | chosen | rejected].

The standard packed row (``simpo_ds.data.packing``) holds ``prompt+chosen`` then ``prompt+rejected``,
so every prompt is computed twice. Here a pair is one segment; the two answers see exactly what they
see in the standard layout, so log-probs, loss and gradients are unchanged (up to float rounding):

- chosen attends causally to the prompt and to itself;
- rejected attends to the prompt and to itself, NOT to chosen;
- position ids are those of the unshared layout: rejected's continue from the prompt's end.

The two prompts of a pair may differ in their last token (docs/design.md §2, seam rule), and truncation
may shift them further: the SHARED part is their longest common prefix (length ``s``); the rest of
each prompt stays in that answer's own part, unlabelled. Per token::

    segment_ids  pair index within the row (attention never crosses pairs: block-diagonal)
    role_ids     0 shared prompt prefix, 1 chosen part, 2 rejected part
    allowed(q, k) = segment[q] == segment[k]  and  k <= q  and  not (role[q] == 2 and role[k] == 1)

A sequence's first answer token is predicted by the hidden row of the token before it; for both
answers that row may be the SAME last shared prompt row, so ``pred_positions`` can repeat a row.

Worked example: the §3 pairs (P=2, C=3, R=1) and (P=1, C=2, R=2), plus a seam pair whose prompts
[13 14] / [13 15] differ in their last token (chosen [25], rejected [33 34])::

    pair 0: prompt [10 11], chosen [20 21 22], rejected [30]       s = 2
    pair 1: prompt [12],    chosen [23 24],    rejected [31 32]    s = 1
    pair 2: prompts [13 14] / [13 15], chosen [25], rejected [33 34]   s = 1 (14 / 15 stay unshared)

    index         0  1  2  3  4  5 | 6  7  8  9 10 |11 12 13 14 15 16
    input_ids    10 11 20 21 22 30 |12 23 24 31 32 |13 14 25 15 33 34
    position_ids  0  1  2  3  4  2 | 0  1  2  1  2 | 0  1  2  1  2  3
    segment_ids   0  0  0  0  0  0 | 1  1  1  1  1 | 2  2  2  2  2  2
    role_ids      0  0  1  1  1  2 | 0  1  1  2  2 | 0  1  1  2  2  2

    pred_positions [1 2 3 | 1 | 6 7 | 6 9 | 12 | 14 15]   (row 1 and row 6 predict two answers)
    pred_labels    [20 21 22 | 30 | 23 24 | 31 32 | 25 | 33 34]
    pred_seq       [0 0 0 | 1 | 2 2 | 3 3 | 4 | 5 5]     seq_num_tokens [3 1 2 2 1 2]
    chosen_seq [0 2 4]  rejected_seq [1 3 5]   num_tokens 17 (the standard layout: 21)
    seq_sq_sum (25 + 9 - 4) + (9 + 9 - 1) + (9 + 16 - 1) = 71   (the standard layout: 77)

Attention cost: ``seq_sq_sum`` = Σ over pairs of len(chosen)² + len(rejected)² − s², i.e. twice the
number of (q, k) pairs the mask allows (the causal-not-discounted convention of
``simpo_ds.flops``, where a causal sequence of length n counts n², and (seq_sq_sum + T) / 2 are the
allowed pairs exactly): the standard
layout's Σ s_i² minus the prompt-prompt square that is now computed once instead of twice.

No ``labels`` tensor (a row can hold two next-token labels for one position) and no ``cu_seqlens``
(a pair segment is not causal-within-segment: varlen/flash kernels cannot run it); attention takes
the mask built by :func:`shared_attention_mask` (dense, sdpa/eager) or a FlexAttention BlockMask
(``simpo_ds.shared_attention``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from simpo_ds.data.packing import interleaved_pair_index

Pair = dict  # a tokenized pair (``simpo_ds.data.packing`` docstring)

PROMPT, CHOSEN, REJECTED = 0, 1, 2  # role_ids values


def shared_prefix_len(pair: Pair) -> int:
    """Length of the longest common prefix of the pair's two prompts (the shared part)."""
    a = pair["chosen_input_ids"][: pair["chosen_prompt_len"]]
    b = pair["rejected_input_ids"][: pair["rejected_prompt_len"]]
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # fast paths (C-speed list compares): equal prompts, or a seam in the last token
        return n
    if n > 1 and a[: n - 1] == b[: n - 1]:
        return n - 1
    s = 0
    while s < n and a[s] == b[s]:
        s += 1
    return s


def shared_pair_num_tokens(pair: Pair) -> int:
    """Tokens the pair occupies in a shared row: len(chosen seq) + len(rejected seq) - shared prefix."""
    return len(pair["chosen_input_ids"]) + len(pair["rejected_input_ids"]) - shared_prefix_len(pair)


def collate_shared(pairs: Sequence[Pair], label_pad_token_id: int = -100) -> dict:
    """Lay pairs out as [prompt | chosen | rejected] segments of one row (module docstring); CPU tensors.

    Returns input_ids/position_ids/segment_ids/role_ids [1, T] int64; the reducer index of
    ``collate_packed`` (pred_positions/pred_labels/pred_seq [N], seq_num_tokens [S = 2P], chosen_seq/
    rejected_seq [P], seq_to_pair [S], seq_is_chosen [S] bool — sequence 2i is pair i's chosen, 2i+1
    its rejected); num_pairs, num_tokens (= T), unshared_tokens (the same pairs in the standard layout)
    and seq_sq_sum (int, attention work, see module doc).
    ``label_pad_token_id`` is accepted for signature parity with ``collate_packed`` (no labels row).
    """
    del label_pad_token_id  # no labels tensor in this layout (module docstring)
    ids, pos, seg, role = [], [], [], []
    pred_pos, pred_lab, pred_seq, num_tok = [], [], [], []
    seq_sq = 0
    for i, p in enumerate(pairs):
        c, r = p["chosen_input_ids"], p["rejected_input_ids"]
        s = shared_prefix_len(p)
        base = len(ids)
        ids += c + r[s:]
        pos += list(range(len(c))) + list(range(s, len(r)))
        seg += [i] * (len(c) + len(r) - s)
        role += [PROMPT] * s + [CHOSEN] * (len(c) - s) + [REJECTED] * (len(r) - s)
        # chosen token j (j >= 1) is predicted by row base + j - 1 (chosen is contiguous from base)
        answer = range(max(p["chosen_prompt_len"], 1), len(c))
        pred_pos += [base + j - 1 for j in answer]
        pred_lab += [c[j] for j in answer]
        pred_seq += [2 * i] * len(answer)
        num_tok.append(len(answer))
        # rejected token j: its predecessor j-1 is a shared row (j-1 < s) or in the rejected part
        answer = range(max(p["rejected_prompt_len"], 1), len(r))
        pred_pos += [base + j - 1 if j - 1 < s else base + len(c) + (j - 1 - s) for j in answer]
        pred_lab += [r[j] for j in answer]
        pred_seq += [2 * i + 1] * len(answer)
        num_tok.append(len(answer))
        seq_sq += len(c) ** 2 + len(r) ** 2 - s**2
    n_pairs = len(pairs)

    def row(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long)[None]

    return {
        "input_ids": row(ids),
        "position_ids": row(pos),
        "segment_ids": row(seg),
        "role_ids": row(role),
        "pred_positions": torch.tensor(pred_pos, dtype=torch.long),
        "pred_labels": torch.tensor(pred_lab, dtype=torch.long),
        "pred_seq": torch.tensor(pred_seq, dtype=torch.long),
        "seq_num_tokens": torch.tensor(num_tok, dtype=torch.long),
        **interleaved_pair_index(n_pairs),
        "num_pairs": n_pairs,
        "num_tokens": len(ids),
        "unshared_tokens": sum(len(p["chosen_input_ids"]) + len(p["rejected_input_ids"]) for p in pairs),
        "seq_sq_sum": seq_sq,
    }


def shared_attention_allowed(
    segment_q: torch.Tensor, role_q: torch.Tensor, q: torch.Tensor,
    segment_k: torch.Tensor, role_k: torch.Tensor, k: torch.Tensor,
) -> torch.Tensor:
    """The mask rule on broadcastable index tensors (shared by the dense mask and FlexAttention's mask_mod)."""
    return (segment_q == segment_k) & (k <= q) & ~((role_q == REJECTED) & (role_k == CHOSEN))


def shared_attention_mask(segment_ids: torch.Tensor, role_ids: torch.Tensor, dtype: torch.dtype = torch.bool):
    """Dense [1, 1, T, T] mask of a shared row from segment_ids / role_ids ([T] or [1, T]).

    ``dtype`` bool: True where attention is allowed (sdpa); a float dtype: additive, 0 where allowed
    and ``finfo(dtype).min`` elsewhere (eager adds the mask to the scores). T² elements: the CPU /
    reference path; CUDA uses a FlexAttention BlockMask instead.
    """
    seg, rol = segment_ids.reshape(-1), role_ids.reshape(-1)
    idx = torch.arange(seg.numel(), device=seg.device)
    allowed = shared_attention_allowed(seg[:, None], rol[:, None], idx[:, None], seg[None, :], rol[None, :], idx[None, :])
    if dtype == torch.bool:
        return allowed[None, None]
    zero = torch.zeros((), dtype=dtype, device=seg.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[None, None]
