"""A reference-style script with a ``transformers.TrainerCallback`` (tests/test_api.py).

    deepspeed --num_gpus 2 tests/callback_worker.py --key value ...     # output_dir/events/ gets the record

The callback stops training at step 2 (``control.should_training_stop``) and writes, per rank,
output_dir/events/rank_N.json: the hooks called in order, every ``on_log`` payload, and the state it saw.
"""

import json
import sys
from pathlib import Path

from transformers import TrainerCallback

from simpo_ds import SimPOTrainer
from simpo_ds.cli import _split_args
from simpo_ds.config import load_config
from simpo_ds.data.load import load_pairs
from simpo_ds.engine import shutdown_distributed


class StopAtTwo(TrainerCallback):
    def __init__(self, out: Path):
        self.out, self.events, self.logs = out, [], []

    def on_train_begin(self, args, state, control, **kwargs):
        self.events.append(["train_begin", state.global_step, state.max_steps])

    def on_step_end(self, args, state, control, **kwargs):
        self.events.append(["step_end", state.global_step])
        if state.global_step == 2:
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append({"step": state.global_step, **logs})

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.events.append(["evaluate", state.global_step, sorted(metrics)[:2]])

    def on_save(self, args, state, control, **kwargs):
        self.events.append(["save", state.global_step])

    def on_train_end(self, args, state, control, **kwargs):
        self.events.append(["train_end", state.global_step])
        rank = 0 if state.is_world_process_zero else 1
        history = [{k: v for k, v in r.items()} for r in state.log_history]
        (self.out / f"rank_{rank}.json").write_text(json.dumps({"events": self.events, "logs": self.logs,
                                                                 "log_history": history}))


def main(argv):
    recipe, overrides = _split_args(argv)
    args = load_config(recipe, overrides)
    out = Path(args.output_dir) / "events"
    out.mkdir(parents=True, exist_ok=True)
    trainer = SimPOTrainer(model=args.model_name_or_path, args=args, train_dataset=load_pairs(args.train_data),
                           eval_dataset=load_pairs(args.eval_data), callbacks=[StopAtTwo(out)])
    trainer.train()
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
