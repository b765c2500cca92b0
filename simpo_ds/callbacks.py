"""``transformers.TrainerCallback`` objects on the simpo-ds loop.

The loop emits events to plain callables ``fn(trainer, event, **info)``; a callable may return
``{flag: bool}`` for the flags of ``CONTROL_FLAGS`` (TrainerControl's should_training_stop,
should_save, should_evaluate, should_log), which the loop agrees on across ranks (any rank asking is
enough, so every rank stops, saves, evaluates or logs alike). :class:`TrainerCallbackBridge` is such a
callable: it keeps a ``TrainerState`` / ``TrainerControl`` and calls the HF hooks::

    train_begin -> on_train_begin     step_end -> on_step_end     log -> on_log(logs=...)
    evaluate -> on_evaluate(metrics=...)   save -> on_save         train_end -> on_train_end

in the transformers Trainer's order after a step (on_step_end, on_log, on_evaluate, on_save), with its
metric names (``learning_rate``, ``eval_loss`` / ``eval_{set}_loss``, ``epoch``: :func:`trainer_log_names`).

``state.global_step``, ``state.max_steps``, ``state.epoch`` and ``state.log_history`` (every logged
record with its ``step``, train and eval) are kept as the HF Trainer keeps them; ``args`` is the
run's :class:`simpo_ds.config.SimPOConfig` (TrainingArguments names where the concept exists).
"""

from __future__ import annotations

# What a callback may ask for after a step (TrainerControl's names), agreed over ranks by the loop.
CONTROL_FLAGS = ("should_training_stop", "should_save", "should_evaluate", "should_log")


class TrainerCallbackBridge:
    """Adapts a list of ``TrainerCallback`` objects to one simpo-ds callable."""

    def __init__(self, callbacks: list):
        from transformers import TrainerControl, TrainerState

        self.callbacks = list(callbacks)
        self.state = TrainerState()
        self.control = TrainerControl()

    def _call(self, hook: str, trainer, **kwargs) -> None:
        for callback in self.callbacks:
            result = getattr(callback, hook)(trainer.cfg, self.state, self.control, model=trainer.policy.causal_lm,
                                             processing_class=trainer.tokenizer, tokenizer=trainer.tokenizer,
                                             optimizer=trainer.engine.optimizer, lr_scheduler=trainer.engine.lr_scheduler,
                                             **kwargs)
            if result is not None:
                self.control = result

    def __call__(self, trainer, event: str, **info):
        state = self.state
        state.global_step, state.max_steps = trainer.step, trainer.total_steps
        state.epoch = trainer.epoch
        state.num_train_epochs = trainer.cfg.num_train_epochs
        state.is_world_process_zero = state.is_local_process_zero = trainer.rank == 0
        if event == "train_begin":
            state.train_batch_size = trainer.cfg.train_batch_size
            self._call("on_train_begin", trainer)
        elif event == "step_end":  # what a callback sets here adds to the step's schedule (log, evaluate, save, stop)
            control = self.control
            control.should_log = control.should_evaluate = control.should_save = False  # per step, as in transformers
            self._call("on_step_end", trainer)
            return {flag: bool(getattr(self.control, flag)) for flag in CONTROL_FLAGS}
        elif event == "log":
            state.log_history.append({**info["logs"], "step": trainer.step})
            self._call("on_log", trainer, logs=info["logs"])
        elif event == "evaluate":
            self._call("on_evaluate", trainer, metrics=info["metrics"])
        elif event == "save":
            self._call("on_save", trainer)
        elif event == "train_end":
            self._call("on_train_end", trainer)
        return None


def trainer_log_names(split: str, record: dict, name: str | None, epoch: float) -> dict:
    """A metrics record as the transformers Trainer hands it to ``on_log`` / ``on_evaluate``:
    ``learning_rate`` for ``lr``, eval metrics as ``eval_{metric}`` (``eval_{name}_{metric}`` for a
    named eval set, as ``Trainer.evaluate`` with a dict of eval datasets), and ``epoch``.

    >>> trainer_log_names("eval", {"loss": 0.6}, "uf", 1.0)
    {'eval_uf_loss': 0.6, 'epoch': 1.0}
    """
    if split == "eval":
        prefix = f"eval_{name}_" if name else "eval_"
        out = {f"{prefix}{k}": v for k, v in record.items()}
    else:
        out = {("learning_rate" if k == "lr" else k): v for k, v in record.items()}
    return {**out, "epoch": epoch}


def split_callbacks(callbacks) -> list:
    """Plain callables stay; ``TrainerCallback`` objects (or their classes) share one bridge."""
    from transformers import TrainerCallback

    plain, hf = [], []
    for callback in callbacks or ():
        if isinstance(callback, type) and issubclass(callback, TrainerCallback):
            callback = callback()
        if isinstance(callback, TrainerCallback):
            hf.append(callback)
        elif callable(callback):
            plain.append(callback)
        else:
            raise ValueError(f"callback {callback!r}: expected a transformers.TrainerCallback or a callable "
                             "fn(trainer, event, **info)")
    return plain + ([TrainerCallbackBridge(hf)] if hf else [])
