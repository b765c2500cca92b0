"""``SimPOTrainer``: the reference trainer's door (princeton-nlp/SimPO), DeepSpeed-native underneath.

A script written against the reference ports by changing one import::

    from simpo_ds import SimPOConfig, SimPOTrainer

    trainer = SimPOTrainer(model="path/or/hub-id", args=SimPOConfig(...), train_dataset=train,
                           eval_dataset=test, tokenizer=tokenizer, peft_config=lora_config)
    result = trainer.train()          # TrainOutput(global_step, training_loss, metrics)
    trainer.save_model(output_dir)    # plain transformers model (consolidated under ZeRO-3); only model files
    trainer.push_to_hub()             # with hub_model_id; log_metrics / save_metrics / save_state /
                                      # create_model_card / accelerator.is_main_process as the reference uses them

It IS the CLI's ``Trainer`` (same setup, loop, checkpoints and export); this class adds the reference
constructor and method names. Reference methods keep their meaning but work on packed batches:
``concatenated_forward`` runs one varlen row instead of a padded [2B, L] batch.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch
from transformers.trainer_utils import TrainOutput

from simpo_ds import hub
from simpo_ds.cli import EXIT_PREEMPTED
from simpo_ds.config import ConfigError, SimPOConfig
from simpo_ds.data.packing import collate_packed
from simpo_ds.data.tokenize import tokenize_row as _tokenize_row
from simpo_ds.loss import StepNormalizer, finalize_metrics, get_batch_logps, microbatch_loss, simpo_loss
from simpo_ds.model import SimPOPolicy
from simpo_ds.engine import barrier, local_rank, shutdown_distributed
from simpo_ds.io import write_atomic
from simpo_ds.trainer import PairData, Trainer

logger = logging.getLogger("simpo_ds")

_UNSUPPORTED = {
    "data_collator": "simpo-ds packs pairs itself (docs/design.md §3); drop data_collator, or set packing=False "
    "for padded reference batches",
    "model_init": "pass model= (a name or a PreTrainedModel); hyperparameter search is not supported",
    "optimizers": "configure AdamW through SimPOConfig (learning_rate, adam_*, weight_decay, "
    "lr_scheduler_type, warmup_ratio) or an 'optimizer' section in the DeepSpeed JSON (args.deepspeed)",
    "preprocess_logits_for_metrics": "simpo-ds never materialises full logits (chunked reducer); "
    "use the logged metrics",
    "compute_metrics": "simpo-ds logs the reference metrics itself (rewards/*, logps/*, logits/*)",
}


class SimPOTrainer(Trainer):
    """Reference-compatible constructor over :class:`simpo_ds.trainer.Trainer`."""

    def __init__(
        self,
        model=None,
        args: Optional[SimPOConfig] = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        tokenizer=None,
        model_init=None,
        callbacks=None,
        optimizers=(None, None),
        preprocess_logits_for_metrics=None,
        peft_config=None,
        compute_metrics=None,
    ):
        given = {
            "data_collator": data_collator,
            "model_init": model_init,
            "optimizers": None if optimizers in (None, (None, None)) else optimizers,
            "preprocess_logits_for_metrics": preprocess_logits_for_metrics,
            "compute_metrics": compute_metrics,
        }
        for name, value in given.items():
            if value is not None:
                raise ValueError(f"SimPOTrainer({name}=...) is not supported: {_UNSUPPORTED[name]}")
        if model is None:
            raise ValueError("SimPOTrainer needs model= (a model name/path or a PreTrainedModel)")
        if train_dataset is None:
            raise ValueError("SimPOTrainer needs train_dataset= (prompt/chosen/rejected columns)")
        args = args if args is not None else SimPOConfig()
        if peft_config is not None:
            _apply_peft_config(args, peft_config)
        eval_sets = eval_dataset if isinstance(eval_dataset, dict) else None
        super().__init__(
            args,
            model=model,
            tokenizer=tokenizer,
            train_dataset=train_dataset,
            eval_dataset=None if eval_sets else eval_dataset,
            callbacks=tuple(callbacks or ()),  # TrainerCallback objects and plain callables
        )
        self._eval_sets_raw = eval_sets
        self.args = args

    # ---- reference methods -------------------------------------------------------------------
    def tokenize_row(self, feature: dict, model=None) -> dict:
        """One row -> our tokenized pair plus reference-style ``*_labels`` (-100 on the prompt)."""
        if self.tokenizer is None:
            raise ValueError("tokenize_row needs the trainer's tokenizer")
        out = _tokenize_row(feature, self.tokenizer, self.args)
        for side in ("chosen", "rejected"):
            ids, plen = out[f"{side}_input_ids"], out[f"{side}_prompt_len"]
            out[f"{side}_labels"] = [self.args.label_pad_token_id] * plen + ids[plen:]
        return out

    def simpo_loss(self, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor):
        """Reference ``simpo_loss`` -> (losses [P], chosen_rewards [P], rejected_rewards [P])."""
        a = self.args
        return simpo_loss(policy_chosen_logps, policy_rejected_logps, a.beta, a.gamma_beta_ratio, a.loss_type,
                          a.label_smoothing)

    get_batch_logps = staticmethod(get_batch_logps)  # padded reference maths (full logits)

    def get_packed_logps(self, model, batch: dict):
        """The packed/segment variant of ``get_batch_logps``: a packed batch -> SequenceLogps
        (per-sequence sums, counts; ``.average`` is the length-normalised log-prob)."""
        return self._as_policy(model)(batch)

    def concatenated_forward(self, model, batch: dict):
        """One forward over a packed batch (``collate_packed``) or a list of tokenized pairs ->
        (chosen_logps [P], rejected_logps [P], chosen_logits [P], rejected_logits [P]); logits are the
        mean raw logit over each answer (the reference returns full logit tensors)."""
        batch = self._as_batch(batch)
        seq = self._as_policy(model)(batch)
        avg, mean_logit = seq.average, seq.logit_sum / seq.num_tokens.to(torch.float32)
        c, r = batch["chosen_seq"], batch["rejected_seq"]
        return avg[c], avg[r], mean_logit[c], mean_logit[r]

    def get_batch_loss_metrics(self, model, batch, train_eval: str = "train"):
        """(mean loss over the batch's pairs [+ sft], reference metric dict; ``eval_`` prefix for eval)."""
        batch = self._as_batch(batch)
        seq = self._as_policy(model)(batch)
        chosen_tokens = int(batch["seq_num_tokens"][batch["chosen_seq"]].sum())
        norm = StepNormalizer(batch["num_pairs"], chosen_tokens)
        loss, stats = microbatch_loss(seq, batch["chosen_seq"], batch["rejected_seq"], norm,
                                      **self._loss_kwargs())
        prefix = "eval_" if train_eval == "eval" else ""
        return loss, {f"{prefix}{k}": v for k, v in finalize_metrics(stats, self.args.sft_weight).items()}

    def compute_loss(self, model, inputs, return_outputs: bool = False):
        loss, metrics = self.get_batch_loss_metrics(model, inputs, "train")
        return (loss, metrics) if return_outputs else loss

    # ---- Trainer-style entry points ------------------------------------------------------------
    EXPORTS_FINAL = False  # the script exports (save_model) and pushes (push_to_hub), as with the reference

    def train(self, resume_from_checkpoint: Optional[str] = None) -> TrainOutput:
        """Train to the end -> TrainOutput. A run stopped by SIGTERM/SIGUSR1 (preemption) saves a
        checkpoint and raises :class:`TrainingPreempted` (exit code 3 unless caught), so a script
        never goes on to export a half-trained model as its final one."""
        if resume_from_checkpoint is not None:
            if self.engine is not None:
                raise ValueError("resume_from_checkpoint must be given before the trainer is set up")
            self.cfg.resume_from_checkpoint = "latest" if resume_from_checkpoint is True else str(resume_from_checkpoint)
        started = time.time()
        metrics = super().train()
        if self.preempted:
            shutdown_distributed()  # every rank stopped here together; a live gloo group can abort the exit
            raise TrainingPreempted(self.step)
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        runtime = time.time() - started
        metrics.update(train_runtime=runtime, epoch=self.epoch,
                       train_steps_per_second=(self.step - self.start_step) / max(runtime, 1e-9))
        return TrainOutput(global_step=self.step, training_loss=metrics["train_loss"], metrics=metrics)

    def evaluate(self, eval_dataset=None, metric_key_prefix: str = "eval", **kwargs) -> dict:
        """Metrics over the eval split(s) as ``{prefix}_{name}`` (HF convention); dicts of datasets are
        evaluated one by one (``{prefix}_{set}_{name}``). Inside the loop it is the base evaluate."""
        if kwargs:  # the base loop's call: evaluate(data=..., name=...)
            return super().evaluate(**kwargs)
        self.setup()
        sets = self._named_eval_sets(eval_dataset)
        out = {}
        for name, data in sets.items():
            metrics = super().evaluate(data=data, name=name)
            tag = f"{metric_key_prefix}_{name}_" if name else f"{metric_key_prefix}_"
            out.update({f"{tag}{k}": v for k, v in metrics.items()})
        return out

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """Write a plain-transformers model (+ tokenizer) to ``output_dir`` (default: the run's
        output_dir, as the transformers Trainer). Only model files there are written or replaced:
        ``checkpoints/``, ``metrics.jsonl`` and anything else in the directory stay. With
        ``push_to_hub: true`` the directory is then pushed ("Model save"), as the transformers Trainer
        does. Every rank calls it (the ZeRO-3 weights are gathered)."""
        self.setup()
        self.export(Path(output_dir or self.cfg.output_dir))
        if self.cfg.push_to_hub and not _internal_call:
            self._push(Path(output_dir or self.cfg.output_dir), "Model save")

    def push_to_hub(self, commit_message: str = "End of training", blocking: bool = True, token: Optional[str] = None,
                    revision: Optional[str] = None, **model_card_kwargs) -> Optional[str]:
        """The transformers Trainer's ``push_to_hub``: export to output_dir, write its model card
        (``model_card_kwargs``: finetuned_from, dataset, tags, ...), upload output_dir to
        ``hub_model_id`` without checkpoints/ -> the commit URL on rank 0 (None elsewhere). Every rank
        calls it. ``blocking`` is accepted; the upload always completes before it returns."""
        if not self.cfg.hub_model_id:
            raise ConfigError("push_to_hub(): config key 'hub_model_id' names no hub repository")
        self.save_model(self.cfg.output_dir, _internal_call=True)
        self.create_model_card(**model_card_kwargs)
        return self._push(Path(self.cfg.output_dir), commit_message, revision=revision, token=token)

    def _push(self, folder: Path, commit_message: str, revision: Optional[str] = None,
              token: Optional[str] = None) -> Optional[str]:
        url = None
        if self.rank == 0:
            url = hub.push(folder, self.cfg.hub_model_id, commit_message, revision=revision, token=token)
            logger.info("pushed %s to %s: %s", folder, self.cfg.hub_model_id, url)
        barrier()
        return url

    # ---- the reference script's last lines (transformers Trainer names) ------------------------
    @property
    def model(self):
        """The Hugging Face model being trained (loaded on first use; partitioned under ZeRO-3, its
        ``config`` is whole)."""
        self.setup()
        return self.policy.causal_lm

    @property
    def accelerator(self) -> SimpleNamespace:
        """What the reference script asks of ``trainer.accelerator``: which process this is, and a barrier."""
        return SimpleNamespace(is_main_process=self.rank == 0, is_local_main_process=local_rank() == 0,
                               process_index=self.rank, num_processes=self.world_size, wait_for_everyone=barrier)

    def is_world_process_zero(self) -> bool:
        return self.rank == 0

    def log_metrics(self, split: str, metrics: dict) -> None:
        """Print ``metrics`` on rank 0, one ``key = value`` line each (transformers' format)."""
        if self.rank == 0:
            logger.info("***** %s metrics *****", split)
            for key in sorted(metrics):
                logger.info("  %s = %s", key.ljust(max(map(len, metrics), default=0)), metrics[key])

    def save_metrics(self, split: str, metrics: dict, combined: bool = True) -> None:
        """Rank 0 writes ``output_dir/{split}_results.json`` (and merges it into all_results.json)."""
        if self.rank != 0:
            return
        out = Path(self.cfg.output_dir)
        write_atomic(out / f"{split}_results.json", json.dumps(metrics, indent=4, sort_keys=True))
        if combined:
            path = out / "all_results.json"
            merged = json.loads(path.read_text()) if path.is_file() else {}
            write_atomic(path, json.dumps({**merged, **metrics}, indent=4, sort_keys=True))

    def save_state(self) -> None:
        """Rank 0 writes ``output_dir/trainer_state.json`` (step, epoch, log_history from metrics.jsonl)."""
        if self.rank != 0:
            return
        from transformers import TrainerState

        records = Path(self.cfg.output_dir) / "metrics.jsonl"
        history = [json.loads(line) for line in records.read_text().splitlines()] if records.is_file() else []
        state = TrainerState(global_step=self.step, max_steps=self.total_steps, epoch=self.epoch,
                             num_train_epochs=self.cfg.num_train_epochs, logging_steps=self.cfg.logging_steps,
                             log_history=[r for r in history if r.get("split") in ("train", "eval")])
        state.save_to_json(str(Path(self.cfg.output_dir) / "trainer_state.json"))

    def create_model_card(self, language: Optional[str] = None, license: Optional[str] = None, tags=None,
                          model_name: Optional[str] = None, finetuned_from: Optional[str] = None, tasks=None,
                          dataset_tags=None, dataset=None, dataset_args=None, **_) -> None:
        """Rank 0 writes ``output_dir/README.md``: a model card naming the base model, the data and
        the SimPO settings."""
        if self.rank != 0:
            return
        write_atomic(Path(self.cfg.output_dir) / "README.md", model_card(
            self.cfg, finetuned_from or self.cfg.model_name_or_path, _as_list(dataset or dataset_tags),
            ["simpo", "simpo-ds", *_as_list(tags)], language, license, model_name))

    # ---- helpers -------------------------------------------------------------------------------
    @property
    def has_eval(self) -> bool:
        return self.eval_data is not None or bool(self._eval_sets_raw)

    def _named_eval_sets(self, eval_dataset) -> dict:
        if eval_dataset is not None:
            given = eval_dataset if isinstance(eval_dataset, dict) else {"": eval_dataset}
            return {n: self._prepare_split(d, f"eval {n}".strip()) for n, d in given.items()}
        if self._eval_sets_raw:
            if not hasattr(self, "_eval_sets"):
                self._eval_sets = {n: self._prepare_split(d, f"eval {n}") for n, d in self._eval_sets_raw.items()}
            return self._eval_sets
        if self.eval_data is None:
            raise ValueError("evaluate(): no eval_dataset given to the trainer or the call")
        return {"": self.eval_data}

    def _as_policy(self, model):
        if model is None:
            model = self.engine if self.engine is not None else self.policy
        if isinstance(model, SimPOPolicy) or hasattr(model, "module"):  # ours, or a DeepSpeed engine
            return model
        return SimPOPolicy(model, chunk_size=self.cfg.logits_chunk_size)

    def _as_batch(self, batch):
        if isinstance(batch, (list, tuple)):
            batch = collate_packed(batch, self.cfg.label_pad_token_id)
        return batch


class TrainingPreempted(SystemExit):
    """``SimPOTrainer.train()`` was stopped by SIGTERM/SIGUSR1 after saving a checkpoint. Uncaught, the
    script exits with code 3 (``simpo_ds.cli.EXIT_PREEMPTED``: requeue and resume with
    ``resume_from_checkpoint="latest"``), skipping its save_model / push_to_hub lines."""

    def __init__(self, step: int):
        super().__init__(EXIT_PREEMPTED)
        self.step = step

    def __str__(self) -> str:
        return f"training was preempted after step {self.step} (checkpoint saved); resume from 'latest'"


def model_card(cfg: SimPOConfig, base: str, datasets: list, tags: list, language=None, license=None,
               model_name=None) -> str:
    """A Hugging Face model card (YAML front matter + text) for a SimPO-trained model."""
    meta = {"base_model": base, "library_name": "transformers", "tags": tags, "datasets": datasets or None,
            "language": language, "license": license}
    front = "\n".join(f"{k}: {json.dumps(v)}" for k, v in meta.items() if v)
    name = model_name or Path(cfg.output_dir).name
    return (f"---\n{front}\n---\n\n# {name}\n\nFine-tuned from `{base}` with SimPO (simpo-ds): "
            f"beta={cfg.beta}, gamma_beta_ratio={cfg.gamma_beta_ratio}, loss_type={cfg.loss_type}, "
            f"learning_rate={cfg.learning_rate}, {cfg.num_train_epochs} epoch(s)"
            + (f", datasets: {', '.join(map(str, datasets))}" if datasets else "") + ".\n")


def _as_list(value) -> list:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _apply_peft_config(args: SimPOConfig, peft_config) -> None:
    """Map a peft ``LoraConfig`` (or its dict) onto the config's LoRA fields — one code path."""
    get = peft_config.get if isinstance(peft_config, dict) else lambda k, d=None: getattr(peft_config, k, d)
    if get("use_rslora", False) or get("use_dora", False):
        raise ConfigError("peft_config: use_rslora / use_dora are not supported (the merged export uses alpha/r)")
    targets = get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    args.use_peft = True
    args.lora_r = int(get("r", args.lora_r))
    args.lora_alpha = int(get("lora_alpha", args.lora_alpha))
    args.lora_dropout = float(get("lora_dropout", args.lora_dropout))
    if targets:
        args.lora_target_modules = sorted(targets)
    args.validate()


__all__ = ["SimPOTrainer", "SimPOConfig", "PairData", "TrainingPreempted"]
