"""The SimPO training loop on a DeepSpeed engine — read it top to bottom.

    trainer = Trainer(cfg)          # cfg: simpo_ds.config.SimPOConfig
    trainer.train()                 # setup -> [eval_on_start] -> steps -> final eval -> export

One optimizer step = ``train_batch_size`` pairs (global). They are balanced over ranks by tokens,
packed per rank into micro-batches under ``max_tokens_per_microbatch`` (same count on every rank),
and each micro-batch contributes sum(pair losses) / N_step_pairs, so the gradient is that of the mean
loss over the step's pairs whatever the packing (docs/design.md §5). The data order is a seeded
permutation per epoch, so the data position of a checkpoint is just the step number.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import time
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from simpo_ds import engine as ds
from simpo_ds import hub
from simpo_ds import sequence_parallel
from simpo_ds.attention import CU_SEQLENS_IMPLEMENTATIONS, attention_kwargs, choose_attn_implementation, register_attention
from simpo_ds.callbacks import CONTROL_FLAGS, split_callbacks, trainer_log_names
from simpo_ds.config import ConfigError, SimPOConfig, no_effect_keys
from simpo_ds.data import mixer
from simpo_ds.data.load import prepare_pairs
from simpo_ds.data.packing import collate_packed, collate_padded, plan_step
from simpo_ds.data.sharing import collate_shared, shared_pair_num_tokens
from simpo_ds.data.tokenize import DataError
from simpo_ds.flops import WORK_KEYS, batch_work, flop_shape, training_flops
from simpo_ds.lockstep import CallCounter, check_equal
from simpo_ds.lockstep import enabled as lockstep_enabled
from simpo_ds.loss import STAT_NAMES, StepNormalizer, finalize_metrics, lockstep_chunk_counts, microbatch_loss, num_chunks
from simpo_ds.model import SimPOPolicy, batch_to_device, export_pretrained, load_model, prepare_model, resolve_dtype
from simpo_ds.reporting import Reporter, detect_peak_tflops, peak_memory_gb
from simpo_ds.shared_attention import choose_shared_attn_implementation

logger = logging.getLogger("simpo_ds")

CHECKPOINTS = "checkpoints"


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient norm."""

FINAL = "final"


class PairData:
    """A tokenized split with the per-pair lengths the planner needs (numpy, loaded once)."""

    def __init__(self, dataset):
        self.dataset = dataset
        keys = ("chosen_input_ids", "chosen_prompt_len", "rejected_input_ids", "rejected_prompt_len")
        lengths = dataset.map(
            lambda b: {
                "pair_tokens": [len(c) + len(r) for c, r in zip(b["chosen_input_ids"], b["rejected_input_ids"])],
                # labelled answer tokens (a sequence's first position never has a label)
                "chosen_answer_tokens": [
                    len(c) - max(p, 1) for c, p in zip(b["chosen_input_ids"], b["chosen_prompt_len"])
                ],
                "rejected_answer_tokens": [
                    len(r) - max(p, 1) for r, p in zip(b["rejected_input_ids"], b["rejected_prompt_len"])
                ],
                # tokens in a prompt-sharing row: the prompts' common prefix counted once
                "shared_tokens": [
                    shared_pair_num_tokens(dict(zip(keys, values))) for values in zip(*(b[k] for k in keys))
                ],
            },
            batched=True,
            remove_columns=dataset.column_names,
            desc="Measuring pairs",
        )
        self.pair_tokens = np.asarray(lengths["pair_tokens"], dtype=np.int64)
        self.chosen_answer_tokens = np.asarray(lengths["chosen_answer_tokens"], dtype=np.int64)
        # rows that reach the lm_head (answer labels of both sequences), in every layout
        self.label_tokens = self.chosen_answer_tokens + np.asarray(lengths["rejected_answer_tokens"], dtype=np.int64)
        self.shared_tokens = np.asarray(lengths["shared_tokens"], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.pair_tokens)

    def row_tokens(self, prompt_sharing: bool) -> np.ndarray:
        """Tokens each pair occupies in a packed row: [pairs] (what the planner balances)."""
        return self.shared_tokens if prompt_sharing else self.pair_tokens

    def pairs(self, indices) -> list[dict]:
        rows = self.dataset[[int(i) for i in indices]]
        keys = ("chosen_input_ids", "chosen_prompt_len", "rejected_input_ids", "rejected_prompt_len")
        return [dict(zip(keys, values)) for values in zip(*(rows[k] for k in keys))]


