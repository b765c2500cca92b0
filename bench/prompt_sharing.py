"""Prompt sharing vs standard packing: processed tokens and training throughput (CPU).

    python -m bench.prompt_sharing                 # both sets, 5 interleaved repeats (~8 min, 1 thread)
    python -m bench.prompt_sharing --toy           # seconds: every code path at toy size

Same model (a random Llama from ``bench.make_data``: hidden 256, 4 layers, GQA, vocab 8192), same data,
same steps (the same ``--batch`` pairs per optimizer step, in the same order), same token budget per
micro-batch, fp32, sdpa, one process. Two synthetic sets from ``bench.make_data`` (word-level, fixed
seed): ``uf_like`` (UltraFeedback-like lengths: prompt median ~1/2 of an answer) and ``long_prompt``
(the same answers, prompt ~ 4x the mean answer).

A step is the trainer's inner loop without DeepSpeed: plan the step's pairs by the layout's lengths
(``plan_step``), collate each micro-batch (``collate_packed`` | ``collate_shared``), ``SimPOPolicy``
forward (dense mask through sdpa on CPU for both: transformers builds the packed row's block-causal mask
from position_ids, the shared row gets ``shared_attention_mask``), ``microbatch_loss``, backward, then
``torch.optim.AdamW`` step. Each run starts from the same weights and optimizer state, so the two
layouts' step-1 losses must agree (printed as a check). Runs are interleaved (standard, shared, then
rotated) and the table shows medians over ``--repeats`` runs of ``--steps`` timed steps each (after one
warm-up step). Columns:

- processed tokens/step: tokens in the rows the model runs (Σ of micro-batch lengths);
- pairs/s and processed tokens/s over the timed steps (collation included);
- attention work: Σ s² per step (standard: Σ over sequences of length²; shared: ``seq_sq_sum`` =
  Σ len(chosen)² + len(rejected)² − prompt², i.e. twice the (q, k) pairs the mask allows).

Writes ``bench/RESULTS_prompt_sharing.md`` (hardware, versions, commit) and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import ROOT, environment, environment_markdown, median

RESULTS = ROOT / "bench" / "RESULTS_prompt_sharing.md"
LAYOUTS = ("standard", "shared")
SETS = ("uf_like", "long_prompt")


@dataclass
class Settings:
    data_dir: str = "outputs/bench/prompt_sharing_data"  # bench.make_data output (built when missing)
    pairs: int = 512  # rows generated per set
    scale: float = 8.0  # full-scale token lengths divided by this (bench.make_data)
    batch: int = 16  # pairs per optimizer step
    budget: int = 1024  # max_tokens_per_microbatch (both layouts)
    steps: int = 3  # timed steps per run (after one warm-up step)
    repeats: int = 5  # interleaved runs per (set, layout)
    threads: int = 1  # torch intra-op threads; 0 = every core (1: stable on a shared, oversubscribed CPU)
    seed: int = 0
    model_shape: dict | None = None  # overrides of bench.make_data.MODEL_SHAPE (toy runs)
    results: str = str(RESULTS)


TOY = dict(data_dir="outputs/bench/prompt_sharing_toy", pairs=32, batch=4, budget=256, steps=1, repeats=1,
           model_shape={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2},
           results="outputs/bench/prompt_sharing_toy/RESULTS.md")


# ---------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------
def load(s: Settings):
    """(model, tokenized pairs per set): data and model from bench.make_data, tokenized as the trainer does."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.make_data import build
    from simpo_ds.config import SimPOConfig
    from simpo_ds.data.load import tokenize_dataset

    summary = build(s.data_dir, pairs=s.pairs, scale=s.scale, seed=s.seed, model_shape=s.model_shape)
    tokenizer = AutoTokenizer.from_pretrained(summary["paths"]["model"])
    model = AutoModelForCausalLM.from_pretrained(summary["paths"]["model"], dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model.config.use_cache = False
    cfg = SimPOConfig()
    keys = ("chosen_input_ids", "chosen_prompt_len", "rejected_input_ids", "rejected_prompt_len")
    sets = {}
    for name in SETS:
        raw = datasets.load_dataset("json", data_files=summary["paths"][name], split="train")
        tokenized, stats = tokenize_dataset(raw, tokenizer, cfg)
        sets[name] = [dict(zip(keys, values)) for values in zip(*(tokenized[k] for k in keys))]
    return model, sets, summary


def step_batches(pairs: list[dict], s: Settings) -> list[list[dict]]:
    """The pairs of steps 0..steps (warm-up + timed): a seeded permutation, ``batch`` pairs each."""
    import numpy as np

    order = np.random.default_rng(s.seed).permutation(len(pairs))
    need = (s.steps + 1) * s.batch
    if need > len(pairs):
        raise SystemExit(f"{len(pairs)} pairs < {need} needed; raise --pairs or lower --steps/--batch")
    return [[pairs[i] for i in order[k * s.batch : (k + 1) * s.batch]] for k in range(s.steps + 1)]


# ---------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------
def run(model, state: dict, steps: list[list[dict]], layout: str, s: Settings) -> dict:
    """Warm-up step + timed steps of one layout from the given weights; per-step means."""
    import torch

    from simpo_ds.data.packing import collate_packed, pair_num_tokens, plan_step
    from simpo_ds.data.sharing import collate_shared, shared_pair_num_tokens
    from simpo_ds.loss import StepNormalizer, finalize_metrics, microbatch_loss
    from simpo_ds.model import SimPOPolicy

    model.load_state_dict(state)
    model.train()
    policy = SimPOPolicy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    collate, measure = ((collate_packed, pair_num_tokens) if layout == "standard"
                        else (collate_shared, shared_pair_num_tokens))
    times, tokens, micro_batches, seq_sq, first_loss = [], 0, 0, 0.0, None
    for k, pairs in enumerate(steps):
        start = time.perf_counter()
        plan = plan_step([measure(p) for p in pairs], 1, s.budget)[0]
        norm = StepNormalizer(len(pairs), sum(len(p["chosen_input_ids"]) - max(p["chosen_prompt_len"], 1)
                                              for p in pairs))
        stats = 0
        for micro in plan:
            batch = collate([pairs[i] for i in micro.pairs])
            seq = policy(batch)
            loss, micro_stats = microbatch_loss(seq, batch["chosen_seq"], batch["rejected_seq"], norm,
                                                beta=2.0, gamma_beta_ratio=0.25, weight=micro.weight)
            loss.backward()
            stats = stats + micro_stats
            if k > 0:
                tokens += batch["num_tokens"]
                if layout == "standard":
                    lengths = (batch["cu_seqlens"][1:] - batch["cu_seqlens"][:-1]).double()
                    seq_sq += float((lengths**2).sum())
                else:
                    seq_sq += batch["seq_sq_sum"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if k == 0:
            first_loss = finalize_metrics(stats)["loss"]
        else:
            times.append(time.perf_counter() - start)
            micro_batches += len(plan)
    elapsed, n = sum(times), len(times)
    return {
        "step_s": elapsed / n,
        "pairs_per_s": n * s.batch / elapsed,
        "tokens_per_s": tokens / elapsed,
        "tokens_per_step": tokens / n,
        "micro_batches_per_step": micro_batches / n,
        "seq_sq_per_step": seq_sq / n,
        "first_step_loss": first_loss,
    }


# ---------------------------------------------------------------------------------------------
# table
# ---------------------------------------------------------------------------------------------
def summarize(results: dict, s: Settings, summary: dict) -> str:
    rows = [
        "| set | layout | processed tokens/step | micro-batches/step | attention work Σs²/step | step (s) "
        "| pairs/s | processed tokens/s | pairs/s vs standard | paired speedup (min-max) | step-1 loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in SETS:
        med = {layout: {key: median(r[key] for r in results[name][layout]) for key in results[name][layout][0]}
               for layout in LAYOUTS}
        base = med["standard"]
        # ratio of the two runs of the same repeat (adjacent in time: machine load hits both alike)
        paired = [sh["pairs_per_s"] / st["pairs_per_s"] for sh, st in zip(results[name]["shared"],
                                                                          results[name]["standard"])]
        for layout in LAYOUTS:
            m = med[layout]
            ratio = (f"**{median(paired):.2f}x** ({min(paired):.2f}-{max(paired):.2f})" if layout == "shared"
                     else "1.00x")
            rows.append(
                f"| {name} | {layout} | {m['tokens_per_step']:.0f} ({m['tokens_per_step'] / base['tokens_per_step']:.2f}x)"
                f" | {m['micro_batches_per_step']:.1f} | {m['seq_sq_per_step'] / 1e6:.2f}M "
                f"({m['seq_sq_per_step'] / base['seq_sq_per_step']:.2f}x) | {m['step_s']:.2f} | {m['pairs_per_s']:.1f}"
                f" | {m['tokens_per_s']:.0f} | {m['pairs_per_s'] / base['pairs_per_s']:.2f}x | {ratio} "
                f"| {m['first_step_loss']:.6f} |"
            )
    lengths = summary["lengths"]
    shape = summary["settings"]["model_shape"]
    notes = [
        f"- model: random Llama, hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
        f"{shape['num_attention_heads']} heads / {shape['num_key_value_heads']} KV heads, vocab "
        f"{summary['settings']['vocab_size']}, {summary['num_params'] / 1e6:.1f}M parameters; fp32, sdpa, "
        f"{s.threads or 'all'} thread(s)",
        f"- data: `bench.make_data` (seed {s.seed}, scale 1/{s.scale:g}); median prompt / chosen / rejected "
        f"tokens: uf_like {lengths['uf_like']['prompt']['median']:g} / {lengths['uf_like']['chosen']['median']:g}"
        f" / {lengths['uf_like']['rejected']['median']:g}, long_prompt "
        f"{lengths['long_prompt']['prompt']['median']:g} / {lengths['long_prompt']['chosen']['median']:g} / "
        f"{lengths['long_prompt']['rejected']['median']:g}",
        f"- step: {s.batch} pairs, budget {s.budget} tokens per micro-batch (both layouts), plan + collate + "
        f"forward + backward + AdamW; medians of {s.repeats} interleaved runs x {s.steps} timed steps "
        "(after 1 warm-up step); step-1 loss from the same weights must agree between layouts",
        "- pairs/s vs standard: ratio of the medians; paired speedup: median (and range) over repeats of "
        "shared / standard pairs/s within a repeat (the two runs are adjacent in time, so machine load hits "
        "both alike)",
        "- both layouts do the same lm_head work per pair (answer tokens only, vocab 8192), so pairs/s gains "
        "less than the processed-token reduction; the shared-prompt gain grows with the prompt's share of a pair",
    ]
    return "\n".join(rows) + "\n\n" + "\n".join(notes) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--toy", action="store_true", help="tiny model and data: a smoke test of every code path")
    for field, value in asdict(Settings()).items():
        if field != "model_shape":
            parser.add_argument(f"--{field}", type=type(value), default=None)
    args = parser.parse_args(argv)
    s = Settings(**(TOY if args.toy else {}))
    for field in asdict(s):
        if getattr(args, field, None) is not None:
            setattr(s, field, getattr(args, field))

    import torch

    if s.threads:
        torch.set_num_threads(s.threads)
    warnings.filterwarnings("ignore", message=".*exceeds max_tokens_per_microbatch.*")
    env = environment()
    model, sets, summary = load(s)
    state = copy.deepcopy(model.state_dict())
    results = {name: {layout: [] for layout in LAYOUTS} for name in SETS}
    for rep in range(s.repeats):
        for name in SETS:
            steps = step_batches(sets[name], s)
            order = LAYOUTS if rep % 2 == 0 else LAYOUTS[::-1]
            for layout in order:
                r = run(model, state, steps, layout, s)
                results[name][layout].append(r)
                print(json.dumps({"repeat": rep, "set": name, "layout": layout, **r}), flush=True)
    for name in SETS:
        losses = [r["first_step_loss"] for layout in LAYOUTS for r in results[name][layout]]
        assert max(losses) - min(losses) <= 1e-5 * abs(losses[0]), f"{name}: step-1 losses differ: {losses}"
    table = summarize(results, s, summary)
    body = ("# Prompt sharing vs standard packing (CPU)\n\n`python -m bench.prompt_sharing`"
            f"{' --toy' if args.toy else ''}\n\n{environment_markdown(env)}\n{table}")
    Path(s.results).parent.mkdir(parents=True, exist_ok=True)
    Path(s.results).write_text(body)
    print("\n" + body)


if __name__ == "__main__":
    main()
