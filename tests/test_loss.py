"""The SimPO loss, its step normalisation and metrics, against values derived by hand.

Notation (docs/design.md §1): r(y) = mean answer-token log-prob, z = r(y_w) - r(y_l) - gamma_beta_ratio,
x = beta * z. softplus(x) = log(1 + e^x), so -logsigmoid(x) = softplus(-x) and
-logsigmoid(-x) = softplus(x) = x + softplus(-x). Numbers used below (6 decimals)::

    softplus(-1.5) = log(1 + e^-1.5) = 0.201413        sigmoid(-1.5) = 0.182426
    softplus( 0.5) = log(1 + e^0.5)  = 0.974077        sigmoid( 0.5) = 0.622459
    softplus(-0.1) = log(1 + e^-0.1) = 0.644397
    log 2 = 0.693147                 log(1 + e) = 1.313262
"""

from __future__ import annotations

import warnings

import pytest
import torch

from simpo_ds.config import ConfigError, SimPOConfig, build_config, load_config
from simpo_ds.loss import (
    STAT_NAMES,
    SequenceLogps,
    StepNormalizer,
    finalize_metrics,
    get_batch_logps,
    microbatch_loss,
    simpo_loss,
)

ABS = 1e-6


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# simpo_loss
# ---------------------------------------------------------------------------------------------
def test_sigmoid_loss_hand_value():
    """r_w = -1, r_l = -2, beta 2, ratio 0.25: z = 1 - 0.25 = 0.75, x = 1.5,
    loss = -logsigmoid(1.5) = log(1 + e^-1.5) = 0.201413; rewards = beta * r = -2, -4."""
    losses, chosen_rewards, rejected_rewards = simpo_loss(t(-1.0), t(-2.0), beta=2.0, gamma_beta_ratio=0.25)
    assert losses.item() == pytest.approx(0.201413, abs=ABS)
    assert chosen_rewards.item() == -2.0 and rejected_rewards.item() == -4.0
    assert not chosen_rewards.requires_grad


def test_sigmoid_loss_gradient_hand_value():
    """d loss / d r_w = -beta * sigmoid(-x) = -2 * 0.182426 = -0.364851; d / d r_l = +0.364851."""
    chosen, rejected = t(-1.0).requires_grad_(), t(-2.0).requires_grad_()
    losses, _, _ = simpo_loss(chosen, rejected, beta=2.0, gamma_beta_ratio=0.25)
    losses.sum().backward()
    assert chosen.grad.item() == pytest.approx(-0.364851, abs=ABS)
    assert rejected.grad.item() == pytest.approx(0.364851, abs=ABS)


def test_gamma_beta_ratio_is_a_margin_on_r_not_on_beta_r():
    """r_w = -1.5, r_l = -1.8, beta 2, ratio 0.25: z = 0.3 - 0.25 = 0.05, x = 0.1,
    loss = log(1 + e^-0.1) = 0.644397 (a margin applied after beta would give x = 0.6 - 0.25)."""
    losses, _, _ = simpo_loss(t(-1.5), t(-1.8), beta=2.0, gamma_beta_ratio=0.25)
    assert losses.item() == pytest.approx(0.644397, abs=ABS)


def test_hinge_loss_zero_beyond_margin_and_positive_inside():
    """hinge = relu(1 - x): x = 1.5 -> 0; x = 0.1 (r_w -1.5, r_l -1.8) -> 0.9, gradient -beta = -2."""
    zero, _, _ = simpo_loss(t(-1.0), t(-2.0), beta=2.0, gamma_beta_ratio=0.25, loss_type="hinge")
    assert zero.item() == 0.0
    chosen = t(-1.5).requires_grad_()
    pos, _, _ = simpo_loss(chosen, t(-1.8), beta=2.0, gamma_beta_ratio=0.25, loss_type="hinge")
    assert pos.item() == pytest.approx(0.9, abs=ABS)
    pos.sum().backward()
    assert chosen.grad.item() == pytest.approx(-2.0, abs=ABS)


def test_label_smoothing_hand_value():
    """eps 0.1, x = 1.5: (1 - eps) softplus(-x) + eps softplus(x) = 0.9 * 0.201413 + 0.1 * 1.701413
    = 0.351413 (= softplus(-x) + eps * x)."""
    losses, _, _ = simpo_loss(t(-1.0), t(-2.0), beta=2.0, gamma_beta_ratio=0.25, label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.351413, abs=ABS)


