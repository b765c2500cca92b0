"""The reference SimPO computation (princeton-nlp/SimPO on a padded batch) and comparison helpers.

Full logits from ``model(input_ids, attention_mask)``, ``get_batch_logps``, ``simpo_loss``,
``losses.mean()``, the reference's metric definitions and its CrossEntropyLoss for the sft term.
"""

from __future__ import annotations

import torch

from simpo_ds.data.packing import collate_padded
from simpo_ds.loss import get_batch_logps, simpo_loss

RTOL = 1e-5
PAD = 0


# ---------------------------------------------------------------------------------------------
def reference_step(model, pairs, beta=2.0, ratio=0.25, loss_type="sigmoid", eps=0.0, sft_weight=0.0):
    batch = collate_padded(pairs, pad_token_id=PAD)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logps = get_batch_logps(logits, batch["labels"], average_log_prob=True)
    n = len(pairs)
    chosen_logps, rejected_logps = logps[:n], logps[n:]
    losses, chosen_rewards, rejected_rewards = simpo_loss(chosen_logps, rejected_logps, beta, ratio, loss_type, eps)
    loss = losses.mean()
    labels = batch["labels"]
    mask = labels != -100
    metrics = {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": chosen_logps.mean().item(),
        "logps/rejected": rejected_logps.mean().item(),
    }
    # logits/*: ours is the mean raw logit over answer tokens (per sequence, then over pairs)
    shifted = logits[:, :-1].detach().mean(-1)
    smask = mask[:, 1:]
    per_seq = (shifted * smask).sum(-1) / smask.sum(-1)
    metrics["logits/chosen"] = per_seq[:n].mean().item()
    metrics["logits/rejected"] = per_seq[n:].mean().item()
    # the mean logit of a random model is ~0: compare it relative to the logits' own size
    metrics["_logit_scale"] = logits[:, :-1][smask].abs().mean().item()
    if sft_weight > 0:
        chosen_logits = logits[:n, :-1, :].contiguous()
        chosen_labels = labels[:n, 1:].clone()
        sft = torch.nn.CrossEntropyLoss()(chosen_logits.view(-1, chosen_logits.shape[-1]), chosen_labels.view(-1))
        loss = loss + sft_weight * sft
        metrics["sft_loss"] = sft.item()
    metrics["loss"] = loss.item()
    return loss, logps.detach(), metrics


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_close(a, b, what, scale=None):
    """max |a - b| / |b| <= RTOL (``scale`` replaces |b| for differences of large terms)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    denom = b.abs() if scale is None else torch.as_tensor(abs(scale), dtype=torch.float64)
    err = ((a - b).abs() / denom.clamp_min(1e-6)).max().item()
    assert err <= RTOL, f"{what}: max relative error {err:.2e} > {RTOL}"


def assert_grads_close(ga, gb, rtol: float = RTOL):
    """Per parameter: max |ga - gb| / max |gb| <= rtol. Parameters whose true gradient is zero
    (e.g. q_proj when every query attends to one key) are compared against 1e-3 x the largest
    gradient entry of the model, so rounding noise on an exact zero does not count as an error."""
    assert ga.keys() == gb.keys() and ga
    floor = 1e-3 * max(g.abs().max().item() for g in gb.values())
    for name in gb:
        scale = gb[name].abs().max().clamp_min(floor).double()
        err = ((ga[name].double() - gb[name].double()).abs().max() / scale).item()
        assert err <= rtol, f"grad {name}: relative error {err:.2e} > {rtol}"


def lora_model(model, params: dict, r: int, alpha: int, targets: list[str]):
    """``model`` wrapped in peft LoRA (no dropout) with the adapter values ``params`` (a run's dump:
    the adapters' random init), so the reference starts from the same weights as the run."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                                             task_type="CAUSAL_LM"))
    missing = set(params) - {n for n, _ in model.named_parameters()}
    assert params and not missing, missing
    model.load_state_dict({k: v.to(next(model.parameters()).dtype) for k, v in params.items()}, strict=False)
    return model




def assert_metrics_close(metrics: dict, ref_metrics: dict) -> None:
    """Every reference metric equals ours (differences and near-zero means on a fair scale)."""
    ref_metrics = dict(ref_metrics)
    logit_scale = ref_metrics.pop("_logit_scale")
    missing = ref_metrics.keys() - metrics.keys()
    assert not missing, f"metrics missing: {missing}"
    for name, value in ref_metrics.items():
        if name == "rewards/accuracies":  # a fraction of pairs
            assert abs(metrics[name] - value) <= 1e-6, name
        elif name == "rewards/margins":  # a difference of two rewards: relative to their size
            assert_close(metrics[name], value, name, scale=ref_metrics["rewards/chosen"])
        elif name.startswith("logits/"):
            assert_close(metrics[name], value, name, scale=logit_scale)
        else:
            assert_close(metrics[name], value, name)
