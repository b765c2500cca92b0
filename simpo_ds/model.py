"""The policy: a Hugging Face causal LM behind one ``forward(batch) -> SequenceLogps``.

``SimPOPolicy`` runs the decoder body on a packed row (or a padded batch) and hands the hidden states to
the chunked reducer, which calls the lm_head as a module. DeepSpeed wraps this module, so ZeRO-3's
parameter hooks see every call (body, and lm_head chunks in forward and in their recomputation).

Loading (``load_model``) is plain ``from_pretrained``: the engine creates ``HfDeepSpeedConfig``
beforehand so ZeRO-3 partitions the weights while they load.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from simpo_ds.config import ConfigError
from simpo_ds.loss import SequenceLogps, auto_chunk_size, reduce_sequence_logps
from simpo_ds.shared_attention import prompt_sharing_mask

logger = logging.getLogger(__name__)

BATCH_TENSORS = (
    "input_ids",
    "position_ids",
    "attention_mask",
    "labels",
    "cu_seqlens",
    "pred_positions",
    "pred_labels",
    "pred_seq",
    "seq_num_tokens",
    "chosen_seq",
    "rejected_seq",
    "seq_to_pair",
    "seq_is_chosen",
)


def batch_to_device(batch: dict, device: torch.device | str) -> dict:
    """Move the tensors of a collated batch to ``device``; to a GPU through pinned host memory with
    non-blocking copies (the host does not wait for them), on CPU unchanged."""
    if torch.device(device).type != "cuda":
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    return {
        k: (v.pin_memory().to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
        for k, v in batch.items()
    }


# What a ForCausalLM.forward does to lm_head's output before returning it as logits, by model_type
# (transformers 5.x modeling files). The reducer calls lm_head itself, so it must apply the same.
LOGIT_MULTIPLIER = {"cohere": "logit_scale", "cohere2": "logit_scale", "cohere2_moe": "logit_scale",
                    "hyperclovax": "logits_scaling"}
LOGIT_DIVISOR = {name: "logits_scaling" for name in (
    "granite", "granitemoe", "granitemoeshared", "granitemoehybrid", "granite_swa", "granitemoe_swa")}


def logits_transform(config) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The model's own post-processing of ``lm_head(hidden)``, as a function of fp32 logits [n, V]:
    Cohere's ``logit_scale`` (multiply), Granite's ``logits_scaling`` (divide), HyperCLOVA X's
    (multiply), then Gemma-style ``final_logit_softcapping`` (cap * tanh(logits / cap)). None when
    the logits are lm_head's output as is. A model type not listed here that carries one of these
    scale keys is refused (the same key means multiply for one model and divide for another).

    Each returned function ends in a fresh tensor that no autograd node saves (a product by a
    Python scalar), which the reducer's in-place backward relies on.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", "")
    scale = 1.0
    if model_type in LOGIT_MULTIPLIER:
        scale = float(getattr(text, LOGIT_MULTIPLIER[model_type]) or 1.0)
    elif model_type in LOGIT_DIVISOR:
        scale = 1.0 / float(getattr(text, LOGIT_DIVISOR[model_type]) or 1.0)
    else:
        for key in ("logit_scale", "logits_scaling"):
            if getattr(text, key, None) not in (None, 1, 1.0):
                raise ConfigError(
                    f"model type {model_type!r} sets {key}={getattr(text, key)}: simpo-ds does not know how "
                    f"its forward applies it to the logits (the reducer calls lm_head directly); known: "
                    f"{sorted(LOGIT_MULTIPLIER) + sorted(LOGIT_DIVISOR)}"
                )
    cap = getattr(text, "final_logit_softcapping", None)
    if cap is None and scale == 1.0:
        return None

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale != 1.0:
            logits = logits * scale
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


class SimPOPolicy(nn.Module):
    """Wraps a causal LM (optionally PEFT-wrapped) to return per-sequence answer log-prob sums.

    forward(batch) with a packed batch (input_ids [1, T], position_ids [1, T], no attention_mask) or a
    padded one (input_ids [R, L], attention_mask [R, L]) -> SequenceLogps over the batch's S sequences.
    ``batch["num_chunks"]`` (optional int): the lm_head chunk count every rank runs for this
    micro-batch (:func:`simpo_ds.loss.lockstep_chunk_counts`); without it the local count.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 0, attn_kwargs_fn=None, sequence_parallel=None):
        """``chunk_size``: reducer rows per chunk; 0 = :func:`simpo_ds.loss.auto_chunk_size` of the vocab.
        ``sequence_parallel``: a :class:`simpo_ds.sequence_parallel.SequenceParallel` when this rank
        holds a slice of the row (batch from ``slice_row``, ``batch["attention_kwargs"]`` global)."""
        super().__init__()
        self.model = model
        lm = self.causal_lm
        vocab = getattr(lm.get_output_embeddings(), "out_features", None) or lm.config.vocab_size
        self.chunk_size = chunk_size or auto_chunk_size(vocab)
        self.logits_transform = logits_transform(lm.config)  # softcapping / logit scale, or None
        self.attn_kwargs_fn = attn_kwargs_fn  # batch -> extra forward kwargs (varlen cu_seqlens)
        self.sequence_parallel = sequence_parallel

    @property
    def causal_lm(self) -> nn.Module:
        """The transformers CausalLM (under a PEFT wrapper, its base model with LoRA layers in)."""
        model = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def forward(self, batch: dict) -> SequenceLogps:
        lm = self.causal_lm
        body, lm_head = lm.get_decoder(), lm.get_output_embeddings()
        if "role_ids" in batch:  # prompt sharing: [prompt | chosen | rejected] per pair, explicit 4-D mask
            mask = prompt_sharing_mask(batch, lm.config._attn_implementation, lm.dtype)
            out = body(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask, use_cache=False)
        elif "attention_mask" in batch:  # padded reference layout
            out = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        else:  # packed varlen row: block-causal attention from restarting position_ids
            extra = batch.get("attention_kwargs")  # a sequence-parallel slice: the row's global cu_seqlens
            if extra is None:
                extra = self.attn_kwargs_fn(batch) if self.attn_kwargs_fn is not None else {}
            out = body(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, **extra)
        seq = reduce_sequence_logps(
            out.last_hidden_state,
            lm_head,
            batch["pred_positions"],
            batch["pred_labels"],
            batch["pred_seq"],
            batch["seq_num_tokens"],
            chunk_size=self.chunk_size,
            logits_transform=self.logits_transform,
            chunks=batch.get("num_chunks"),  # agreed across ranks by the trainer (ZeRO-3 lock-step)
        )
        if self.sequence_parallel is not None and self.sequence_parallel.size > 1:
            from simpo_ds.sequence_parallel import sum_over_group

            sp = self.sequence_parallel
            seq = SequenceLogps(sum_over_group(seq.logp_sum, sp), seq.num_tokens, sum_over_group(seq.logit_sum, sp))
        return seq


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0 (reference ``disable_dropout_in_model``)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if config is not None and hasattr(config, key):
            setattr(config, key, 0.0)


