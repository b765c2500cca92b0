"""Long pairs with sequence parallelism: peak memory per rank and tokens/s, N = 1 vs N = 2 (CPU).

    python -m bench.long_pairs                       # 4k / 16k / 32k-token pairs, ~6 min on 2 cores
    python -m bench.long_pairs --tokens 1024 --no-write   # seconds
    python -m bench.long_pairs --tiled-mlp --tokens 16384,32768   # tiled_mlp_tokens on / off at N = 2

One pair of T tokens (prompt T/4 twice, answers 3T/8 and T/8: the chosen sequence is 5T/8 long) trains
for 2 optimizer steps (the first is warm-up) with ``launch/train.py`` under the deepspeed launcher:
N = 1 on one process, N = 2 on two processes sharing the row (``sequence_parallel_size: 2``), ZeRO-2,
gradient checkpointing, a random 2-layer Llama (hidden 128, 4 heads, 2 kv heads, vocab 1024) in fp32.
Per run, from rank 0's metrics.jsonl at step 2: peak RSS of the process (``mem/peak_gb``), real
tokens/s. Activation memory = that peak minus the peak of the same run on a 256-token pair (model,
optimizer and the Python/torch/DeepSpeed baseline). Target (issue 17): per-rank activation memory at
N = 2 ≈ 1/2 of N = 1. The longest pair that fits a fixed per-rank budget: the budget is N = 1's peak at
the middle length; the table says which measured lengths each N fits within it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from bench import write_section

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=65536, tie_word_embeddings=False)
VOCAB = 1024


def make_assets(out: Path, name: str = "model", **shape) -> str:
    from bench.make_data import make_model, make_tokenizer

    model_dir = out / name
    if not (model_dir / "config.json").is_file():
        tokenizer = make_tokenizer(VOCAB)
        model = make_model(tokenizer, 0, **{**SHAPE, **shape})
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    return str(model_dir)


def pair_file(out: Path, tokens: int) -> tuple[str, int]:
    """One standard row of about ``tokens`` tokens in the packed row (BOS/EOS included)."""
    rng = random.Random(tokens)
    words = lambda n: " ".join(f"w{rng.randrange(VOCAB - 4)}" for _ in range(n))  # noqa: E731
    prompt, chosen, rejected = tokens // 4, 3 * tokens // 8, tokens // 8
    path = out / f"pair_{tokens}.jsonl"
    path.write_text(json.dumps({"prompt": words(prompt - 1), "chosen": " " + words(chosen - 1),
                                "rejected": " " + words(rejected - 1)}) + "\n")
    return str(path), 2 * prompt + chosen + rejected


def run(out: Path, model: str, tokens: int, n: int, *extra: str) -> dict:
    data, total = pair_file(out, tokens)
    run_dir = out / f"run_{Path(model).name}_{tokens}_n{n}{'_'.join(('',) + extra[1::2])}"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(n), "--master_port",
           str(29700 + n + tokens % 97), "launch/train.py", "--model_name_or_path", model, "--train_data", data,
           "--output_dir", str(run_dir), "--ds", "ds_configs/zero2.json", "--max_steps", "2", "--train_batch_size",
           "1", "--max_tokens_per_microbatch", str(total), "--max_length", str(total), "--max_prompt_length",
           str(total - 1), "--sequence_parallel_size", str(n), "--gradient_checkpointing", "true", "--torch_dtype",
           "float32", "--learning_rate", "1e-4", "--save_final", "false", "--report_to", "none", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(max(2 // n, 1))}
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"T={tokens} N={n} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    record = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if r["split"] == "train"][-1]
    return {"tokens": total, "n": n, "peak_gib": record["mem/peak_gb"], "tokens_per_s": record["tokens_per_s"],
            "step_s": record["step_time_s"], "loss": record["loss"], "wall_s": time.perf_counter() - started}


def report(rows: list[dict], baseline: dict[int, float], lengths: list[int]) -> str:
    budget_len = lengths[len(lengths) // 2]
    budget = next(r["peak_gib"] for r in rows if r["n"] == 1 and r["tokens"] // 1000 == budget_len // 1000)
    lines = ["## Long pairs: sequence parallelism N = 1 vs N = 2 (CPU, one pair per step)", "",
             "`python -m bench.long_pairs` — " + __doc__.split("\n\n")[2].replace("\n", " "), "",
             "| pair tokens | N | peak RSS per rank (GiB) | activation memory per rank (GiB) | act. vs N = 1 | real tokens/s "
             "| step loss |", "|---|---|---|---|---|---|---|"]
    by = {(r["tokens"], r["n"]): r for r in rows}
    for r in rows:
        act = r["peak_gib"] - baseline[r["n"]]
        one = by.get((r["tokens"], 1))
        ratio = act / (one["peak_gib"] - baseline[1]) if one and r["n"] == 2 else 1.0
        lines.append(f"| {r['tokens']} | {r['n']} | {r['peak_gib']:.2f} | {act:.2f} | {ratio:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r['loss']:.6f} |")
    fits = {n: max((r["tokens"] for r in rows if r["n"] == n and r["peak_gib"] <= budget), default=0) for n in (1, 2)}
    lines += ["", f"Baseline (256-token pair): {baseline[1]:.2f} GiB at N = 1, {baseline[2]:.2f} GiB at N = 2. "
              f"Per-rank budget {budget:.2f} GiB (N = 1's peak at {budget_len} tokens): the longest measured pair "
              f"within it is **{fits[1]} tokens at N = 1 and {fits[2]} tokens at N = 2**. The step-2 loss of N = 2 "
              f"is within {max(abs(by[(t, 2)]['loss'] / by[(t, 1)]['loss'] - 1) for t, n in by if n == 2):.0e} of "
              "N = 1's (after one AdamW update of gradients that agree to 1e-5; step 1 is exact: "
              "tests/test_sequence_parallel.py)."]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="4096,16384,32768", help="pair lengths (comma-separated)")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "long_pairs"))
    parser.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
    parser.add_argument("--tiled-mlp", action="store_true", help="only the tiled-MLP comparison (tiled_mlp_tokens)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tiled_mlp:
        return tiled_mlp(out, [int(t) for t in args.tokens.split(",")], not args.no_write)
    model = make_assets(out)
    lengths = [int(t) for t in args.tokens.split(",")]
    baseline = {n: run(out, model, 256, n)["peak_gib"] for n in (1, 2)}
    rows = []
    for tokens in lengths:
        for n in (1, 2):
            rows.append(run(out, model, tokens, n))
            print(json.dumps(rows[-1]), flush=True)
    text = report(rows, baseline, lengths)
    print(text)
    if not args.no_write:
        write_section("long_pairs", text)


WIDE_MLP = dict(intermediate_size=2048)  # MLP 16x hidden: the MLP's share of a real model's activations


def tiled_mlp(out: Path, lengths: list[int], write: bool) -> None:
    """N = 2, a model whose MLP dominates the activations (intermediate 16x hidden), with and without
    ``tiled_mlp_tokens: 128`` (DeepSpeed's rule: tiles of hidden_size tokens)."""
    model = make_assets(out, "wide_mlp", **WIDE_MLP)
    base = run(out, model, 256, 2)["peak_gib"]
    rows = []
    for tokens in lengths:
        for extra in ((), ("--tiled_mlp_tokens", "128")):
            rows.append({**run(out, model, tokens, 2, *extra), "tiled": bool(extra)})
            print(json.dumps(rows[-1]), flush=True)
    lines = ["## Long pairs: tiled MLP (N = 2, CPU)", "",
             "`python -m bench.long_pairs --tiled-mlp` — the runs above at N = 2 on a model whose MLP is 16x wide "
             f"({WIDE_MLP['intermediate_size']} vs hidden 128, so its activations weigh as in real models), gradient "
             "checkpointing on, with and without `tiled_mlp_tokens: 128` (DeepSpeed's TiledMLP; tiles of hidden_size "
             "tokens, as its ALST recipe). Activation memory = peak RSS minus the 256-token run's "
             f"({base:.2f} GiB).", "",
             "| pair tokens | tiled MLP | peak RSS per rank (GiB) | activation memory per rank (GiB) | vs untiled "
             "| real tokens/s | step loss |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        plain = next(p for p in rows if p["tokens"] == r["tokens"] and not p["tiled"])
        lines.append(f"| {r['tokens']} | {'yes' if r['tiled'] else 'no'} | {r['peak_gib']:.2f} | "
                     f"{r['peak_gib'] - base:.2f} | {(r['peak_gib'] - base) / (plain['peak_gib'] - base):.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r['loss']:.6f} |")
    text = "\n".join(lines)
    print(text)
    if write:
        write_section("long_pairs_tiled_mlp", text)


if __name__ == "__main__":
    main()
