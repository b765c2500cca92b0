"""Reference-style journeys in one process (tests/test_journeys.py reads what this writes).

    python tests/journeys_worker.py ASSETS_JSON OUT_DIR

One ``python`` process (no launcher, world size 1) runs, in order, the way a user coming from the
reference SimPO script / the transformers Trainer does it:

A. ``SimPOTrainer`` with the DeepSpeed ZeRO-3 JSON of the transformers docs (every "auto", optimizer
   and scheduler blocks, CPU offload), a named eval set, ``push_to_hub: true`` against a local
   stand-in for the hub API, and a ``TrainerCallback`` recording hook order and payloads (it asks
   for an extra log and evaluation at step 1 through ``control``); then the reference script's last
   lines verbatim (``save_model(output_dir)``, model card, ``push_to_hub(**kwargs)``).
B. A rollback: a new run resumed from an earlier checkpoint while a later one exists.
C. A preemption seen from the Python API: SIGUSR1 during training; the script's lines after
   ``train()`` must not run (this process then exits with code 3).
"""

import json
import os
import shutil
import signal
import sys
import traceback
from pathlib import Path

from transformers import TrainerCallback

from simpo_ds import SimPOConfig, SimPOTrainer
from simpo_ds.data.load import load_pairs

# The ZeRO-3 + offload example of the transformers DeepSpeed docs, as users copy it.
TRANSFORMERS_DOCS_ZERO3 = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                 "warmup_num_steps": "auto"}},
    "zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "offload_param": {"device": "cpu", "pin_memory": True}, "overlap_comm": True, "contiguous_gradients": True,
        "sub_group_size": 1e9, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True},
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "steps_per_print": 2000,
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "wall_clock_breakdown": False,
}


def install_hub_standin(store: Path) -> None:
    """``HfApi.create_repo`` / ``upload_folder`` answered locally: each upload is copied to
    ``store/<n>/`` through huggingface_hub's own ignore-pattern filter, and described in pushes.json."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    pushes = []

    def create_repo(self, repo_id, **kwargs):
        return f"https://hub.local/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, ignore_patterns=None, **kwargs):
        folder = Path(folder_path)
        files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
        kept = sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns))
        target = store / str(len(pushes))
        for name in kept:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / name, target / name)
        pushes.append({"repo_id": repo_id, "message": commit_message, "files": kept})
        (store / "pushes.json").write_text(json.dumps(pushes))
        return f"https://hub.local/{repo_id}/commit/{len(pushes)}"

    store.mkdir(parents=True, exist_ok=True)
    huggingface_hub.HfApi.create_repo = create_repo
    huggingface_hub.HfApi.upload_folder = upload_folder
    os.environ["HF_TOKEN"] = "hf_standin"


class Recorder(TrainerCallback):
    """Hooks in order, with the payload keys; asks for a log and an evaluation after step 1."""

    def __init__(self):
        self.events = []

    def on_step_end(self, args, state, control, **kwargs):
        self.events.append(["on_step_end", state.global_step])
        if state.global_step == 1:
            control.should_log = control.should_evaluate = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.events.append(["on_log", state.global_step, sorted(logs)])

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.events.append(["on_evaluate", state.global_step, sorted(metrics)])

    def on_save(self, args, state, control, **kwargs):
        self.events.append(["on_save", state.global_step])


class SignalAtStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # what Slurm sends before the time limit


def common(assets: dict, out: Path, **kw) -> SimPOConfig:
    return SimPOConfig(model_name_or_path=assets["model"], output_dir=str(out), train_batch_size=8, max_length=128,
                       max_prompt_length=64, learning_rate=1e-3, seed=0, **kw)  # save_final left on: the API must not export final/


def journey_reference(assets: dict, out: Path, ds_json: Path) -> None:
    args = common(assets, out / "run", deepspeed=str(ds_json), max_steps=4, logging_steps=2, save_steps=2,
                  save_total_limit=2, push_to_hub=True, hub_model_id="me/simpo-tiny")
    recorder = Recorder()
    trainer = SimPOTrainer(model=args.model_name_or_path, args=args, train_dataset=load_pairs(assets["train"]),
                           eval_dataset={"uf": load_pairs(assets["eval"])}, callbacks=[recorder])
    train_result = trainer.train()
    metrics = train_result.metrics
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    trainer.save_model(args.output_dir)
    kwargs = {"finetuned_from": args.model_name_or_path, "dataset": ["uf"], "tags": ["alignment-handbook"]}
    if trainer.accelerator.is_main_process:
        trainer.create_model_card(**kwargs)
        trainer.model.config.use_cache = True
        trainer.model.config.save_pretrained(args.output_dir)
    trainer.push_to_hub(**kwargs)
    (out / "reference.json").write_text(json.dumps({"events": recorder.events, "ds_config": trainer.ds_config}))


def journey_rollback(assets: dict, out: Path) -> None:
    """Resume from step_2 while step_4 exists (after journey A), saving every step, keeping 1."""
    run = out / "run"
    args = common(assets, run, deepspeed="ds_configs/zero3.json", max_steps=3, save_steps=1, save_total_limit=1,
                  resume_from_checkpoint=str(run / "checkpoints" / "step_2"))
    SimPOTrainer(model=args.model_name_or_path, args=args, train_dataset=load_pairs(assets["train"])).train()
    (out / "rollback.json").write_text(json.dumps({"done": True}))


def journey_preempted(assets: dict, out: Path) -> None:
    args = common(assets, out / "preempted", deepspeed="ds_configs/zero3.json", max_steps=6)
    trainer = SimPOTrainer(model=args.model_name_or_path, args=args, train_dataset=load_pairs(assets["train"]),
                           callbacks=[SignalAtStep()])
    trainer.train()  # raises TrainingPreempted: exit code 3, nothing below runs
    trainer.save_model(args.output_dir)
    (out / "preempted" / "exported_after_train").write_text("the script went on after a preempted train()")


def main(assets_json: str, out: str) -> None:
    assets, out = json.loads(Path(assets_json).read_text()), Path(out)
    ds_json = out / "transformers_docs_zero3.json"
    ds_json.write_text(json.dumps(TRANSFORMERS_DOCS_ZERO3))
    install_hub_standin(out / "hub")
    for name, journey in (("reference", lambda: journey_reference(assets, out, ds_json)),
                          ("rollback", lambda: journey_rollback(assets, out))):
        try:  # a failed journey is reported by its own test; the next ones still run
            journey()
        except Exception:
            (out / f"{name}.error").write_text(traceback.format_exc())
    journey_preempted(assets, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
