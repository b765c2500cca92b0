#!/usr/bin/env python
"""The reference SimPO script (scripts/run_simpo.py) ported to simpo-ds by changing the imports.

    deepspeed --num_gpus 2 examples/reference_style.py --config recipe.yaml [--key value ...]

1. parse the config, 2. load the datasets, 3. build the tokenizer, 4. LoRA config when asked,
5. SimPOTrainer(model=name, ...), 6. train(), 7. evaluate(), 8. save_model().
"""

import json
import sys
from pathlib import Path

from transformers import AutoTokenizer

from simpo_ds import SimPOTrainer
from simpo_ds.cli import _split_args
from simpo_ds.config import load_config
from simpo_ds.data.load import load_pairs
from simpo_ds.engine import shutdown_distributed


def main(argv):
    # 1. config: defaults <- YAML <- --key value (the reference uses H4ArgumentParser the same way)
    recipe, overrides = _split_args(argv)
    training_args = load_config(recipe, overrides)

    # 2. datasets with prompt/chosen/rejected (strings) or chosen/rejected (message lists)
    train_dataset = load_pairs(training_args.train_data)
    eval_dataset = load_pairs(training_args.eval_data) if training_args.eval_data else None

    # 3. tokenizer
    tokenizer = AutoTokenizer.from_pretrained(training_args.model_name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    # 4. LoRA (the reference passes get_peft_config(model_args))
    peft_config = None
    if training_args.use_peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=training_args.lora_r, lora_alpha=training_args.lora_alpha,
                                 target_modules=training_args.lora_target_modules, task_type="CAUSAL_LM")

    # 5. the trainer: a model NAME is loaded lazily inside (under zero.Init for ZeRO-3)
    trainer = SimPOTrainer(
        model=training_args.model_name_or_path,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        tokenizer=tokenizer,
        peft_config=peft_config,
    )

    # 6-8. train, evaluate, save
    train_result = trainer.train()
    eval_metrics = trainer.evaluate() if eval_dataset is not None else {}
    trainer.save_model(str(Path(training_args.output_dir) / "final"))
    if trainer.rank == 0:
        print(f"Training loss: {train_result.training_loss:.4f} after {train_result.global_step} steps")
        results = {"global_step": train_result.global_step, **train_result.metrics, **eval_metrics}
        Path(training_args.output_dir, "all_results.json").write_text(json.dumps(results, indent=1))
    shutdown_distributed()  # destroy the process groups before exit (a gloo teardown can abort otherwise)


if __name__ == "__main__":
    main(sys.argv[1:])
