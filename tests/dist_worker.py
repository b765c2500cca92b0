"""Run the real Trainer (under a launcher) and dump the first step's full gradients.

    deepspeed --num_gpus 2 tests/dist_worker.py --dump grads.pt [--key value ...]

The dump (rank 0) holds {"grads": {name: tensor}, "pair_ids": [...]} gathered between the first
step's backward and its optimizer step (ZeRO-3: every rank joins the gather).
"""

import sys

import torch

from simpo_ds import engine as ds
from simpo_ds.cli import _split_args
from simpo_ds.config import load_config
from simpo_ds.trainer import Trainer


def main(argv):
    dump = argv[argv.index("--dump") + 1]
    argv = argv[: argv.index("--dump")] + argv[argv.index("--dump") + 2 :]
    recipe, overrides = _split_args(argv)
    cfg = load_config(recipe, overrides)

    def on_event(trainer, event, pair_ids=None, **_):
        if event == "before_optimizer_step" and trainer.step == trainer.start_step:
            grads = ds.full_gradients(trainer.engine)
            if trainer.rank == 0:
                grads = {k.removeprefix("model."): v for k, v in grads.items()}
                torch.save({"grads": grads, "pair_ids": [int(i) for i in pair_ids]}, dump)

    Trainer(cfg, callbacks=[on_event]).train()


if __name__ == "__main__":
    main(sys.argv[1:])
