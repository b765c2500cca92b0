"""Re-count the useful FLOPs of the throughput runs in bench/RESULTS.md with ``simpo_ds.flops``.

    python -m bench.flops_recount            # writes the flops_recount section of bench/RESULTS.md

The throughput tables were measured while ``training_flops`` was 6·N per real token over ALL
parameters + 12·L·H·Σ s_i². Their step times do not depend on how FLOPs are counted, and every
system trains the same pairs in the same steps, so each table's "useful TFLOP/s" and "MFU" scale by one
factor per data set: Σ honest FLOPs / Σ earlier FLOPs over the steady-state steps' pairs (the same
model, data, seed and step order as ``bench.throughput``). This script computes that factor from the
pairs themselves (no timing involved) and the corrected figures from the published ones.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench import write_section
from bench.make_data import build
from bench.throughput import ROOT, Settings, step_order

# (section, data settings, steps, published TFLOP/s and MFU per system) — from bench/RESULTS.md
PUBLISHED = {
    "throughput (lengths / 8, 2 threads)": (8.0, 9, {
        "simpo-ds packed": (0.1188, 0.667), "simpo-ds padded": (0.0763, 0.428), "TRL CPO simpo": (0.0601, 0.338)}),
    "throughput_1thread (lengths / 8, 1 thread)": (8.0, 9, {
        "simpo-ds packed": (0.0645, 0.800), "simpo-ds padded": (0.0464, 0.576), "TRL CPO simpo": (0.0324, 0.402)}),
    "throughput_full_scale (full lengths, 2 threads)": (1.0, 4, {
        "simpo-ds packed": (0.1348, 0.768), "simpo-ds padded": (0.0709, 0.403), "TRL CPO simpo": (0.0461, 0.262)}),
}


def factor(scale: float, steps: int, batch: int = 16, seed: int = 42) -> dict:
    """Σ honest / Σ earlier useful FLOPs over the steady-state steps (steps 2..steps) of the bench."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from simpo_ds.config import SimPOConfig
    from simpo_ds.data.load import load_pairs, tokenize_dataset
    from simpo_ds.flops import flop_shape, training_flops
    from simpo_ds.trainer import PairData

    s = Settings(scale=scale, data_dir="outputs/bench/data" if scale == 8.0 else "outputs/bench/data_full")
    summary = build(ROOT / s.data_dir, s.pairs, s.scale)
    model = AutoModelForCausalLM.from_pretrained(summary["paths"]["model"], dtype=torch.float32)
    shape, n_all = flop_shape(model), sum(p.numel() for p in model.parameters())
    cfg = SimPOConfig(max_length=s.max_length, max_prompt_length=s.max_length - 1)
    data = PairData(tokenize_dataset(load_pairs(summary["paths"]["uf_like"]), AutoTokenizer.from_pretrained(
        summary["paths"]["model"]), cfg)[0])
    order = step_order(len(data), seed)[batch : steps * batch]  # steady state: without the warm-up step
    real = labels = causal = squares = 0.0
    for pair in data.pairs(order):
        for key in ("chosen", "rejected"):
            n, p = len(pair[f"{key}_input_ids"]), pair[f"{key}_prompt_len"]
            real, labels, squares, causal = real + n, labels + n - max(p, 1), squares + n * n, causal + n * (n + 1) / 2
    honest = training_flops(shape, real, labels, causal)
    earlier = 6.0 * n_all * real + 12.0 * shape.layers * shape.hidden * squares
    return {"honest": honest, "earlier": earlier, "factor": honest / earlier, "n_all": n_all,
            "n_body": shape.body_params, "embedding_share": (n_all - shape.body_params) / n_all,
            "answer_row_share": labels / real}


def report() -> str:
    lines = ["## Useful FLOPs re-counted with `simpo_ds.flops` (the throughput tables above)", "",
             "`python -m bench.flops_recount` — the tables above were measured with the earlier count (6·N per "
             "token over all parameters + 12·L·H·Σ s_i²). Their step times do not depend on the count and every "
             "system trains the same pairs in the same steps, so useful TFLOP/s and MFU scale by one factor per "
             "data set, computed from the steady-state steps' pairs:", "",
             "| data | parameters (all / decoder matmuls) | answer rows / tokens | honest ÷ earlier FLOPs |",
             "|---|---|---|---|"]
    rows = []
    for name, (scale, steps, published) in PUBLISHED.items():
        f = factor(scale, steps)
        lines.append(f"| {name} | {f['n_all'] / 1e6:.2f} M / {f['n_body'] / 1e6:.2f} M | {f['answer_row_share']:.1%} | "
                     f"**{f['factor']:.3f}** |")
        rows += [(name, system, tf, mfu, f["factor"]) for system, (tf, mfu) in published.items()]
    if rows:
        lines += ["", "| table | system | useful TFLOP/s (earlier → honest) | MFU vs sgemm (earlier → honest) |",
                  "|---|---|---|---|"]
        lines += [f"| {n} | {system} | {tf:.4f} → **{tf * k:.4f}** | {mfu:.1%} → **{mfu * k:.1%}** |"
                  for n, system, tf, mfu, k in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    text = report()
    print(text)
    if not args.no_write:
        write_section("flops_recount", text)


if __name__ == "__main__":
    main()