def test_hinge_ignores_label_smoothing_with_a_warning():
    """relu(1 - 0.1) = 0.9 whatever eps; a UserWarning says label_smoothing is ignored."""
    with pytest.warns(UserWarning, match="label_smoothing"):
        losses, _, _ = simpo_loss(t(-1.5), t(-1.8), 2.0, 0.25, loss_type="hinge", label_smoothing=0.1)
    assert losses.item() == pytest.approx(0.9, abs=ABS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning without label smoothing
        simpo_loss(t(-1.5), t(-1.8), 2.0, 0.25, loss_type="hinge")


def test_unknown_loss_type_is_an_error():
    with pytest.raises(ValueError, match="loss_type"):
        simpo_loss(t(-1.0), t(-2.0), loss_type="ipo")


# ---------------------------------------------------------------------------------------------
# microbatch_loss / finalize_metrics
# ---------------------------------------------------------------------------------------------
def two_pairs(requires_grad: bool = False) -> tuple[SequenceLogps, torch.Tensor]:
    """Packed order c0, r0, c1, r1::

        logp_sum   [-3, -4, -2, -6]   num_tokens [3, 2, 1, 3]   ->  r = [-1, -2, -2, -2]
        logit_sum  [ 6,  2, -1,  9]                              ->  mean logits [2, 1, -1, 3]

    pair 0: z = -1 + 2 - 0.25 = 0.75,  x = 1.5,  loss 0.201413, rewards (-2, -4): correct
    pair 1: z = -2 + 2 - 0.25 = -0.25, x = -0.5, loss 0.974077, rewards (-4, -4): a tie, not correct
    sum of pair losses 1.175490; chosen NLL = 3 + 2 = 5 nats over 3 + 1 = 4 tokens.
    """
    logp_sum = t(-3.0, -4.0, -2.0, -6.0).requires_grad_(requires_grad)
    seq = SequenceLogps(logp_sum, torch.tensor([3, 2, 1, 3]), t(6.0, 2.0, -1.0, 9.0))
    return seq, logp_sum


CHOSEN, REJECTED = torch.tensor([0, 2]), torch.tensor([1, 3])


def test_microbatch_objective_normalised_by_the_step_not_the_microbatch():
    """The step has 4 pairs and 10 chosen tokens in all (this micro-batch holds 2 pairs, 4 tokens):
    objective = 1.175490 / 4 + 0.5 * 5 / 10 = 0.293873 + 0.25 = 0.543873."""
    seq, _ = two_pairs()
    loss, _ = microbatch_loss(seq, CHOSEN, REJECTED, StepNormalizer(4, 10), beta=2.0, gamma_beta_ratio=0.25,
                              sft_weight=0.5)
    assert loss.item() == pytest.approx(0.543873, abs=ABS)
    loss0, _ = microbatch_loss(seq, CHOSEN, REJECTED, StepNormalizer(4, 10), beta=2.0, gamma_beta_ratio=0.25)
    assert loss0.item() == pytest.approx(0.293873, abs=ABS)  # sft_weight 0: no NLL term at all


def test_microbatch_gradient_hand_values():
    """norm (2 pairs), no sft. d obj / d logp_sum[s] = (d loss / d r_s) / |y_s| / 2:
    c0: -2 sigmoid(-1.5) / 3 / 2 = -0.060809   r0: +0.364851 / 2 / 2 = 0.091213
    c1: -2 sigmoid(0.5)  / 1 / 2 = -0.622459   r1: +1.244919 / 3 / 2 = 0.207486"""
    seq, leaf = two_pairs(requires_grad=True)
    loss, _ = microbatch_loss(seq, CHOSEN, REJECTED, StepNormalizer(2, 4), beta=2.0, gamma_beta_ratio=0.25)
    loss.backward()
    assert leaf.grad.tolist() == pytest.approx([-0.060809, 0.091213, -0.622459, 0.207486], abs=ABS)


def test_microbatch_sft_gradient_is_token_mean_over_the_step():
    """With sft_weight 0.5 and 10 chosen tokens in the step, each chosen log-prob sum gets an extra
    -0.5 / 10 = -0.05; rejected sums get nothing."""
    seq, leaf = two_pairs(requires_grad=True)
    base, _ = microbatch_loss(seq, CHOSEN, REJECTED, StepNormalizer(2, 10), beta=2.0, gamma_beta_ratio=0.25)
    base.backward()
    g0 = leaf.grad.clone()
    leaf.grad = None
    with_sft, _ = microbatch_loss(seq, CHOSEN, REJECTED, StepNormalizer(2, 10), beta=2.0, gamma_beta_ratio=0.25,
                                  sft_weight=0.5)
    with_sft.backward()
    assert (leaf.grad - g0).tolist() == pytest.approx([-0.05, 0.0, -0.05, 0.0], abs=ABS)


def test_microbatch_stats_hand_values():
    """Sums over the micro-batch's pairs, in STAT_NAMES order:
    pairs 2; loss 1.175490; rewards/chosen -2 + -4 = -6; rewards/rejected -4 + -4 = -8;
    accuracies 1 (the tie does not count); margins 2 + 0 = 2; logps/chosen -1 + -2 = -3;
    logps/rejected -4; logits/chosen 2 + -1 = 1; logits/rejected 1 + 3 = 4; sft_nll 5; sft_tokens 4."""
    seq, _ = two_pairs()
    _, stats = microbatch_loss(seq, CHOSEN, REJECTED, StepNormalizer(2, 4), beta=2.0, gamma_beta_ratio=0.25)
    expected = [2, 1.175490, -6, -8, 1, 2, -3, -4, 1, 4, 5, 4]
    assert len(STAT_NAMES) == len(expected) and stats.dtype == torch.float32
    assert dict(zip(STAT_NAMES, stats.tolist())) == pytest.approx(dict(zip(STAT_NAMES, expected)), abs=ABS)


def test_finalize_metrics_hand_values_and_loss_includes_sft():
    """Means over the 2 pairs; sft_loss = 5 / 4 = 1.25; loss = 1.175490 / 2 + 0.5 * 1.25 = 1.212745."""
    seq, _ = two_pairs()
    _, stats = microbatch_loss(seq, CHOSEN, REJECTED, StepNormalizer(2, 4), beta=2.0, gamma_beta_ratio=0.25)
    metrics = finalize_metrics(stats, sft_weight=0.5)
    expected = {
        "loss": 1.212745,
        "sft_loss": 1.25,
        "rewards/chosen": -3.0,
        "rewards/rejected": -4.0,
        "rewards/accuracies": 0.5,
        "rewards/margins": 1.0,
        "logps/chosen": -1.5,
        "logps/rejected": -2.0,
        "logits/chosen": 0.5,
        "logits/rejected": 2.0,
    }
    assert metrics == pytest.approx(expected, abs=ABS)
    plain = finalize_metrics(stats)  # sft_weight 0: pure SimPO, no sft_loss key
    assert "sft_loss" not in plain and plain["loss"] == pytest.approx(0.587745, abs=ABS)


def test_metrics_loss_equals_the_optimised_objective():
    """finalize_metrics(stats)['loss'] is exactly what the step minimises (one micro-batch = the step)."""
    seq, _ = two_pairs()
    norm = StepNormalizer(2, 4)
    loss, stats = microbatch_loss(seq, CHOSEN, REJECTED, norm, beta=2.0, gamma_beta_ratio=0.25, sft_weight=0.3,
                                  label_smoothing=0.1)
    assert finalize_metrics(stats, sft_weight=0.3)["loss"] == pytest.approx(loss.item(), abs=ABS)


def test_zero_weight_microbatch_contributes_exactly_nothing():
    """A filler micro-batch (weight 0): objective 0, every statistic 0, every gradient 0."""
    seq, leaf = two_pairs(requires_grad=True)
    loss, stats = microbatch_loss(seq, CHOSEN, REJECTED, StepNormalizer(2, 4), beta=2.0, gamma_beta_ratio=0.25,
                                  sft_weight=0.5, weight=0.0)
    assert loss.item() == 0.0
    assert torch.equal(stats, torch.zeros(len(STAT_NAMES)))
    loss.backward()  # still differentiable (ZeRO-3 needs the backward to run)
    assert torch.equal(leaf.grad, torch.zeros(4))


def test_splitting_pairs_over_microbatches_gives_the_same_step():
    """3 pairs in one micro-batch == micro-batches {pair 0} + {pairs 1, 2} with one StepNormalizer:
    same summed objective, gradients and statistics. The expected objective is computed from the
    definition: mean pair loss + w * (sum chosen NLL) / (sum chosen tokens) -- a per-micro-batch
    NLL mean would instead give (nll0/n0 + (nll1+nll2)/(n1+n2)) / 2 and fail here."""
    torch.manual_seed(0)
    num_tokens = torch.tensor([3, 5, 1, 2, 7, 4])  # c0 r0 c1 r1 c2 r2
    logp = (-torch.rand(6) * num_tokens).requires_grad_()
    logits = torch.randn(6)
    kw = dict(beta=2.5, gamma_beta_ratio=0.4, sft_weight=0.7)
    norm = StepNormalizer(3, int(num_tokens[[0, 2, 4]].sum()))

    def part(seqs):
        idx = torch.tensor(seqs)
        seq = SequenceLogps(logp[idx], num_tokens[idx], logits[idx])
        n = len(seqs) // 2
        return microbatch_loss(seq, torch.arange(0, 2 * n, 2), torch.arange(1, 2 * n, 2), norm, **kw)

    whole_loss, whole_stats = part([0, 1, 2, 3, 4, 5])
    whole_loss.backward()
    whole_grad, logp.grad = logp.grad.clone(), None
    (l1, s1), (l2, s2) = part([0, 1]), part([2, 3, 4, 5])
    (l1 + l2).backward()
    assert (l1 + l2).item() == pytest.approx(whole_loss.item(), abs=ABS)
    assert torch.allclose(logp.grad, whole_grad, atol=1e-7)
    assert torch.allclose(s1 + s2, whole_stats, atol=1e-6)

    r = (logp / num_tokens).detach()
    x = kw["beta"] * (r[[0, 2, 4]] - r[[1, 3, 5]] - kw["gamma_beta_ratio"])
    chosen_nll = -logp[[0, 2, 4]].sum().item()  # over 3 + 1 + 7 = 11 chosen tokens
    expected = torch.nn.functional.softplus(-x).mean() + kw["sft_weight"] * chosen_nll / 11
    assert whole_loss.item() == pytest.approx(expected.item(), abs=ABS)


# ---------------------------------------------------------------------------------------------
# get_batch_logps (the reference's padded computation)
# ---------------------------------------------------------------------------------------------
LOGITS = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]])  # [1, 3, 2]