def resolve_dtype(name: str, device_type: str) -> torch.dtype:
    """torch_dtype config value -> dtype; ``auto`` is bf16 on CUDA, fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(cfg, dtype: torch.dtype, attn_implementation: str) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` with the run's dtype and attention; LoRA when asked.

    Call inside the engine's ZeRO-3 context (HfDeepSpeedConfig alive) to partition while loading.
    """
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=cfg.trust_remote_code,
                  revision=cfg.model_revision)
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    model = AutoModelForCausalLM.from_pretrained(cfg.model_name_or_path, **kwargs)
    return prepare_model(model, cfg)


def prepare_model(model: nn.Module, cfg) -> nn.Module:
    """Dropout off, gradient checkpointing, LoRA — for a freshly loaded (or user-given) model."""
    model.config.use_cache = False
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.use_peft:
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora_target_modules
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=0.0 if cfg.disable_dropout else cfg.lora_dropout,
            target_modules=targets[0] if targets == ["all-linear"] else targets,
            task_type="CAUSAL_LM",
        )
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, lora)
    return model


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
POLICY_PREFIX = "model."  # SimPOPolicy keeps the LM under .model


def merge_lora_state_dict(state_dict: dict, scaling: float) -> dict:
    """PEFT LoRA state dict -> plain model state dict with W' = W + scaling * B @ A.

    Keys ``base_model.model.<path>.base_layer.weight`` / ``.lora_A.<adapter>.weight`` /
    ``.lora_B.<adapter>.weight`` become ``<path>.weight``; other keys lose the PEFT prefix.
    """
    prefix = "base_model.model."
    merged, lora_a, lora_b = {}, {}, {}
    for key, value in state_dict.items():
        key = key[len(prefix) :] if key.startswith(prefix) else key
        if ".lora_A." in key:
            lora_a[key.split(".lora_A.")[0]] = value
        elif ".lora_B." in key:
            lora_b[key.split(".lora_B.")[0]] = value
        else:
            merged[key.replace(".base_layer.", ".")] = value
    for module, a in lora_a.items():
        weight = merged[f"{module}.weight"]
        delta = (lora_b[module].float() @ a.float()) * scaling
        merged[f"{module}.weight"] = (weight.float() + delta).to(weight.dtype)
    return merged


def export_pretrained(model: nn.Module, state_dict: dict, tokenizer, out_dir, cfg) -> None:
    """Write the model (safetensors + config + tokenizer) to ``out_dir``, touching nothing else there.

    Staged in a hidden sibling directory, then moved in (:func:`simpo_ds.io.install_model_files`): a
    new ``out_dir`` appears whole; in an existing one (``save_model(output_dir)``) only model files
    are replaced, and weight files of an earlier export that this one did not write are removed.
    LoRA: merged weights, or the adapter alone with save_adapter_only."""
    import shutil

    from simpo_ds.io import install_model_files, staging_dir

    tmp = staging_dir(out_dir)
    state_dict = {k[len(POLICY_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(POLICY_PREFIX)}
    try:
        if hasattr(model, "peft_config"):
            if cfg.save_adapter_only:
                model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            else:
                scaling = cfg.lora_alpha / cfg.lora_r
                base = model.get_base_model()
                base.save_pretrained(tmp, state_dict=merge_lora_state_dict(state_dict, scaling), safe_serialization=True)
        else:
            model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    except BaseException:  # a failed write (disk full) leaves the earlier export as it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stale = install_model_files(tmp, out_dir)
    if stale:
        logger.info("export to %s: removed the earlier export's weight files %s", out_dir, ", ".join(stale))
