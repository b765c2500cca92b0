"""``transformers.TrainerCallback`` objects on the simpo-ds loop.

The loop emits events to plain callables ``fn(trainer, event, **info)``; a callable may return
``{"should_training_stop": bool, "should_save": bool}``, which the loop agrees on across ranks (any
rank asking is enough, so every rank stops or saves alike). :class:`TrainerCallbackBridge` is such a
callable: it keeps a ``TrainerState`` / ``TrainerControl`` and calls the HF hooks::

    train_begin -> on_train_begin     step_end -> on_step_end     log -> on_log(logs=...)
    evaluate -> on_evaluate(metrics=...)   save -> on_save         train_end -> on_train_end

``state.global_step``, ``state.max_steps``, ``state.epoch`` and ``state.log_history`` (every logged
record with its ``step``, train and eval) are kept as the HF Trainer keeps them; ``args`` is the
run's :class:`simpo_ds.config.SimPOConfig` (TrainingArguments names where the concept exists).
"""

from __future__ import annotations


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
        elif event == "step_end":
            self.control.should_save = False
            self._call("on_step_end", trainer)
            return {"should_training_stop": self.control.should_training_stop, "should_save": self.control.should_save}
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
