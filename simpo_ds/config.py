"""One run configuration: dataclass defaults <- YAML recipe <- ``--key value`` overrides.

Field names follow the reference ``SimPOConfig`` (princeton-nlp/SimPO) and Hugging Face
``TrainingArguments`` wherever those have a name for the concept. Every field has a comment; the
README's config reference table is generated from the same fields (``python -m simpo_ds.config``).

Errors are ``ConfigError`` with a message naming the key (and the file it came from), so the CLI can
exit non-zero with one clear line.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


DEFAULT_TRAIN_BATCH_SIZE = 128  # global pairs per optimizer step when no batch key is set (reference)

# The two ways to give the batch size: a recipe's form is dropped when the command line gives the other.
GLOBAL_BATCH_KEYS = ("train_batch_size",)
PER_DEVICE_BATCH_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps")


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


@dataclass
class SimPOConfig:
    # ---- model -------------------------------------------------------------------------------
    model_name_or_path: str = ""  # local dir or hub id of the policy (a causal LM)
    tokenizer_name_or_path: Optional[str] = None  # defaults to model_name_or_path
    gguf_file: Optional[str] = None  # load weights from this gguf file inside model_name_or_path
    model_revision: str = "main"  # hub revision (branch, tag or commit) of the model and tokenizer
    torch_dtype: Optional[str] = "auto"  # auto or null (bf16 on GPU, fp32 on CPU; bf16/fp16 keys override) | float32 | bfloat16 | float16
    attn_implementation: str = "auto"  # auto (CUDA bf16/fp16: flash_attention_2 or varlen; else sdpa_varlen) | flash_attention_2 | varlen | sdpa_varlen | sdpa | eager
    use_flash_attention_2: bool = False  # alignment-handbook alias of attn_implementation: flash_attention_2
    gradient_checkpointing: bool = False  # recompute decoder layers in backward (use_reentrant=False)
    gradient_checkpointing_kwargs: Optional[dict] = None  # only {use_reentrant: false} (what simpo-ds always uses)
    trust_remote_code: bool = False  # passed to from_pretrained
    use_peft: bool = False  # train LoRA adapters instead of all weights
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scaling numerator
    lora_dropout: float = 0.05  # dropout on the LoRA branch
    lora_target_modules: list = field(default_factory=lambda: ["all-linear"])  # peft target modules
    save_adapter_only: bool = False  # LoRA export: adapter only instead of merged weights

    # ---- data --------------------------------------------------------------------------------
    train_data: str = ""  # .jsonl/.json/.parquet file or dir, or hub "name[:split]"
    eval_data: Optional[str] = None  # same forms; None = no evaluation
    dataset_mixer: Optional[dict] = None  # {dataset: fraction} instead of train_data/eval_data (docs/recipes.md)
    dataset_splits: list = field(default_factory=lambda: ["train", "test"])  # mixer splits: "train" in name trains, "test" evaluates
    dataset_configs: Optional[list] = None  # dataset config name per mixer entry (hub datasets)
    drop_ties: bool = False  # drop pairs whose chosen and rejected scores are equal (score columns)
    chat_template: Optional[str] = None  # jinja chat template that replaces the tokenizer's
    chat_template_mode: str = "reference"  # reference (answers rendered alone) | generation_prompt
    auto_insert_empty_system_msg: bool = True  # reference run_simpo.py behaviour
    max_length: int = 2048  # prompt + answer tokens per sequence (reference recipes)
    max_prompt_length: int = 1800  # prompt tokens kept when a pair is too long
    truncation_mode: str = "keep_end"  # keep_end | keep_start (which prompt tokens survive)
    label_pad_token_id: int = -100  # label of positions that carry no loss
    strict: bool = False  # make dropped rows (empty answer after truncation, ...) an error
    dataset_num_proc: Optional[int] = None  # processes for tokenization (datasets.map); alias preprocessing_num_workers
    truncation_side: Optional[str] = None  # accepted, no effect: prompts are truncated by truncation_mode

    # ---- packing -----------------------------------------------------------------------------
    packing: bool = True  # pack pairs into varlen rows; false = padded reference batches
    max_tokens_per_microbatch: int = 8192  # token budget of one packed micro-batch (per rank)
    prompt_sharing: bool = False  # one [prompt | chosen | rejected] segment per pair (issue 9)
    sequence_parallel_size: int = 1  # N ranks share one packed row, each computes 1/N of its tokens (Ulysses)
    tiled_mlp_tokens: int = 0  # > 0: MLPs run over tiles of this many tokens, recomputed in backward (long slices)

    # ---- SimPO -------------------------------------------------------------------------------
    beta: float = 2.0  # reward scale
    gamma_beta_ratio: Optional[float] = None  # target margin over beta; None = 0.25 (reference)
    simpo_gamma: Optional[float] = None  # absolute margin alias, folded into gamma_beta_ratio = simpo_gamma / beta
    sft_weight: float = 0.0  # weight of the chosen NLL term (0 = pure SimPO)
    loss_type: str = "sigmoid"  # sigmoid | hinge
    label_smoothing: float = 0.0  # conservative sigmoid loss (ignored by hinge)
    disable_dropout: bool = True  # set every dropout probability to 0

    # ---- optimisation ------------------------------------------------------------------------
    output_dir: str = "outputs/simpo"  # metrics.jsonl, checkpoints/, final/
    train_batch_size: Optional[int] = None  # GLOBAL batch in pairs per optimizer step; None: per_device x accumulation x ranks if set, else 128
    per_device_train_batch_size: Optional[int] = None  # TrainingArguments style (see "Batch size" in docs/configuration.md)
    gradient_accumulation_steps: Optional[int] = None  # TrainingArguments style (see "Batch size" in docs/configuration.md)
    learning_rate: float = 1e-6  # peak learning rate
    lr_scheduler_type: str = "cosine"  # cosine | linear | constant | constant_with_warmup
    warmup_ratio: float = 0.1  # fraction of steps with linear warmup
    weight_decay: float = 0.0  # AdamW weight decay
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # global gradient clipping (0 = off)
    num_train_epochs: float = 1.0  # epochs (ignored when max_steps > 0)
    max_steps: int = -1  # optimizer steps; -1 = from num_train_epochs
    seed: int = 42  # data order, pack plan, init of LoRA

    # ---- evaluation, logging, checkpoints ----------------------------------------------------
    eval_steps: Optional[int] = None  # evaluate every N steps (and at the end); None = end only
    do_eval: Optional[bool] = None  # false: no evaluation even with eval data
    eval_strategy: Optional[str] = None  # no | steps | epoch (alias evaluation_strategy); None = eval_steps decides
    per_device_eval_batch_size: Optional[int] = None  # accepted, no effect: evaluation packs by max_tokens_per_microbatch
    eval_on_start: bool = False  # evaluate before the first step (logged at step 0)
    logging_steps: int = 1  # train metrics averaged over this many steps
    report_to: list = field(default_factory=list)  # [] | ["wandb"]
    run_name: Optional[str] = None  # wandb run name
    save_steps: int = 0  # DeepSpeed checkpoint every N steps (0 = only on preemption)
    save_strategy: Optional[str] = None  # no | steps | epoch; None = save_steps decides
    save_total_limit: int = 2  # keep the last N checkpoints (a rollback moves later ones to checkpoints/abandoned/)
    resume_from_checkpoint: Optional[str] = None  # latest | PATH
    save_final: bool = True  # export output_dir/final/ (safetensors + tokenizer)
    push_to_hub: bool = False  # upload to hub_model_id: final/ at the end (CLI); save_model / push_to_hub() (Python); checked before training
    hub_model_id: Optional[str] = None  # hub repository of push_to_hub
    log_level: str = "info"  # rank-0 log level: debug | info | warning | error | critical | passive (= info)

    # ---- DeepSpeed / systems -----------------------------------------------------------------
    deepspeed: Optional[str] = None  # DeepSpeed JSON (ds_configs/zero3.json); CLI alias --ds
    bf16: Optional[bool] = None  # TrainingArguments style alias of torch_dtype=bfloat16
    fp16: Optional[bool] = None  # TrainingArguments style alias of torch_dtype=float16
    tf32: Optional[bool] = None  # allow TF32 matmuls on CUDA
    optim: str = "adamw_torch"  # adamw_torch | adamw_torch_fused (both: torch AdamW, fused kernel on CPU/CUDA)
    collective_timeout_s: int = 300  # a training/eval collective that waits longer is an error naming rank and step
    debug_lockstep: bool = False  # check every rank makes the same module calls (slow; or SIMPO_DS_DEBUG_LOCKSTEP=1)
    max_nonfinite_steps: int = 5  # abort after this many consecutive non-finite (skipped) steps
    peak_tflops: Optional[float] = None  # per-device peak for MFU (known GPUs detected)
    logits_chunk_size: int = 0  # rows of lm_head logits at once; 0 = auto (2048 at 32k vocab, 512 at 128k)

    def __post_init__(self) -> None:
        if self.simpo_gamma is not None:
            if self.gamma_beta_ratio is not None:
                raise ConfigError(
                    "config keys 'simpo_gamma' and 'gamma_beta_ratio' are both set: use one "
                    "(simpo_gamma = gamma_beta_ratio * beta)"
                )
            if self.beta <= 0:
                raise ConfigError(f"config key 'beta': must be > 0 (got {self.beta!r})")
            self.gamma_beta_ratio = float(self.simpo_gamma) / self.beta
            self.simpo_gamma = None
        if self.gamma_beta_ratio is None:
            self.gamma_beta_ratio = 0.25
        if self.torch_dtype is None:  # alignment-handbook recipes write torch_dtype: null
            self.torch_dtype = "auto"
        if self.bf16 and self.fp16:
            raise ConfigError("config keys 'bf16' and 'fp16' are both true: use one")
        if self.torch_dtype == "auto" and (self.bf16 or self.fp16):
            self.torch_dtype = "bfloat16" if self.bf16 else "float16"
        if self.use_flash_attention_2:
            if self.attn_implementation not in ("auto", "flash_attention_2"):
                raise ConfigError(f"config keys 'use_flash_attention_2' and 'attn_implementation: "
                                  f"{self.attn_implementation}' disagree: use one")
            self.attn_implementation = "flash_attention_2"
        if isinstance(self.report_to, str):  # TrainingArguments accepts report_to="wandb"
            self.report_to = [] if self.report_to in ("none", "") else [self.report_to]
        self.report_to = [r for r in self.report_to if r != "none"]
        self.validate()

    # ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Fail fast with the key name on impossible values."""

        def bad(key: str, why: str) -> None:
            raise ConfigError(f"config key '{key}': {why} (got {getattr(self, key)!r})")

        choices = {
            "loss_type": ("sigmoid", "hinge"),
            "optim": ("adamw_torch", "adamw_torch_fused"),
            "log_level": ("debug", "info", "warning", "error", "critical", "passive"),
            "truncation_mode": ("keep_end", "keep_start"),
            "chat_template_mode": ("reference", "generation_prompt"),
            "torch_dtype": ("auto", "float32", "bfloat16", "float16"),
            "attn_implementation": ("auto", "flash_attention_2", "varlen", "sdpa_varlen", "sdpa", "eager"),
            "lr_scheduler_type": ("cosine", "linear", "constant", "constant_with_warmup"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                bad(key, f"must be one of {', '.join(allowed)}")
        if self.beta <= 0:
            bad("beta", "must be > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            bad("label_smoothing", "must be in [0, 0.5)")
        if self.sft_weight < 0:
            bad("sft_weight", "must be >= 0")
        if self.max_length <= 1:
            bad("max_length", "must be > 1")
        if not 0 < self.max_prompt_length < self.max_length:
            bad("max_prompt_length", f"must be > 0 and < max_length ({self.max_length})")
        if self.max_tokens_per_microbatch <= 0:
            bad("max_tokens_per_microbatch", "must be > 0")
        if self.learning_rate < 0:
            bad("learning_rate", "must be >= 0")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            bad("warmup_ratio", "must be in [0, 1]")
        if self.max_steps == 0 or self.max_steps < -1:
            bad("max_steps", "must be -1 (use num_train_epochs) or > 0")
        if self.max_steps == -1 and self.num_train_epochs <= 0:
            bad("num_train_epochs", "must be > 0 when max_steps is -1")
        for key in ("logging_steps", "max_nonfinite_steps", "collective_timeout_s"):
            if getattr(self, key) <= 0:
                bad(key, "must be > 0")
        if self.logits_chunk_size < 0:
            bad("logits_chunk_size", "must be > 0, or 0 for auto")
        for key in ("eval_steps", "train_batch_size", "per_device_train_batch_size", "gradient_accumulation_steps"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                bad(key, "must be > 0 when set")
        if self.save_steps < 0 or self.save_total_limit < 1:
            bad("save_steps" if self.save_steps < 0 else "save_total_limit", "out of range")
        unknown_reports = set(self.report_to) - {"wandb", "none"}
        if unknown_reports:
            bad("report_to", "supported: wandb, none")
        if self.sequence_parallel_size < 1:
            bad("sequence_parallel_size", "must be >= 1")
        if self.tiled_mlp_tokens < 0:
            bad("tiled_mlp_tokens", "must be >= 0 (0: off; DeepSpeed's ALST recipe tiles by hidden_size tokens)")
        if self.sequence_parallel_size > 1 and (self.prompt_sharing or not self.packing):
            bad("sequence_parallel_size", "needs packing: true and prompt_sharing: false (a sliced row is a "
                "packed varlen row; the prompt-sharing mask has no sequence-parallel kernel)")
        if self.prompt_sharing and not self.packing:
            bad("prompt_sharing", "needs packing: true (it is a packed layout; the padded path is the reference)")
        if self.use_peft and self.lora_r <= 0:
            bad("lora_r", "must be > 0")
        for key in ("eval_strategy", "save_strategy"):
            if getattr(self, key) not in (None, "no", "steps", "epoch"):
                bad(key, "must be one of no, steps, epoch")
        if (self.gradient_checkpointing_kwargs or {}).keys() - {"use_reentrant"}:
            bad("gradient_checkpointing_kwargs", "only use_reentrant is supported")
        if self.dataset_mixer is not None:
            if self.train_data or self.eval_data:
                bad("dataset_mixer", "set either dataset_mixer or train_data/eval_data, not both")
            if not isinstance(self.dataset_mixer, dict) or not self.dataset_mixer:
                bad("dataset_mixer", "must be a non-empty mapping of dataset: fraction")
            for name, frac in self.dataset_mixer.items():
                if not isinstance(frac, (int, float)) or not 0 < frac <= 1:
                    raise ConfigError(f"config key 'dataset_mixer': fraction of {name!r} must be in (0, 1], got {frac!r}")
            if self.dataset_configs is not None and len(self.dataset_configs) != len(self.dataset_mixer):
                bad("dataset_configs", f"needs one entry per dataset_mixer entry ({len(self.dataset_mixer)})")
        if self.push_to_hub and not self.hub_model_id:
            bad("hub_model_id", "push_to_hub: true needs the hub repository in hub_model_id")

    # ------------------------------------------------------------------------------------------
    @property
    def gamma(self) -> float:
        """Absolute target margin gamma = gamma_beta_ratio * beta."""
        return self.gamma_beta_ratio * self.beta

    def resolve_batch_size(self, world_size: int) -> int:
        """THE global pair count per optimizer step, from either form of the batch size:
        ``train_batch_size`` (global pairs), or TrainingArguments' per_device_train_batch_size x
        gradient_accumulation_steps x ``world_size`` (data-parallel ranks; a missing factor counts
        as 1); 128 (the reference's default) when neither is set. Both forms set and disagreeing is a
        ConfigError naming both (a recipe's form is replaced by the other one given on the command
        line: :func:`load_config`)."""
        if self.per_device_train_batch_size is None and self.gradient_accumulation_steps is None:
            return self.train_batch_size or DEFAULT_TRAIN_BATCH_SIZE
        per_device, accumulation = self.per_device_train_batch_size or 1, self.gradient_accumulation_steps or 1
        product = per_device * accumulation * world_size
        if self.train_batch_size is not None and self.train_batch_size != product:
            raise ConfigError(
                f"config keys 'train_batch_size' ({self.train_batch_size} pairs per step, global) and "
                f"'per_device_train_batch_size' x 'gradient_accumulation_steps' ({per_device} x {accumulation} x "
                f"{world_size} data-parallel ranks = {product}) disagree: set one form (given on the command "
                "line, either form replaces the recipe's)")
        return product

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_KEY_ALIASES = {"ds": "deepspeed", "ds_config": "deepspeed", "evaluation_strategy": "eval_strategy",
                "preprocessing_num_workers": "dataset_num_proc"}

# Keys accepted for recipe compatibility that change nothing here (logged once by the trainer when set).
NO_EFFECT = {
    "per_device_eval_batch_size": "evaluation packs pairs by max_tokens_per_microbatch",
    "truncation_side": "prompts are truncated by truncation_mode (keep_end keeps the prompt's end)",
}


def no_effect_keys(cfg: "SimPOConfig") -> dict[str, str]:
    """{key: why} for the set keys that have no effect in simpo-ds (including use_reentrant: true)."""
    out = {k: why for k, why in NO_EFFECT.items() if getattr(cfg, k) is not None}
    if (cfg.gradient_checkpointing_kwargs or {}).get("use_reentrant"):
        out["gradient_checkpointing_kwargs"] = "simpo-ds always checkpoints with use_reentrant=False"
    return out


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(SimPOConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(SimPOConfig)}


def _unknown_key(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(_field_types()), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}' in {source}{hint}")


def _coerce(key: str, value: Any, typ: Any, source: str) -> Any:
    """Turn a YAML value or a CLI string into the field's type, naming the key on failure."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        typ = args[0]
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no"):
                return False
            raise ValueError("expected true or false")
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("expected an integer")
            return int(value)
        if typ is float:
            return float(value)
        if typ is list or typing.get_origin(typ) is list:
            if isinstance(value, str):
                value = value.strip()
                if value.startswith("["):
                    return list(json.loads(value))
                return [v for v in value.split(",") if v]
            return list(value)
        if typ is str:
            return str(value)
        if typ is dict:
            value = json.loads(value) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise ValueError("expected a mapping (YAML, or JSON on the command line)")
            return dict(value)
    except (ValueError, TypeError, json.JSONDecodeError) as err:
        raise ConfigError(f"config key '{key}' in {source}: cannot read {value!r} ({err})") from None
    return value


def build_config(values: dict, source: str = "arguments") -> SimPOConfig:
    """Build a validated config from a flat dict of (possibly string) values."""
    types_ = _field_types()
    clean = {}
    for key, value in values.items():
        key = _KEY_ALIASES.get(key, key)
        if key not in types_:
            raise _unknown_key(key, source)
        clean[key] = _coerce(key, value, types_[key], source)
    try:
        return SimPOConfig(**clean)
    except TypeError as err:  # a dataclass argument problem: name it
        raise ConfigError(f"{source}: {err}") from None


def parse_overrides(argv: list[str]) -> dict:
    """``["--beta", "2.5", "--packing=false"]`` -> ``{"beta": "2.5", "packing": "false"}``.

    Only the key's dashes become underscores: ``--model-name-or-path=meta-llama/Llama-3-8B`` ->
    ``{"model_name_or_path": "meta-llama/Llama-3-8B"}``."""
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: overrides are --key value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")  # --max-steps is --max_steps; the VALUE is kept as typed
        if eq:
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 2
        else:
            value = "true"  # a bare flag: --eval_on_start
            i += 1
        out[key] = value
    return out


def load_config(recipe: Optional[str] = None, overrides: Optional[list[str]] = None) -> SimPOConfig:
    """Defaults <- YAML recipe <- CLI overrides (later wins)."""
    values: dict[str, Any] = {}
    source = "command line"
    if recipe:
        import yaml

        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"config file not found: {recipe}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {recipe}: expected a mapping of key: value")
        for key in loaded:
            if _KEY_ALIASES.get(key, key) not in _field_types():
                raise _unknown_key(key, recipe)
        values.update(loaded)
        source = f"{recipe} / command line"
    cli = {_KEY_ALIASES.get(k, k): v for k, v in parse_overrides(overrides or []).items()}
    for given, replaced in ((GLOBAL_BATCH_KEYS, PER_DEVICE_BATCH_KEYS), (PER_DEVICE_BATCH_KEYS, GLOBAL_BATCH_KEYS)):
        if any(k in cli for k in given):  # the batch size given on the command line in the other form
            for key in replaced:
                values.pop(key, None)
    if "simpo_gamma" in cli:
        values.pop("gamma_beta_ratio", None)  # an explicit CLI gamma replaces the recipe's ratio
    if "gamma_beta_ratio" in cli:
        values.pop("simpo_gamma", None)
    values.update(cli)
    return build_config(values, source)


def config_reference_markdown() -> str:
    """The README's config table, generated from the dataclass source comments."""
    import inspect

    lines = ["| key | default | meaning |", "|---|---|---|"]
    src = inspect.getsource(SimPOConfig).splitlines()
    for line in src:
        stripped = line.strip()
        if ":" not in stripped or stripped.startswith(("#", "def ", "@", "class", '"')):
            continue
        name = stripped.split(":", 1)[0].strip()
        if name not in _field_types():
            continue
        comment = stripped.split("#", 1)[1].strip() if "#" in stripped else ""
        f = next(f for f in dataclasses.fields(SimPOConfig) if f.name == name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        comment = comment.replace("|", "\\|")  # a literal pipe inside a markdown table cell
        lines.append(f"| `{name}` | `{default!r}` | {comment} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(config_reference_markdown())
