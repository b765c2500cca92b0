"""Segment-aware log-prob reducer, the SimPO loss and its metrics (torch only).

Maths (Meng, Xia & Chen 2024; reference ``SimPOTrainer.simpo_loss``), for a pair (x, y_w, y_l)::

    r(y)  = (1/|y|) sum_t log pi(y_t | x, y_<t)        answer tokens only, EOS included
    z     = r(y_w) - r(y_l) - gamma_beta_ratio
    sigmoid: loss = -logsigmoid(beta z) (1 - eps) - logsigmoid(-beta z) eps
    hinge:   loss = relu(1 - beta z)
    total = mean over the step's pairs [+ sft_weight * token-mean NLL of the step's chosen answers]

Normalisation (docs/design.md §5): a micro-batch contributes ``sum(pair losses) / N_step_pairs`` (plus
``sft_weight * chosen NLL sum / N_step_chosen_tokens``), so the gradient of a step equals the gradient
of the mean over exactly its pairs however they fall into micro-batches and ranks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ---------------------------------------------------------------------------------------------
# reducer
# ---------------------------------------------------------------------------------------------


class SequenceLogps(NamedTuple):
    """Per-sequence reductions of one micro-batch (S sequences). A NamedTuple, so ZeRO-3's module
    hooks see the tensors inside.

    logp_sum  [S] fp32  sum of answer-token log-probs (differentiable)
    num_tokens [S] int64  answer tokens |y|
    logit_sum [S] fp32  sum over answer tokens of the mean raw logit over the vocab (detached)
    """

    logp_sum: torch.Tensor
    num_tokens: torch.Tensor
    logit_sum: torch.Tensor

    @property
    def average(self) -> torch.Tensor:
        """[S] length-normalised log-prob r(y)."""
        return self.logp_sum / self.num_tokens.to(self.logp_sum.dtype)


class _LabelLogp(torch.autograd.Function):
    """log softmax(logits)[label]: logits [n, V] fp32, labels [n] -> [n].

    Backward turns the saved logits INTO their gradient, g (onehot(label) - softmax), in place, so a
    chunk holds one [n, V] buffer where autograd's logsumexp + gather would allocate three more. Safe
    because the logits are the chunk's private fp32 tensor: the lm_head matmul saves its inputs, not
    its output, and nothing else reads them (autograd's version counter would raise if it did).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(logits, labels, lse)
        return logits.gather(1, labels[:, None]).squeeze(1) - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        logits, labels, lse = ctx.saved_tensors
        grad_logits = logits.sub_(lse[:, None]).exp_().mul_(-grad[:, None])  # -g * softmax
        return grad_logits.scatter_add_(1, labels[:, None], grad[:, None]), None


def _chunk_token_logps(hidden: torch.Tensor, labels: torch.Tensor, lm_head: Callable,
                       logits_transform: Callable | None = None) -> tuple:
    """hidden [n, H], labels [n] -> (log p(label) [n] fp32, mean logit over vocab [n] fp32)."""
    logits = lm_head(hidden).float()  # [n, V], the only vocab-sized tensor, freed after the chunk
    if logits_transform is not None:  # the model's softcapping / logit scale (simpo_ds.model.logits_transform)
        logits = logits_transform(logits)
    return _LabelLogp.apply(logits, labels), logits.detach().mean(dim=-1)


LOGITS_CHUNK_ELEMENTS = 2**26  # 64 Mi fp32 logits = 256 MiB per chunk when logits_chunk_size is auto


def auto_chunk_size(vocab_size: int, elements: int = LOGITS_CHUNK_ELEMENTS) -> int:
    """Rows of logits per reducer chunk for ``logits_chunk_size: 0`` (auto): the largest power of two
    with rows x vocab <= ``elements``, within [64, 8192] — 2048 rows at 32k vocab, 512 at 128k, 256
    at 152k. Big enough for efficient matmuls, small enough that a chunk's fp32 logits, their
    softmax and gradient stay a few hundred MiB at any vocabulary."""
    rows = max(elements // max(vocab_size, 1), 1)
    return min(max(1 << (rows.bit_length() - 1), 64), 8192)


def num_chunks(rows: int, chunk_size: int) -> int:
    """lm_head chunks the reducer runs for ``rows`` answer-label rows on its own: ceil(rows / chunk)."""
    return -(-rows // chunk_size)


def lockstep_chunk_counts(rows: Sequence[Sequence[int]], chunk_size: int) -> list[int]:
    """rows[rank][micro-batch] (answer-label rows each rank's micro-batch will hold) -> the chunk count
    of every micro-batch that EVERY rank runs: the max over ranks (ZeRO-3 lock-step, docs/design.md §4).

    The pack plan is computed identically on every rank, so each rank derives the same counts from it
    without a collective. A rank with fewer rows runs empty chunks (its lm_head is still called)."""
    return [max(num_chunks(r, chunk_size) for r in per_micro) for per_micro in zip(*rows)]


def reduce_sequence_logps(
    hidden: torch.Tensor,
    lm_head: Callable,
    pred_positions: torch.Tensor,
    pred_labels: torch.Tensor,
    pred_seq: torch.Tensor,
    seq_num_tokens: torch.Tensor,
    chunk_size: int = 2048,
    logits_transform: Callable | None = None,
    chunks: int | None = None,
) -> SequenceLogps:
    """Per-sequence answer log-prob sums without ever materialising [T, V] logits.

    hidden [B, L, H] (the decoder body's output); pred_positions [N] flat indices into B*L of the
    positions whose next token is an answer label pred_labels [N] of sequence pred_seq [N];
    seq_num_tokens [S]. Only those N rows reach ``lm_head`` (prompts cost no vocab FLOPs), in chunks
    of ``chunk_size`` rows; each chunk's logits but the last are recomputed in backward (activation
    checkpoint; the last chunk is the first backward needs, so its logits are kept) and overwritten
    there by their own gradient (:class:`_LabelLogp`), so peak memory is two [chunk, V] fp32 buffers
    (logits + logsumexp's temporary). ``lm_head`` is called as a module so ZeRO-3 hooks gather its
    (possibly tied, partitioned) weight in forward and again in the recomputation; ``logits_transform`` (fp32 logits -> logits) is what the model's forward applies
    after it (softcapping, logit scale: :func:`simpo_ds.model.logits_transform`).

    ``chunks``: run exactly this many lm_head calls (default: ``num_chunks(N, chunk_size)``). Under
    ZeRO-3 every rank must call the partitioned lm_head equally often, in forward and in the
    recomputation, so the trainer passes the count agreed across ranks
    (:func:`lockstep_chunk_counts`); chunks past this rank's rows are empty [0, H] calls, and which
    chunks are checkpointed depends on the chunk index alone, never on the local row count.
    """
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, pred_positions)  # [N, H]
    chunks = num_chunks(flat.shape[0], chunk_size) if chunks is None else chunks
    if chunks * chunk_size < flat.shape[0]:
        raise RuntimeError(
            f"reducer: {flat.shape[0]} answer-label rows do not fit {chunks} chunk(s) of {chunk_size} rows: "
            "the batch does not match the pack plan its chunk count was agreed on"
        )
    head_params = lm_head.parameters() if isinstance(lm_head, torch.nn.Module) else ()
    # recompute in backward whenever anything upstream needs a gradient (body OR a trainable head)
    needs_grad = torch.is_grad_enabled() and (flat.requires_grad or any(p.requires_grad for p in head_params))
    token_logps, token_logits = [], []
    for k in range(chunks):
        rows = flat[k * chunk_size : (k + 1) * chunk_size]
        labels = pred_labels[k * chunk_size : (k + 1) * chunk_size]
        # the last chunk keeps its logits: backward starts with it, so recomputing would not lower the peak
        if needs_grad and k < chunks - 1:
            lp, lg = checkpoint(_chunk_token_logps, rows, labels, lm_head, logits_transform, use_reentrant=False)
        else:
            lp, lg = _chunk_token_logps(rows, labels, lm_head, logits_transform)
        token_logps.append(lp)
        token_logits.append(lg)
    num_seqs = seq_num_tokens.shape[0]
    zeros = torch.zeros(num_seqs, dtype=torch.float32, device=hidden.device)
    if not token_logps:
        return SequenceLogps(zeros + hidden.sum() * 0, seq_num_tokens, zeros)
    logp_sum = zeros.index_add(0, pred_seq, torch.cat(token_logps))
    logit_sum = zeros.index_add(0, pred_seq, torch.cat(token_logits))
    return SequenceLogps(logp_sum, seq_num_tokens, logit_sum)


def get_batch_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    average_log_prob: bool = True,
    label_pad_token_id: int = -100,
    is_encoder_decoder: bool = False,
) -> torch.Tensor:
    """The reference ``SimPOTrainer.get_batch_logps`` on padded batches (full logits).

    logits [B, L, V], labels [B, L] (label_pad_token_id where no loss) -> [B] average (or summed)
    log-prob of the labelled tokens, each predicted by the previous position.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError("logits and labels must have the same batch and sequence shape")
    if not is_encoder_decoder:
        labels = labels[:, 1:].clone()
        logits = logits[:, :-1, :]
    loss_mask = labels != label_pad_token_id
    labels = labels.masked_fill(~loss_mask, 0)
    per_token = torch.gather(logits.log_softmax(-1), dim=2, index=labels.unsqueeze(2)).squeeze(2)
    if average_log_prob:
        return (per_token * loss_mask).sum(-1) / loss_mask.sum(-1)
    return (per_token * loss_mask).sum(-1)


# ---------------------------------------------------------------------------------------------
# loss
# ---------------------------------------------------------------------------------------------


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.25,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference ``simpo_loss``: [P] average log-probs -> (losses [P], chosen_rewards, rejected_rewards).

    Rewards are beta * r(y), detached.
    """
    z = chosen_logps - rejected_logps - gamma_beta_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * z) * (1 - label_smoothing) - F.logsigmoid(-beta * z) * label_smoothing
    elif loss_type == "hinge":
        if label_smoothing:
            warnings.warn("label_smoothing is ignored by the hinge loss", stacklevel=2)
        losses = torch.relu(1 - beta * z)
    else:
        raise ValueError(f"loss_type must be 'sigmoid' or 'hinge', got {loss_type!r}")
    return losses, beta * chosen_logps.detach(), beta * rejected_logps.detach()