def test_get_batch_logps_hand_value():
    """labels [-100, 0, 1]: position 0 (logits [0, 0]) predicts 0 -> log 1/2 = -0.693147; position 1
    (logits [1, 0]) predicts 1 -> 0 - log(e + 1) = -1.313262; the last position predicts nothing.
    sum -2.006409, average -1.003204."""
    labels = torch.tensor([[-100, 0, 1]])
    assert get_batch_logps(LOGITS, labels).item() == pytest.approx(-1.003204, abs=ABS)
    assert get_batch_logps(LOGITS, labels, average_log_prob=False).item() == pytest.approx(-2.006409, abs=ABS)


def test_get_batch_logps_masks_and_shifts():
    """labels [-100, -100, 1]: only position 1 counts -> -1.313262. Changing the last position's
    logits (which predict past the end) changes nothing."""
    labels = torch.tensor([[-100, -100, 1]])
    other = LOGITS.clone()
    other[0, 2] = torch.tensor([5.0, -7.0])
    for logits in (LOGITS, other):
        assert get_batch_logps(logits, labels).item() == pytest.approx(-1.313262, abs=ABS)
    batch = get_batch_logps(torch.cat([LOGITS, LOGITS]), torch.tensor([[-100, 0, 1], [-100, -100, 1]]))
    assert batch.tolist() == pytest.approx([-1.003204, -1.313262], abs=ABS)


