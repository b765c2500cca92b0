#!/usr/bin/env python
"""The reference SimPO script (scripts/run_simpo.py) ported to simpo-ds by changing the imports.

    deepspeed --num_gpus 2 examples/reference_style.py --config recipe.yaml [--key value ...]

1. parse the config, 2. load the datasets, 3. build the tokenizer, 4. LoRA config when asked,
5. SimPOTrainer(model=name, ...), 6. train(), 7. save_model(output_dir) and the model card,
8. evaluate(), 9. push_to_hub() — the reference's own last lines.
"""

import sys

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

    # 6-9. the reference script's last lines, verbatim: train, metrics, save, model card, evaluate, push
    train_result = trainer.train()  # a preempted run raises TrainingPreempted here (exit 3, checkpoint saved)
    metrics = train_result.metrics
    metrics["train_samples"] = len(train_dataset)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    trainer.save_model(training_args.output_dir)  # model files only: checkpoints/ and metrics.jsonl stay

    kwargs = {"finetuned_from": training_args.model_name_or_path, "dataset": [training_args.train_data],
              "tags": ["alignment-handbook"]}
    if trainer.accelerator.is_main_process:
        trainer.create_model_card(**kwargs)
        trainer.model.config.use_cache = True
        trainer.model.config.save_pretrained(training_args.output_dir)

    if eval_dataset is not None:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    if training_args.push_to_hub is True:
        trainer.push_to_hub(**kwargs)
    shutdown_distributed()  # destroy the process groups before exit (a gloo teardown can abort otherwise)


if __name__ == "__main__":
    main(sys.argv[1:])