# Order of the summed statistics a micro-batch contributes (one vector -> one all_reduce per step).
STAT_NAMES = (
    "pairs",
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "sft_nll",
    "sft_tokens",
)


@dataclass
class StepNormalizer:
    """What a micro-batch divides by: totals over the WHOLE optimizer step (all ranks)."""

    num_pairs: int
    num_chosen_tokens: int


def microbatch_loss(
    seq: SequenceLogps,
    chosen_seq: torch.Tensor,
    rejected_seq: torch.Tensor,
    norm: StepNormalizer,
    *,
    beta: float,
    gamma_beta_ratio: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    sft_weight: float = 0.0,
    weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch's share of the step loss, and its summed statistics [len(STAT_NAMES)] fp32.

    objective = weight * (sum_i loss_i / norm.num_pairs + sft_weight * NLL_chosen / norm.num_chosen_tokens)
    ``weight`` is 0 for filler micro-batches (they run only to keep ranks in lock-step).
    Statistics are sums over the micro-batch's pairs (times weight); divide by the step's total
    ``pairs`` (and ``sft_tokens`` for ``sft_nll``) after reducing over micro-batches and ranks.
    """
    avg = seq.average
    chosen, rejected = avg[chosen_seq], avg[rejected_seq]
    losses, chosen_rewards, rejected_rewards = simpo_loss(
        chosen, rejected, beta, gamma_beta_ratio, loss_type, label_smoothing
    )
    sft_nll = -seq.logp_sum[chosen_seq].sum()
    sft_tokens = seq.num_tokens[chosen_seq].sum().to(torch.float32)
    objective = losses.sum() / norm.num_pairs
    if sft_weight > 0:
        objective = objective + sft_weight * sft_nll / norm.num_chosen_tokens
    mean_logit = seq.logit_sum / seq.num_tokens.to(torch.float32)
    stats = torch.stack(
        [
            torch.tensor(float(len(chosen_seq)), device=avg.device),
            losses.detach().sum(),
            chosen_rewards.sum(),
            rejected_rewards.sum(),
            (chosen_rewards > rejected_rewards).float().sum(),
            (chosen_rewards - rejected_rewards).sum(),
            chosen.detach().sum(),
            rejected.detach().sum(),
            mean_logit[chosen_seq].sum(),
            mean_logit[rejected_seq].sum(),
            sft_nll.detach(),
            sft_tokens,
        ]
    ).float()
    return objective * weight, stats * weight


def finalize_metrics(stats: torch.Tensor, sft_weight: float = 0.0) -> dict[str, float]:
    """Summed statistics of a step (or several) -> the reference metric names (means over pairs).

    ``loss`` is the SimPO pair-mean plus ``sft_weight * sft_loss`` (the optimised objective).
    """
    values = dict(zip(STAT_NAMES, stats.double().tolist()))
    pairs = max(values.pop("pairs"), 1.0)
    sft_nll, sft_tokens = values.pop("sft_nll"), values.pop("sft_tokens")
    metrics = {name: value / pairs for name, value in values.items()}
    if sft_weight > 0:
        metrics["sft_loss"] = sft_nll / max(sft_tokens, 1.0)
        metrics["loss"] += sft_weight * metrics["sft_loss"]
    return metrics