def test_get_batch_logps_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same batch and sequence shape"):
        get_batch_logps(LOGITS, torch.tensor([[-100, 0]]))


# ---------------------------------------------------------------------------------------------
# config: defaults of §1 and the simpo_gamma alias
# ---------------------------------------------------------------------------------------------
def test_simpo_defaults_mirror_the_reference():
    cfg = SimPOConfig()
    assert (cfg.beta, cfg.gamma_beta_ratio, cfg.sft_weight, cfg.loss_type, cfg.label_smoothing) == (
        2.0, 0.25, 0.0, "sigmoid", 0.0)
    assert (cfg.truncation_mode, cfg.label_pad_token_id, cfg.disable_dropout) == ("keep_end", -100, True)
    assert (cfg.max_length, cfg.max_prompt_length) == (2048, 1800)


def test_simpo_gamma_alias_becomes_gamma_beta_ratio():
    """gamma = ratio * beta: simpo_gamma 1.0 with beta 2.5 -> gamma_beta_ratio 0.4."""
    cfg = SimPOConfig(simpo_gamma=1.0, beta=2.5)
    assert cfg.gamma_beta_ratio == pytest.approx(0.4) and cfg.gamma == pytest.approx(1.0)
    assert build_config({"simpo_gamma": "1.0", "beta": "2.5"}).gamma_beta_ratio == pytest.approx(0.4)
    cli = load_config(overrides=["--simpo_gamma", "1.0", "--beta", "2.5"])
    assert cli.gamma_beta_ratio == pytest.approx(0.4)


def test_simpo_gamma_and_gamma_beta_ratio_together_is_an_error():
    with pytest.raises(ConfigError) as err:
        SimPOConfig(simpo_gamma=1.0, gamma_beta_ratio=0.4, beta=2.5)
    assert "simpo_gamma" in str(err.value) and "gamma_beta_ratio" in str(err.value)