class Trainer:
    """SimPO on DeepSpeed. ``model``/``tokenizer``/datasets may be given as objects (Python API);
    otherwise they are loaded from the config (CLI)."""

    EXPORTS_FINAL = True  # train() ends with output_dir/final/ (save_final) and its push (push_to_hub)

    def __init__(
        self,
        cfg: SimPOConfig,
        model=None,
        tokenizer=None,
        train_dataset=None,
        eval_dataset=None,
        callbacks: tuple[Callable, ...] = (),
    ):
        self.cfg = cfg
        self._model_arg, self.tokenizer = model, tokenizer
        self._train_arg, self._eval_arg = train_dataset, eval_dataset
        # fn(trainer, event, **info) -> None or {"should_training_stop", "should_save"}; TrainerCallback
        # objects are bridged (simpo_ds.callbacks). Events: train_begin, before_optimizer_step, step_end,
        # log, evaluate, save, train_end.
        self.callbacks = split_callbacks(callbacks)
        self.engine = None
        self.step = 0
        self.nonfinite_streak = 0  # consecutive steps with a non-finite loss or gradient norm
        self.skipped_steps = 0
        self.stop_signal: Optional[str] = None  # set by SIGTERM/SIGUSR1 on this rank
        self.stop_agreed = False  # any rank was signalled (known after each step's all-reduce)
        self.preempted = False
        self.where = "setup"  # what this rank is doing, for the message of a collective that times out
        self.call_counter: Optional[CallCounter] = None  # debug_lockstep

    # =========================================================================================
    # setup
    # =========================================================================================
    def setup(self) -> None:
        if self.engine is not None:
            return
        cfg = self.cfg
        self.rank, self.world_size, self.device = ds.init_distributed(cfg.collective_timeout_s)
        if self.world_size % cfg.sequence_parallel_size:
            raise ConfigError(f"config key 'sequence_parallel_size': {cfg.sequence_parallel_size} does not divide "
                              f"the world size {self.world_size}")
        self.sp = sequence_parallel.make_groups(self.world_size, self.rank, cfg.sequence_parallel_size)
        level = logging.INFO if cfg.log_level == "passive" else getattr(logging, cfg.log_level.upper())
        logging.basicConfig(level=level if self.rank == 0 else logging.WARNING, format="%(message)s")
        for key, why in no_effect_keys(cfg).items():
            logger.info("config key '%s' is accepted for recipe compatibility and has no effect: %s", key, why)
        if cfg.push_to_hub:
            hub.check_push(cfg, final_export=self.EXPORTS_FINAL)  # before any data or model work: a missing token is found now, not after training
        if cfg.tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        _seed_everything(cfg.seed)
        self.device_type = ds.device_type()
        cfg.train_batch_size = cfg.resolve_batch_size(self.sp.dp_size)  # per-device batches: data-parallel ranks
        self.reporter = Reporter(cfg.output_dir, self.rank, cfg.report_to, cfg.run_name, cfg.to_dict())
        self.tokenizer = self.tokenizer or _load_tokenizer(cfg)
        if cfg.chat_template:
            self.tokenizer.chat_template = cfg.chat_template
        train_source, eval_source = self._sources()
        self.train_data = self._prepare_split(train_source, "train")
        self.eval_data = self._prepare_split(eval_source, "eval") if eval_source is not None else None
        ds.barrier()  # every rank has its data (a node without the datasets cache tokenizes for minutes)
        self.steps_per_epoch = math.ceil(len(self.train_data) / cfg.train_batch_size)
        self.total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * self.steps_per_epoch)
        self._setup_model()
        if cfg.resume_from_checkpoint:
            self._resume(cfg.resume_from_checkpoint)
        self.start_step = self.step
        logger.info(
            "simpo-ds: %d pairs, %d steps of %d pairs, %d rank(s), attention=%s, dtype=%s, max_length=%d, "
            "max_prompt_length=%d, packing=%s",
            len(self.train_data), self.total_steps, cfg.train_batch_size, self.world_size, self.attn_impl,
            self.dtype, cfg.max_length, cfg.max_prompt_length, cfg.packing,
        )

    def _sources(self) -> tuple:
        """(train, eval) sources: Python API datasets, else ``dataset_mixer`` (loaded lazily, so rank 0
        goes first), else the ``train_data`` / ``eval_data`` specs. Eval is None when there is none or
        ``do_eval: false``."""
        cfg = self.cfg
        if cfg.dataset_mixer:
            train = partial(mixer.mixture_parts, cfg, "train")
            evaluation = partial(mixer.mixture_parts, cfg, "test") if any("test" in s for s in cfg.dataset_splits) else None
        else:
            train = self._train_arg if self._train_arg is not None else cfg.train_data
            evaluation = self._eval_arg if self._eval_arg is not None else cfg.eval_data
        return train, (None if cfg.do_eval is False else evaluation)

    def _prepare_split(self, source, split: str) -> PairData:
        """Load, validate, tokenize. Rank 0 goes first (other ranks then hit the datasets cache)
        and broadcasts its verdict, so bad data stops every rank with rank 0's message."""
        name = source if isinstance(source, str) else "dataset_mixer" if callable(source) else f"{split} dataset"
        error = None
        if self.rank == 0:
            try:
                tokenized, stats, report = self._tokenize_split(source, name)
            except (DataError, FileNotFoundError, ValueError) as err:
                error = f"{type(err).__name__}: {err}"
        error = ds.broadcast_object(error)
        if error is not None:
            raise DataError(error.split(": ", 1)[1])
        if self.rank != 0:
            tokenized, stats, report = self._tokenize_split(source, name)
        self.reporter.log("data", 0, 0.0, {"split_name": split, **stats, "warnings": report.get("warnings", {})})
        if stats["dropped"]:
            logger.warning("%s: dropped %s of %d rows", name, stats["dropped"], stats["rows"])
        return PairData(tokenized)

    def _tokenize_split(self, source, name: str):
        """(tokenized, data record, report): ``simpo_ds.data.load.prepare_pairs``."""
        return prepare_pairs(source, name, self.tokenizer, self.cfg, num_proc=self.cfg.dataset_num_proc)

    def _setup_model(self) -> None:
        cfg = self.cfg
        self.dtype = resolve_dtype(ds.launcher_dtype(cfg.torch_dtype), self.device_type)
        if cfg.prompt_sharing:
            self.attn_impl = choose_shared_attn_implementation(cfg.attn_implementation, self.device_type)
        else:
            self.attn_impl = choose_attn_implementation(cfg.attn_implementation, self.device_type, cfg.packing,
                                                        self.dtype)
        register_attention()
        model_config = _model_config(cfg, self._model_arg)
        self.base_attn_impl = self.attn_impl  # the kernel; under sequence parallelism wrapped by all-to-alls
        if self.sp.size > 1:
            if self.attn_impl not in CU_SEQLENS_IMPLEMENTATIONS:
                raise ConfigError(
                    f"config key 'sequence_parallel_size': {self.sp.size} needs a cu_seqlens attention "
                    f"({', '.join(CU_SEQLENS_IMPLEMENTATIONS)}), not attn_implementation={self.attn_impl!r}: a sliced "
                    "row through sdpa/eager lets its sequences attend to each other")
            try:
                sequence_parallel.check_heads(model_config, self.sp.size)
            except ValueError as err:
                raise ConfigError(f"config key {err}") from None
            self.attn_impl = sequence_parallel.register(self.base_attn_impl)
        self.warmup_steps = math.ceil(cfg.warmup_ratio * self.total_steps)
        self.ds_config = ds.fill_ds_config(cfg.deepspeed, cfg, self.world_size, self.dtype, model_config.hidden_size,
                                           global_batch=cfg.train_batch_size, dp_size=self.sp.dp_size,
                                           total_steps=self.total_steps, warmup_steps=self.warmup_steps)
        logger.info("DeepSpeed: ZeRO-%d from %s", ds.zero_stage(self.ds_config), ds.ds_config_source(cfg.deepspeed))
        self._zero3_context = ds.zero3_init_context(self.ds_config)  # must outlive loading
        if self.sp.size > 1 and not (self._model_arg is None or isinstance(self._model_arg, str)):
            raise ConfigError("config key 'sequence_parallel_size' > 1 needs the model loaded by simpo-ds (pass its "
                              "name or path), so its attention is the sequence-parallel one")
        if self._model_arg is None or isinstance(self._model_arg, str):
            if isinstance(self._model_arg, str):
                cfg.model_name_or_path = self._model_arg
            model = load_model(cfg, self.dtype, self.attn_impl)
        else:
            model = prepare_model(self._model_arg, cfg)
        if cfg.tiled_mlp_tokens:
            tiled = sequence_parallel.tile_mlps(model, cfg.tiled_mlp_tokens)
            if not tiled:
                raise ConfigError("config key 'tiled_mlp_tokens': the model has no gated MLP (gate_proj, up_proj, "
                                  "down_proj) to tile")
            logger.info("tiled MLP: %d MLPs run in tiles of %d tokens", tiled, cfg.tiled_mlp_tokens)
        self.policy = SimPOPolicy(
            model, chunk_size=cfg.logits_chunk_size, attn_kwargs_fn=lambda b: attention_kwargs(b, self.base_attn_impl),
            sequence_parallel=self.sp,
        )
        def scheduler_fn(optimizer):
            from transformers import get_scheduler

            return get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=self.warmup_steps,
                                 num_training_steps=self.total_steps)

        self.engine = ds.build_engine(self.policy, self.ds_config, cfg, scheduler_fn)
        if lockstep_enabled(cfg.debug_lockstep):
            self.call_counter = CallCounter(self.policy, self.device)
        self.flops_shape = flop_shape(self.policy.causal_lm)
        self.peak_tflops = cfg.peak_tflops or detect_peak_tflops(self.device_type)

    # =========================================================================================
    # the loop
    # =========================================================================================
    def train(self) -> dict:
        """Run to ``total_steps``; returns the last train metrics (plus ``train_loss``).

        A collective that fails (times out after ``collective_timeout_s``, or a peer died) raises
        :class:`simpo_ds.engine.CollectiveError` naming this rank and what it was doing."""
        try:
            return self._train()
        except RuntimeError as err:
            if isinstance(err, ds.CollectiveError) or not ds.is_collective_failure(err):
                raise
            raise ds.CollectiveError(
                f"rank {getattr(self, 'rank', '?')} at {self.where}: a collective failed ({str(err).splitlines()[0]}). "
                f"Another rank is stuck, died, or ran a different sequence of collectives; a collective "
                f"waits at most collective_timeout_s={self.cfg.collective_timeout_s}s"
            ) from err

    def _train(self) -> dict:
        self.setup()
        cfg = self.cfg
        if cfg.eval_on_start and self.step == 0 and self.has_eval:
            self.evaluate()
        self.engine.train()  # from_pretrained returns eval mode; gradient checkpointing needs train mode
        window = _Window()
        train_losses = []
        progress = _progress(self.rank, self.total_steps, self.step)
        self._install_signal_handlers()
        self._emit("train_begin")
        evaluated_at = None
        while self.step < self.total_steps:
            metrics = self.train_step(self._step_pairs(self.step))
            self.step += 1
            window.add(metrics)
            train_losses.append(metrics["loss"])
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            # the transformers Trainer's order: on_step_end -> log -> evaluate -> save; a callback's
            # control (should_log / should_evaluate / should_save / should_training_stop) adds to the schedule
            asked = self._agree(self._emit("step_end", metrics=metrics))
            stop = asked["should_training_stop"]
            final_step = self.step == self.total_steps or stop
            if self.step % cfg.logging_steps == 0 or final_step or self.stop_agreed or asked["should_log"]:
                self._log("train", window.flush())
            eval_every = cfg.eval_steps or (cfg.logging_steps if cfg.eval_strategy == "steps" else None)
            if self.has_eval and (final_step or self._due(cfg.eval_strategy, eval_every) or asked["should_evaluate"]):
                self.evaluate()  # the final step's evaluation is the run's final one
                evaluated_at = self.step
            if self.stop_agreed:  # preemption: finish this step, checkpoint, leave (same on all ranks)
                self.save_checkpoint()
                logger.warning("stopped by signal %s after step %d; resume with --resume_from_checkpoint latest",
                               self.stop_signal or "(on another rank)", self.step)
                progress.close()
                self.reporter.close()
                self.preempted = True
                return {**(window.last or {}), "train_loss": float(np.mean(train_losses)), "preempted": True}
            if self._due(cfg.save_strategy, cfg.save_steps) or asked["should_save"] or stop:
                self.save_checkpoint()
            if stop:  # a callback's control.should_training_stop: the normal end, from here
                logger.info("stopped by a callback after step %d", self.step)
                break
        progress.close()
        if self.has_eval and evaluated_at != self.step:  # resumed at the end: nothing ran
            self.evaluate()
        self._final_export()
        self._emit("train_end")
        last = window.last or {}
        return {**last, "train_loss": float(np.mean(train_losses)) if train_losses else float("nan")}

    def _final_export(self) -> None:
        """The end of a run: ``output_dir/final/`` (save_final) and its upload (push_to_hub, rank 0).
        The Python API's ``SimPOTrainer`` leaves both to the script (``save_model``, ``push_to_hub``)."""
        if self.EXPORTS_FINAL and self.cfg.save_final:
            final = Path(self.cfg.output_dir) / FINAL
            self.export(final)
            if self.cfg.push_to_hub and self.rank == 0:
                logger.info("pushed %s to %s", final, hub.push(final, self.cfg.hub_model_id))

    def _log(self, split: str, record: dict, name: Optional[str] = None) -> None:
        """One metrics.jsonl / wandb record at the current step (``eval_name`` for a named eval split),
        and the callbacks' ``log`` event under the transformers Trainer's names."""
        self.reporter.log(split, self.step, self.epoch, {**record, **({"eval_name": name} if name else {})})
        self._emit("log", logs=trainer_log_names(split, record, name, self.epoch))

    def _agree(self, flags: dict) -> dict[str, bool]:
        """{flag: asked by a callback on ANY rank} for each of ``CONTROL_FLAGS``, known to every rank
        (one all-reduce per step, only when there are callbacks: the list is the same on every rank)."""
        if not self.callbacks:
            return dict.fromkeys(CONTROL_FLAGS, False)
        asked = torch.tensor([float(flags.get(k, False)) for k in CONTROL_FLAGS], dtype=torch.float64, device=self.device)
        return {k: v > 0 for k, v in zip(CONTROL_FLAGS, ds.all_reduce_sum(asked).tolist())}

    def _install_signal_handlers(self) -> None:
        """SIGTERM / SIGUSR1 (Slurm's warning before the time limit) ask for a clean stop: the
        current step finishes, all ranks agree through the step's all-reduce, a checkpoint is saved."""

        def request_stop(signum, _frame):
            self.stop_signal = signal.Signals(signum).name

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, request_stop)

    def _due(self, strategy: Optional[str], every: Optional[int]) -> bool:
        """Is a periodic eval/save due after this step? ``strategy`` "no": never; "epoch": at each
        epoch's end; "steps" or None (native keys): every ``every`` steps (0/None: never)."""
        if strategy == "no":
            return False
        if strategy == "epoch":
            return self.step % self.steps_per_epoch == 0
        return bool(every) and self.step % every == 0

    @property
    def has_eval(self) -> bool:
        return self.eval_data is not None

    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch

    def _step_pairs(self, step: int) -> np.ndarray:
        """Dataset indices of the pairs of optimizer step ``step`` (seeded permutation per epoch)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng(self.cfg.seed + epoch).permutation(len(self.train_data))
        return order[k * self.cfg.train_batch_size : (k + 1) * self.cfg.train_batch_size]

    def _micro_batches(self, data: PairData, pair_ids: np.ndarray, what: str):
        """This rank's micro-batches of ``pair_ids`` -> (k, count, MicroBatchPlan, batch, work, once).

        Lock-step across ranks (ZeRO-3, docs/design.md §4-5): the pack plan is computed identically on every
        rank, so every rank runs the same number of micro-batches and, in micro-batch k, the same number
        of lm_head chunks (``batch["num_chunks"]``: the most any rank's micro-batch k needs). With
        sequence parallelism the plan is over the ``world / N`` groups, each rank gets its slice of its
        group's row (simpo_ds.sequence_parallel), and the chunk count is agreed by one all-reduce (a
        slice's label rows depend on where the cut falls). ``work`` (simpo_ds.flops) describes the whole
        row; ``once`` weighs statistics so a group's row is counted once (the micro-batch weight on the
        group's first rank, 0 on the others).
        """
        cfg, sp = self.cfg, self.sp
        plan = plan_step(data.row_tokens(cfg.prompt_sharing)[pair_ids].tolist(), sp.dp_size,
                         cfg.max_tokens_per_microbatch * sp.size)
        label_rows = [[int(data.label_tokens[pair_ids[list(m.pairs)]].sum()) for m in rank_plan] for rank_plan in plan]
        chunks = lockstep_chunk_counts(label_rows, self.policy.chunk_size)
        for k, micro in enumerate(plan[sp.dp_rank]):
            self.where = f"{what}, micro-batch {k + 1}/{len(chunks)}"
            batch = self._collate(data.pairs(pair_ids[list(micro.pairs)]))
            work = batch_work(batch, self.base_attn_impl)
            if sp.size > 1:
                batch = sequence_parallel.slice_row(batch, sp)
                chunks[k] = int(ds.all_reduce_max(num_chunks(len(batch["pred_positions"]), self.policy.chunk_size),
                                                  self.device))
            batch["num_chunks"] = chunks[k]
            if self.call_counter is not None:
                check_equal({"planned lm_head chunks": chunks[k]}, f"{self.where}, before forward", self.device)
            yield k, len(chunks), micro, batch, work, micro.weight * float(sp.rank == 0)

    def _check_lockstep(self, phase: str) -> None:
        """``debug_lockstep``: every rank made the same module calls since the last check."""
        if self.call_counter is not None:
            self.call_counter.check(f"{self.where}, {phase}")

    def train_step(self, pair_ids: np.ndarray) -> dict:
        """One optimizer step over ``pair_ids`` (the whole global batch; this rank runs its share)."""
        cfg, data = self.cfg, self.train_data
        start = time.perf_counter()
        norm = StepNormalizer(len(pair_ids), int(data.chosen_answer_tokens[pair_ids].sum()))
        stats = torch.zeros(len(STAT_NAMES), dtype=torch.float32, device=self.device)
        # the micro-batches' work (simpo_ds.flops.WORK_KEYS), then: stop requested (signal)
        counters = torch.zeros(len(WORK_KEYS) + 1, dtype=torch.float64, device=self.device)
        for k, count, micro, batch, work, once in self._micro_batches(data, pair_ids, f"train step {self.step + 1}"):
            self.engine.set_gradient_accumulation_boundary(k == count - 1)
            seq = self.engine(batch)
            loss, micro_stats = microbatch_loss(
                seq, batch["chosen_seq"], batch["rejected_seq"], norm, weight=micro.weight, **self._loss_kwargs()
            )
            self._check_lockstep("forward")
            self.engine.backward(loss * self.world_size)  # DeepSpeed averages gradients over ranks
            self._check_lockstep("backward")
            stats += micro_stats * float(self.sp.rank == 0)  # a group's row counts once
            counters[:-1] += once * torch.tensor([work[key] for key in WORK_KEYS], dtype=torch.float64, device=self.device)
        self.where = f"train step {self.step + 1}, optimizer step"
        self._emit("before_optimizer_step", pair_ids=pair_ids)
        self.engine.step()
        self.where = f"train step {self.step + 1}, metrics all-reduce"
        counters[-1] = float(self.stop_signal is not None)
        ds.all_reduce_sum(stats)
        ds.all_reduce_sum(counters)  # one collective: every rank learns whether any rank was signalled
        elapsed = ds.all_reduce_max(time.perf_counter() - start, self.device)
        *totals, stop = counters.tolist()
        self.stop_agreed = stop > 0
        metrics = finalize_metrics(stats, cfg.sft_weight)
        metrics.update(self._system_metrics(dict(zip(WORK_KEYS, totals)), elapsed))
        self._check_finite(metrics, pair_ids)
        return metrics

    def _check_finite(self, metrics: dict, pair_ids: np.ndarray) -> None:
        """A non-finite gradient norm makes DeepSpeed (ZeRO-2/3, fp32/bf16/fp16) skip the update on
        every rank alike (the norm is global). Count it, record the step's pairs, and abort after
        ``max_nonfinite_steps`` consecutive skips. All ranks see the same reduced numbers."""
        applied = self.engine.was_step_applied()
        finite = math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
        metrics["skipped"] = float(not applied)
        if applied and finite:
            self.nonfinite_streak = 0
            return
        self.nonfinite_streak += 1
        self.skipped_steps += int(not applied)
        path = Path(self.cfg.output_dir) / "nonfinite_steps.jsonl"
        if self.rank == 0:
            with open(path, "a") as f:
                record = {"step": self.step + 1, "loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                          "update_applied": applied, "pair_ids": [int(i) for i in pair_ids]}
                f.write(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                    for k, v in record.items()}) + "\n")
        logger.warning("step %d: non-finite loss/grad norm (loss=%s, grad_norm=%s); update %s; pairs in %s",
                       self.step + 1, metrics["loss"], metrics["grad_norm"],
                       "applied" if applied else "skipped", path)
        if self.nonfinite_streak >= self.cfg.max_nonfinite_steps:
            raise NonFiniteError(
                f"{self.nonfinite_streak} consecutive non-finite steps (last: step {self.step + 1}); "
                f"the pairs of each are listed in {path}"
            )

    def _loss_kwargs(self) -> dict:
        cfg = self.cfg
        return dict(
            beta=cfg.beta,
            gamma_beta_ratio=cfg.gamma_beta_ratio,
            loss_type=cfg.loss_type,
            label_smoothing=cfg.label_smoothing,
            sft_weight=cfg.sft_weight,
        )

    def _collate(self, pairs: list[dict]) -> dict:
        cfg = self.cfg
        if cfg.prompt_sharing:  # one [prompt | chosen | rejected] segment per pair (takes precedence over packing)
            batch = collate_shared(pairs, cfg.label_pad_token_id)
        elif cfg.packing:
            batch = collate_packed(pairs, cfg.label_pad_token_id)
        else:
            batch = collate_padded(pairs, self._pad_id(), cfg.label_pad_token_id)
        if self.sp.size > 1:  # the whole row on every rank of the group; the trainer then takes its slice
            batch = batch_to_device(sequence_parallel.pad_row(batch, self.sp.size, self._pad_id()), self.device)
            batch["attention_kwargs"] = attention_kwargs(batch, self.base_attn_impl)  # global cu_seqlens
            return batch
        return batch_to_device(batch, self.device)

    def _pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def _system_metrics(self, work: dict, elapsed: float) -> dict:
        """Step-level system metrics from the summed micro-batch work of all ranks (simpo_ds.flops)."""
        needed = training_flops(self.flops_shape, work["real"], work["head_rows"], work["pairs_needed"])
        computed = training_flops(self.flops_shape, work["processed"], work["head_rows"], work["pairs_computed"])
        per_device = max(elapsed, 1e-9) * self.world_size * 1e12
        out = {
            "lr": float(self.engine.get_lr()[0]),
            "grad_norm": ds.global_grad_norm(self.engine),
            "tokens/real": work["real"],
            "tokens/effective": work["effective"],
            "tokens/padded": work["processed"],
            "pack_efficiency": work["real"] / max(work["processed"], 1.0),
            "tokens_per_s": work["real"] / max(elapsed, 1e-9),
            "tflops_per_device": needed / per_device,
            "tflops_computed_per_device": computed / per_device,
            "step_time_s": elapsed,
            "mem/peak_gb": peak_memory_gb(self.device_type),
        }
        if self.peak_tflops:
            out["mfu"] = out["tflops_per_device"] / self.peak_tflops
        return out

    # =========================================================================================
    # evaluation
    # =========================================================================================
    @torch.no_grad()
    def evaluate(self, data: Optional[PairData] = None, name: Optional[str] = None) -> dict:
        """Metrics over a whole eval split (default: the configured one; same packed path), logged
        at the current step as split "eval" (with ``eval_name`` when several splits are named)."""
        data = data if data is not None else self.eval_data
        self.engine.eval()
        stats = torch.zeros(len(STAT_NAMES), dtype=torch.float32, device=self.device)
        everything = np.arange(len(data))
        for start in range(0, len(data), self.cfg.train_batch_size):
            chunk = everything[start : start + self.cfg.train_batch_size]
            what = f"eval at step {self.step}, pairs {start}-{start + len(chunk) - 1}"
            for _, _, micro, batch, _, once in self._micro_batches(data, chunk, what):
                seq = self.engine(batch)
                _, micro_stats = microbatch_loss(
                    seq, batch["chosen_seq"], batch["rejected_seq"], StepNormalizer(1, 1), weight=once,
                    **self._loss_kwargs()
                )
                self._check_lockstep("forward")
                stats += micro_stats
        self.where = f"eval at step {self.step}, metrics all-reduce"
        ds.all_reduce_sum(stats)
        self.engine.train()
        metrics = finalize_metrics(stats, self.cfg.sft_weight)
        self._log("eval", metrics, name)
        self._emit("evaluate", metrics=trainer_log_names("eval", metrics, name, self.epoch))
        return metrics

    # =========================================================================================
    # checkpoints and export
    # =========================================================================================
    def save_checkpoint(self) -> Path:
        self.where = f"checkpoint save after step {self.step}"
        client_state = {
            "step": self.step,
            "world_size": self.world_size,
            "config": self.cfg.to_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        }
        path = ds.save_checkpoint(
            self.engine, Path(self.cfg.output_dir) / CHECKPOINTS, self.step, client_state, self.cfg.save_total_limit,
            marker={"train_batch_size": self.cfg.train_batch_size},
        )
        logger.info("saved checkpoint %s", path)
        self._emit("save", path=path)
        return path

    def _resume(self, which: str) -> None:
        """``which``: latest | auto (latest if there is one, else start fresh: requeued jobs) | PATH.
        A checkpoint saved by another number of ranks is converted (universal) and loaded."""
        path = ds.resolve_checkpoint(Path(self.cfg.output_dir) / CHECKPOINTS, which)
        if path is None:
            logger.info("resume_from_checkpoint=%s: no checkpoint yet, starting from step 0", which)
            return
        saved_batch = ds.checkpoint_marker(path).get("train_batch_size", self.cfg.train_batch_size)
        if saved_batch != self.cfg.train_batch_size:  # the data position is the step number
            raise ConfigError(
                f"checkpoint {path} was trained with train_batch_size={saved_batch} (pairs per step, global); "
                f"this run has {self.cfg.train_batch_size}: pass --train_batch_size {saved_batch} to resume it"
            )
        client_state = ds.load_checkpoint(self.engine, path)
        self.step = int(client_state["step"])
        rng = client_state.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])
        logger.info("resumed from %s at step %d", path, self.step)
        ds.start_branch(Path(self.cfg.output_dir) / CHECKPOINTS, self.step)  # a rollback moves later ones aside
        saved_sp = client_state.get("config", {}).get("sequence_parallel_size", 1)
        if saved_sp != self.sp.size:  # allowed: a step's loss is the mean over its pairs however rows are split
            logger.info("the checkpoint trained with sequence_parallel_size=%d, this run uses %d", saved_sp, self.sp.size)

    def export(self, out_dir: Path) -> None:
        """``out_dir``: safetensors + tokenizer loadable by plain transformers (all ranks call)."""
        self.where = f"export to {out_dir}"
        state_dict = ds.consolidated_state_dict(self.engine)
        if self.rank == 0:
            export_pretrained(self.policy.model, state_dict, self.tokenizer, out_dir, self.cfg)
            logger.info("exported model to %s", out_dir)
        ds.barrier()

    def _emit(self, event: str, **info) -> dict:
        """Call every callback ``fn(self, event, **info)``; returns the flags they asked for (any)."""
        flags: dict = {}
        for callback in self.callbacks:
            asked = callback(self, event, **info)
            for key, value in (asked or {}).items():
                flags[key] = flags.get(key, False) or bool(value)
        return flags


# =============================================================================================
# helpers
# =============================================================================================
class _Window:
    """Averages train metrics over the steps since the last record (pair-weighted means are
    close to plain means as every step has the same pair count but the last)."""

    def __init__(self):
        self.rows: list[dict] = []
        self.last: Optional[dict] = None

    def add(self, metrics: dict) -> None:
        self.rows.append(metrics)
        self.last = metrics

    def flush(self) -> dict:
        keys = self.rows[-1].keys()
        out = {k: float(np.mean([r[k] for r in self.rows if k in r])) for k in keys}
        out["lr"] = self.rows[-1]["lr"]
        self.rows = []
        return out


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _load_tokenizer(cfg: SimPOConfig):
    from transformers import AutoTokenizer

    name = cfg.tokenizer_name_or_path or cfg.model_name_or_path
    kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file and not cfg.tokenizer_name_or_path else {}
    tokenizer = AutoTokenizer.from_pretrained(name, revision=cfg.model_revision, trust_remote_code=cfg.trust_remote_code,
                                              **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _model_config(cfg: SimPOConfig, model_arg):
    if model_arg is not None and not isinstance(model_arg, str):
        return model_arg.config
    from transformers import AutoConfig

    name = model_arg if isinstance(model_arg, str) else cfg.model_name_or_path
    kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    return AutoConfig.from_pretrained(name, revision=cfg.model_revision, trust_remote_code=cfg.trust_remote_code, **kwargs)


def _progress(rank: int, total: int, initial: int):
    if rank != 0:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="simpo", dynamic_ncols=True)


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass
