"""Command line: ``simpo-ds train|plot|stats|generate|score|binarize ...``.

``simpo-ds train`` is launch/train.py; ``simpo-ds plot OUTPUT_DIR`` draws metrics.jsonl as PNGs and a
report.md; ``simpo-ds stats DATASET --tokenizer DIR`` prints length / truncation / packing statistics;
``generate`` / ``score`` / ``binarize`` build on-policy preference data (``simpo_ds.onpolicy``).
"""

from __future__ import annotations

import sys

from simpo_ds.config import ConfigError, load_config

# Exit codes of `simpo-ds train` / launch/train.py (0: finished).
EXIT_BAD_INPUT = 2  # bad config or data: the message names the key, file, row or column
EXIT_PREEMPTED = 3  # stopped by SIGTERM/SIGUSR1 after saving a checkpoint: requeue and resume
EXIT_NONFINITE = 4  # too many consecutive non-finite steps (the pairs are in nonfinite_steps.jsonl)
EXIT_CHECKPOINT = 5  # a checkpoint could not be written (disk full...) or the one to resume is damaged
EXIT_COLLECTIVE = 6  # a collective timed out or a peer died: the message names this rank and its step


def _split_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """Pull the recipe out of argv — ``--config FILE``, or the reference's positional form
    ``RECIPE.yaml`` as the first argument (``run_simpo.py recipe.yaml --key=value``); the rest are
    ``--key value`` / ``--key=value`` overrides.

    ``--local_rank`` (added by the deepspeed launcher) is ignored: LOCAL_RANK is in the env.
    """
    launcher = ("--local_rank", "--local-rank")  # the deepspeed launcher puts --local_rank=N first
    argv = [a for i, a in enumerate(argv) if not a.startswith(launcher)
            and not (i > 0 and argv[i - 1] in launcher)]
    recipe, rest, i = None, [], 0
    if argv and argv[0].endswith((".yaml", ".yml")) and not argv[0].startswith("-"):
        recipe, i = argv[0], 1
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c") and i + 1 < len(argv):
            if recipe is not None:
                raise ConfigError(f"two recipes given ({recipe} and {argv[i + 1]}): pass one")
            recipe, i = argv[i + 1], i + 2
        elif arg.startswith("--config="):
            if recipe is not None:
                raise ConfigError(f"two recipes given ({recipe} and {arg.split('=', 1)[1]}): pass one")
            recipe, i = arg.split("=", 1)[1], i + 1
        else:
            rest.append(arg)
            i += 1
    return recipe, rest


def train_main(argv: list[str]) -> int:
    from simpo_ds.data.tokenize import DataError
    from simpo_ds.engine import CheckpointError, CollectiveError
    from simpo_ds.trainer import NonFiniteError

    try:
        recipe, overrides = _split_args(argv)
        cfg = load_config(recipe, overrides)
        if not cfg.model_name_or_path:
            raise ConfigError("config key 'model_name_or_path' is required")
        if not cfg.train_data and not cfg.dataset_mixer:
            raise ConfigError("config key 'train_data' (or 'dataset_mixer') is required")
        from simpo_ds.trainer import Trainer

        trainer = Trainer(cfg)
        trainer.train()
        from simpo_ds.engine import shutdown_distributed

        shutdown_distributed()  # every rank got here: the run ended well
    except (ConfigError, DataError, FileNotFoundError) as err:
        print(f"simpo-ds: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteError as err:
        print(f"simpo-ds: error: {err}", file=sys.stderr)
        return EXIT_NONFINITE
    except CheckpointError as err:
        print(f"simpo-ds: error: {err}", file=sys.stderr)
        return EXIT_CHECKPOINT
    except CollectiveError as err:
        print(f"simpo-ds: error: {err}", file=sys.stderr)
        return EXIT_COLLECTIVE
    return EXIT_PREEMPTED if trainer.preempted else 0


USAGE = """usage:
  simpo-ds train [recipe.yaml | --config recipe.yaml] [--ds ds_configs/zero3.json] [--key value ...]
  simpo-ds plot OUTPUT_DIR [--config recipe.yaml] [--title TEXT]
  simpo-ds stats DATASET --tokenizer DIR [--max_length N] [--max_prompt_length N] ...
  simpo-ds generate --model M --prompts P --out DIR [--num_samples 5 --temperature 0.8 --top_p 0.95 ...]
  simpo-ds score --data DIR (--reward_model RM | --scorer module:function) [--batch_size 8 ...]
  simpo-ds binarize --data DIR --out OUT [--test_size 0.02 --seed 42]"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        return train_main(rest)
    if command == "plot":
        from simpo_ds import plot

        return plot.main(rest)
    if command == "stats":
        from simpo_ds import stats

        return stats.main(rest)
    if command in ("generate", "score", "binarize"):
        import importlib

        return importlib.import_module(f"simpo_ds.onpolicy.{command}").main(rest)
    print(f"simpo-ds: unknown command {command!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
