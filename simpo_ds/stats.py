"""Length statistics of a preference dataset, with the project's own tokenization.

    python -m simpo_ds.stats DATASET --tokenizer PATH [--config recipe.yaml]
        [--max_length N] [--max_prompt_length M] [--chat_template_mode MODE]
        [--batch_size B] [--max_tokens_per_microbatch T] [--train_batch_size P] [--world_size W]
        [--png hist.png]

Prints a markdown report:

1. token length percentiles of prompt / chosen / rejected (untruncated, as ``tokenize_row`` renders
   and tokenizes them: chat template, BOS, EOS, the seam rule);
2. how many pairs ``max_length`` / ``max_prompt_length`` would truncate (prompt cut, answers cut) or
   drop (an answer empty after truncation), with the lengths after truncation;
3. the compute a padded trainer pays (the reference layout: a micro-batch of B pairs is 2B rows
   padded to its longest sequence) against token-budget packing (``plan_step``: no padding at all,
   only zero-weight filler micro-batches that keep the ranks in lockstep, and rank imbalance).

and writes a histogram PNG (``--png``, default ``DATASET_stem_lengths.png`` in the working dir).
Settings default to the config defaults, overridden by ``--config`` and then by the flags.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

import numpy as np

PERCENTILES = (50, 90, 95, 99, 100)
UNLIMITED = 10**9  # a max_length that truncates nothing


# ---------------------------------------------------------------------------------------------
# lengths
# ---------------------------------------------------------------------------------------------
@dataclass
class Lengths:
    """Per-pair token counts (numpy int arrays, one entry per kept pair)."""

    index: np.ndarray  # row index in the dataset
    prompt: np.ndarray  # prompt tokens (chosen sequence's prompt, BOS included)
    chosen: np.ndarray  # chosen answer tokens (EOS included)
    rejected: np.ndarray  # rejected answer tokens (EOS included)
    rejected_prompt: np.ndarray  # the rejected sequence's prompt (may differ by the seam token)

    @property
    def chosen_seq(self) -> np.ndarray:
        return self.prompt + self.chosen

    @property
    def rejected_seq(self) -> np.ndarray:
        return self.rejected_prompt + self.rejected

    @property
    def pair_tokens(self) -> np.ndarray:
        """Tokens of the pair in a packed row (both sequences, prompt counted twice)."""
        return self.chosen_seq + self.rejected_seq


def lengths_of(tokenized) -> Lengths:
    """``Lengths`` of a ``tokenize_dataset`` result (columns chosen_input_ids, ..., index)."""
    chosen = np.asarray([len(x) for x in tokenized["chosen_input_ids"]], dtype=np.int64)
    rejected = np.asarray([len(x) for x in tokenized["rejected_input_ids"]], dtype=np.int64)
    chosen_prompt = np.asarray(tokenized["chosen_prompt_len"], dtype=np.int64)
    rejected_prompt = np.asarray(tokenized["rejected_prompt_len"], dtype=np.int64)
    return Lengths(
        index=np.asarray(tokenized["index"], dtype=np.int64),
        prompt=chosen_prompt,
        chosen=chosen - chosen_prompt,
        rejected=rejected - rejected_prompt,
        rejected_prompt=rejected_prompt,
    )


def tokenize_lengths(raw, tokenizer, settings) -> tuple[Lengths, dict]:
    """Tokenize ``raw`` (a ``datasets.Dataset`` of pairs) with ``settings`` -> (Lengths, drop stats)."""
    from simpo_ds.data.load import tokenize_dataset

    tokenized, stats = tokenize_dataset(raw, tokenizer, settings)
    return lengths_of(tokenized), stats


def percentile_table(named: dict[str, np.ndarray], percentiles: Sequence[int] = PERCENTILES) -> str:
    """Markdown table: one row per array, mean and the given percentiles (nearest-rank, integers)."""
    head = "| tokens | mean | " + " | ".join(f"p{p}" if p < 100 else "max" for p in percentiles) + " |"
    lines = [head, "|---" * (len(percentiles) + 2) + "|"]
    for name, values in named.items():
        if len(values) == 0:
            lines.append(f"| {name} | – |" + " – |" * len(percentiles))
            continue
        cells = [f"{int(np.percentile(values, p, method='inverted_cdf'))}" for p in percentiles]
        lines.append(f"| {name} | {values.mean():.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def truncation_summary(full: Lengths, cut: Lengths, rows: int, dropped: dict) -> dict:
    """Compare untruncated and truncated tokenizations of the same rows.

    Returns ``{"rows", "kept", "dropped", "prompt_cut", "answer_cut", "truncated"}`` where a pair
    counts as prompt_cut / answer_cut when its prompt / either answer got shorter (pairs dropped in
    the untruncated pass, e.g. prompts differing beyond the seam token, are in ``dropped`` only).
    """
    position = {int(i): k for k, i in enumerate(full.index)}
    prompt_cut = answer_cut = truncated = 0
    for k, i in enumerate(cut.index):
        j = position[int(i)]
        p = cut.prompt[k] < full.prompt[j] or cut.rejected_prompt[k] < full.rejected_prompt[j]
        a = cut.chosen[k] < full.chosen[j] or cut.rejected[k] < full.rejected[j]
        prompt_cut += int(p)
        answer_cut += int(a)
        truncated += int(p or a)
    return {
        "rows": rows,
        "kept": len(cut.index),
        "dropped": sum(dropped.values()),
        "drop_reasons": dict(dropped),
        "prompt_cut": prompt_cut,
        "answer_cut": answer_cut,
        "truncated": truncated,
    }


# ---------------------------------------------------------------------------------------------
# padding vs packing
# ---------------------------------------------------------------------------------------------
def padded_cost(chosen_seq: np.ndarray, rejected_seq: np.ndarray, batch_size: int, seed: int = 0) -> dict:
    """Tokens a padded trainer processes: pairs in a seeded random order, ``batch_size`` pairs per
    micro-batch, each micro-batch = 2·B rows padded to its longest sequence (reference layout).

    Returns ``{"real", "processed", "efficiency"}`` (efficiency = real / processed).
    """
    order = np.random.default_rng(seed).permutation(len(chosen_seq))
    real = int(chosen_seq.sum() + rejected_seq.sum())
    processed = 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        longest = int(max(chosen_seq[idx].max(), rejected_seq[idx].max()))
        processed += 2 * len(idx) * longest
    return {"real": real, "processed": processed, "efficiency": real / max(processed, 1)}


def packed_cost(pair_tokens: np.ndarray, train_batch_size: int, world_size: int, max_tokens: int,
                seed: int = 0) -> dict:
    """Tokens token-budget packing processes over one epoch, step by step with ``plan_step``.

    Pairs in a seeded random order, ``train_batch_size`` pairs (global) per optimizer step. Packed
    rows carry no padding; the cost is (a) zero-weight filler micro-batches (ranks must run the same
    number of forwards) and (b) rank imbalance: a step lasts as long as its fullest rank, so
    ``efficiency = real / (world_size × Σ_steps max_rank_tokens)``. Also returns micro-batches per
    rank per step and the mean fill of the token budget.
    """
    from simpo_ds.data.packing import plan_step

    order = np.random.default_rng(seed).permutation(len(pair_tokens))
    real = filler = slowest = micro_total = steps = 0
    fills = []
    for start in range(0, len(order), train_batch_size):
        lengths = [int(x) for x in pair_tokens[order[start : start + train_batch_size]]]
        plan = plan_step(lengths, world_size, max_tokens)
        rank_tokens = []
        for micro_batches in plan:
            tokens = 0
            for micro in micro_batches:
                n = sum(lengths[i] for i in micro.pairs)
                tokens += n
                if micro.weight == 0:
                    filler += n
                else:
                    fills.append(n / max_tokens)
            rank_tokens.append(tokens)
        real += sum(lengths)
        slowest += max(rank_tokens)
        micro_total += len(plan[0])
        steps += 1
    return {
        "real": real,
        "processed": real + filler,
        "filler": filler,
        "efficiency": real / max(world_size * slowest, 1),
        "micro_batches_per_step": micro_total / max(steps, 1),
        "budget_fill": float(np.mean(fills)) if fills else 0.0,
        "steps": steps,
    }


# ---------------------------------------------------------------------------------------------
# histogram
# ---------------------------------------------------------------------------------------------
def write_histogram(lengths: Lengths, path: Path, max_length: int, max_prompt_length: int) -> Path:
    """Histograms of prompt, answer (chosen/rejected) and full sequence lengths, limits marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=100)
    panels = [
        ("prompt tokens", {"prompt": lengths.prompt}, max_prompt_length, "max_prompt_length"),
        ("answer tokens", {"chosen": lengths.chosen, "rejected": lengths.rejected}, None, None),
        ("sequence tokens (prompt + answer)", {"chosen": lengths.chosen_seq, "rejected": lengths.rejected_seq},
         max_length, "max_length"),
    ]
    for ax, (title, named, limit, limit_name) in zip(axes, panels):
        values = np.concatenate(list(named.values()))
        bins = np.linspace(values.min(), values.max() + 1, min(40, int(values.max() - values.min()) + 2))
        for (name, v), color, width in zip(named.items(), ("tab:blue", "tab:red"), (2.5, 1.5)):
            ax.hist(v, bins=bins, histtype="step", linewidth=width, label=name, color=color)
        if limit is not None and limit <= values.max() * 1.5:  # mark the limit when it is in view
            ax.axvline(limit, color="black", linestyle="--", label=f"{limit_name} = {limit}")
        ax.set_title(title if limit is None else f"{title}\n{limit_name} = {limit}")
        ax.set_xlabel("tokens")
        ax.set_ylabel("pairs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def _settings(args) -> SimpleNamespace:
    """Tokenization and batching settings: config defaults <- --config recipe <- flags."""
    from simpo_ds.config import load_config

    cfg = load_config(args.config, [])
    for key in ("max_length", "max_prompt_length", "chat_template_mode", "truncation_mode",
                "max_tokens_per_microbatch", "train_batch_size"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    if args.train_batch_size is not None:  # the flag replaces the recipe's per-device form too
        cfg.per_device_train_batch_size = cfg.gradient_accumulation_steps = None
    if args.auto_insert_empty_system_msg is not None:
        cfg.auto_insert_empty_system_msg = args.auto_insert_empty_system_msg.lower() == "true"
    cfg.validate()
    return cfg


def build_report(dataset: str, tokenizer_path: str, cfg, batch_size: int, world_size: int,
                 png: Optional[Path]) -> str:
    """Everything ``main`` prints, as markdown (writes the PNG when ``png`` is given)."""
    import datasets
    from transformers import AutoTokenizer

    from simpo_ds.data.formats import to_canonical
    from simpo_ds.data.load import load_pairs

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    raw, formats = to_canonical(load_pairs(dataset), dataset, cfg.drop_ties)
    unlimited = SimpleNamespace(**{**vars(_tokenize_fields(cfg)), "max_length": UNLIMITED,
                                   "max_prompt_length": UNLIMITED - 1})
    full, _ = tokenize_lengths(raw, tokenizer, unlimited)
    cut, dropped = tokenize_lengths(raw, tokenizer, _tokenize_fields(cfg))
    trunc = truncation_summary(full, cut, len(raw), dropped["dropped"])
    padded = padded_cost(cut.chosen_seq, cut.rejected_seq, batch_size)
    step_pairs = cfg.resolve_batch_size(world_size)
    packed = packed_cost(cut.pair_tokens, step_pairs, world_size, cfg.max_tokens_per_microbatch)

    out = [f"# Length statistics: `{dataset}`", ""]
    out += [f"tokenizer `{tokenizer_path}`, chat_template_mode `{cfg.chat_template_mode}`, "
            f"auto_insert_empty_system_msg `{cfg.auto_insert_empty_system_msg}`, {formats['rows']} rows"
            + (f" ({len(raw)} after dropping score ties)" if formats["ties_dropped"] else ""), ""]
    out += [f"format: **{formats['format']}**" + (f"; scores {formats['scores']}: {formats['ties']} tie(s)"
            + (" dropped (drop_ties)" if formats["ties_dropped"] else "") if formats["scores"] else ""), ""]
    out += ["## Token lengths (untruncated)", ""]
    out += [percentile_table({"prompt": full.prompt, "chosen answer": full.chosen, "rejected answer": full.rejected,
                              "chosen sequence": full.chosen_seq, "rejected sequence": full.rejected_seq,
                              "pair (packed)": full.pair_tokens}), ""]
    out += [f"## Truncation at max_length={cfg.max_length}, max_prompt_length={cfg.max_prompt_length} "
            f"({cfg.truncation_mode})", ""]
    out += ["| pairs | count | share |", "|---|---|---|"]
    for key in ("truncated", "prompt_cut", "answer_cut", "dropped", "kept"):
        out.append(f"| {key} | {trunc[key]} | {trunc[key] / max(len(raw), 1):.1%} |")
    if trunc["drop_reasons"]:
        out += ["", "drop reasons: " + ", ".join(f"{k} ({v})" for k, v in trunc["drop_reasons"].items())]
    out += ["", "## Padding vs packing (after truncation, one epoch)", ""]
    out += ["| layout | real tokens | processed tokens | efficiency | notes |", "|---|---|---|---|---|"]
    out.append(f"| padded, {batch_size} pairs / micro-batch | {padded['real']} | {padded['processed']} | "
               f"{padded['efficiency']:.1%} | 2·B rows padded to the longest |")
    out.append(
        f"| packed, budget {cfg.max_tokens_per_microbatch} tokens, {step_pairs} pairs / step, "
        f"{world_size} rank(s) | {packed['real']} | {packed['processed']} | {packed['efficiency']:.1%} | "
        f"{packed['micro_batches_per_step']:.1f} micro-batches / rank / step, budget fill "
        f"{packed['budget_fill']:.0%}, filler {packed['filler']} tokens |"
    )
    out += ["", "efficiency = real tokens / tokens paid for (padding; for packing, fillers and the slowest "
            "rank's share)."]
    if png is not None:
        out += ["", f"histogram: {write_histogram(full, png, cfg.max_length, cfg.max_prompt_length)}"]
    return "\n".join(out)


def _tokenize_fields(cfg) -> SimpleNamespace:
    from simpo_ds.data.tokenize import tokenize_settings

    return tokenize_settings(cfg)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m simpo_ds.stats DATASET --tokenizer PATH [...]`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="simpo-ds stats", description="Token length statistics of a pair dataset")
    parser.add_argument("dataset", help=".jsonl/.json/.parquet file or dir, or hub name[:split]")
    parser.add_argument("--tokenizer", required=True, help="tokenizer (or model) directory or hub id")
    parser.add_argument("--config", help="recipe YAML to take tokenization/batching settings from")
    parser.add_argument("--max_length", type=int)
    parser.add_argument("--max_prompt_length", type=int)
    parser.add_argument("--truncation_mode", choices=("keep_end", "keep_start"))
    parser.add_argument("--chat_template_mode", choices=("reference", "generation_prompt"))
    parser.add_argument("--auto_insert_empty_system_msg", choices=("true", "false"))
    parser.add_argument("--batch_size", type=int, default=8, help="pairs per padded micro-batch (default 8)")
    parser.add_argument("--max_tokens_per_microbatch", type=int, help="packing token budget per micro-batch")
    parser.add_argument("--train_batch_size", type=int, help="pairs per optimizer step (global)")
    parser.add_argument("--world_size", type=int, default=1, help="ranks for the packing plan (default 1)")
    parser.add_argument("--png", help="histogram path (default: <dataset stem>_lengths.png)")
    args = parser.parse_args(argv)

    from simpo_ds.config import ConfigError
    from simpo_ds.data.tokenize import DataError

    try:
        cfg = _settings(args)
        png = Path(args.png) if args.png else Path(f"{Path(args.dataset).stem}_lengths.png")
        print(build_report(args.dataset, args.tokenizer, cfg, args.batch_size, args.world_size, png))
    except (ConfigError, DataError, FileNotFoundError, OSError) as err:
        print(f"simpo-ds stats: error: {err}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
