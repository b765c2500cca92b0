"""Run the real Trainer (under a launcher) and dump what the tests compare.

    deepspeed --num_gpus 2 tests/dist_worker.py [--dump grads.pt] [--dump_logits logits.pt] [--key value ...]

--dump: {"grads": {name: tensor}, "params": {name: tensor} (LoRA runs: the adapters' initial values),
"pair_ids": [...]} gathered between the first step's backward and
its optimizer step (ZeRO-3: every rank joins the gather). --dump_logits: the trained engine's logits
on fixed input ids after training (every rank runs the forward; rank 0 writes).
"""

import os
import sys
import time

import torch

from simpo_ds import engine as ds
from simpo_ds.cli import _split_args
from simpo_ds.config import load_config
from simpo_ds.trainer import Trainer

PROBE_IDS = torch.arange(6, 30).remainder(60)[None] + 6  # word ids of tests/run_assets.py


def pop_flag(argv: list[str], flag: str):
    if flag not in argv:
        return None
    i = argv.index(flag)
    value = argv[i + 1]
    del argv[i : i + 2]
    return value


def inject_nan(trainer) -> None:
    """SIMPO_TEST_NAN_STEPS="2,3" SIMPO_TEST_NAN_RANK=1: the first decoder layer of that rank returns
    NaN during those (1-based) optimizer steps — a fault on one rank only."""
    steps = os.environ.get("SIMPO_TEST_NAN_STEPS")
    if not steps:
        return
    steps = {int(s) for s in steps.split(",")}
    rank = int(os.environ.get("SIMPO_TEST_NAN_RANK", "0"))
    trainer.setup()

    def hook(module, inputs, output):
        if trainer.rank == rank and trainer.step + 1 in steps and module.training:
            if isinstance(output, tuple):
                return (output[0] * float("nan"),) + output[1:]
            return output * float("nan")
        return None

    trainer.policy.causal_lm.get_decoder().layers[0].register_forward_hook(hook)


def local_chunk_counts() -> None:
    """SIMPO_TEST_LOCAL_CHUNKS=1: each rank runs the lm_head chunks ITS OWN rows need, as before the
    fix of issue 15 — ranks whose micro-batches hold different answer lengths then fall out of lock-step."""
    if os.environ.get("SIMPO_TEST_LOCAL_CHUNKS") != "1":
        return
    import torch.distributed as dist

    from simpo_ds import loss, trainer

    trainer.lockstep_chunk_counts = lambda rows, size: [loss.num_chunks(r, size) for r in rows[dist.get_rank()]]


def trainable_params(engine) -> dict:
    """Full values of the trainable parameters (LoRA adapters: their random init is what the
    reference needs); collective under ZeRO-3."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).detach().cpu().clone()
            for n, p in engine.module.named_parameters() if p.requires_grad}


def main(argv):
    dump, dump_logits = pop_flag(argv, "--dump"), pop_flag(argv, "--dump_logits")
    recipe, overrides = _split_args(argv)
    cfg = load_config(recipe, overrides)

    hang_rank = os.environ.get("SIMPO_TEST_HANG_RANK")

    def on_event(trainer, event, pair_ids=None, **_):
        if hang_rank is not None and event == "before_optimizer_step" and trainer.rank == int(hang_rank):
            time.sleep(3600)  # a stuck rank: the others must time out in their next collective
        if dump and event == "before_optimizer_step" and trainer.step == trainer.start_step:
            grads = ds.full_gradients(trainer.engine)
            params = trainable_params(trainer.engine) if trainer.cfg.use_peft else {}
            if trainer.rank == 0:
                grads = {k.removeprefix("model."): v for k, v in grads.items()}
                params = {k.removeprefix("model."): v for k, v in params.items()}
                torch.save({"grads": grads, "params": params, "pair_ids": [int(i) for i in pair_ids]}, dump)

    local_chunk_counts()
    trainer = Trainer(cfg, callbacks=[on_event])
    inject_nan(trainer)
    trainer.train()
    if dump_logits:
        with torch.no_grad():
            trainer.engine.eval()
            logits = trainer.policy.model(input_ids=PROBE_IDS.to(trainer.device), use_cache=False).logits
        if trainer.rank == 0:
            torch.save(logits.float().cpu(), dump_logits)
    ds.shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
