"""Synthetic UltraFeedback-like preference data and a random-weight Llama for the benchmarks (offline).

    python -m bench.make_data OUT_DIR [--pairs 1024] [--scale 8] [--seed 0]

writes (nothing from a hub)::

    OUT_DIR/model/             random Llama (save_pretrained) + a WordLevel tokenizer of VOCAB_SIZE tokens
    OUT_DIR/uf_like.jsonl      standard rows {"prompt", "chosen", "rejected"}, UltraFeedback-like lengths
    OUT_DIR/long_prompt.jsonl  same answers, prompt ~ 4x the answer (for prompt-sharing comparisons)
    OUT_DIR/summary.json       settings, parameter count, token-length quantiles of both sets

Token lengths, at full scale, imitate UltraFeedback (binarized) under a Llama-style tokenizer::

    prompt   lognormal, median 150, sigma 0.9, clipped to [8, 1000]    (p90 ~ 475: a long tail)
    answers  lognormal, median 300, sigma 0.6, clipped to [50, 1500]   (p10 ~ 140, p90 ~ 650)
             chosen and rejected correlated (rho 0.5), chosen ~10% longer (as in UltraFeedback)
    long-prompt set: the same answers; prompt = 4 x mean(answer) x lognormal(0, 0.3), clipped [32, 6000]

Every length is then divided by ``scale`` (default 8: prompt median ~19, answer median ~38 tokens,
answers 6..188) so a CPU step takes seconds; BOS (prompt) and EOS (answers) are added by tokenization.
A row's text is ``scale``-independent word tokens "w123": one word = one token of the local tokenizer.
Answers start with a space so ``prompt + answer`` tokenizes at the seam without merges (TRL and
simpo-ds then produce identical ids).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

VOCAB_SIZE = 8192
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
# A small Llama-3-style decoder (GQA, untied head, RoPE), ~35 M parameters. Its proportions follow
# real LLMs: the decoder body does ~84% of the per-token matmul work and the lm_head ~16% (Llama-3-8B:
# ~93% / 7%). A narrower 4-layer model (hidden 256) spent ~40% in the lm_head, which only runs on
# labelled tokens in every system, so it hid what padding costs a real model's body.
MODEL_SHAPE = dict(
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=8192,
    tie_word_embeddings=False,
)
FORMAT_VERSION = 2  # bump when the generator changes (invalidates cached OUT_DIRs)


# ---------------------------------------------------------------------------------------------
# tokenizer and model
# ---------------------------------------------------------------------------------------------
def make_tokenizer(vocab_size: int = VOCAB_SIZE):
    """WordLevel tokenizer: SPECIALS + words "w0".."w{n}" (whitespace pre-tokenizer), BOS <s>, EOS </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(vocab_size - len(SPECIALS))]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def make_model(tokenizer, seed: int = 0, **shape):
    """Random-weight fp32 LlamaForCausalLM of MODEL_SHAPE (overridable) for ``tokenizer``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**MODEL_SHAPE, **shape},
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float()
    model.config.use_cache = False
    return model


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# lengths and rows
# ---------------------------------------------------------------------------------------------
def _lognormal(rng, median: float, sigma: float, z) -> np.ndarray:
    return median * np.exp(sigma * z)


def uf_like_lengths(n: int, seed: int) -> dict[str, np.ndarray]:
    """Full-scale token lengths (before BOS/EOS) of ``n`` UltraFeedback-like pairs."""
    rng = np.random.default_rng(seed)
    prompt = np.clip(_lognormal(rng, 150, 0.9, rng.standard_normal(n)), 8, 1000)
    shared = rng.standard_normal(n)  # chosen and rejected lengths are correlated
    rho = 0.5
    z_c = rho * shared + np.sqrt(1 - rho**2) * rng.standard_normal(n)
    z_r = rho * shared + np.sqrt(1 - rho**2) * rng.standard_normal(n)
    chosen = np.clip(_lognormal(rng, 315, 0.6, z_c), 50, 1500)
    rejected = np.clip(_lognormal(rng, 285, 0.6, z_r), 50, 1500)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def long_prompt_lengths(base: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Same answers, prompt ~ 4x the pair's mean answer length."""
    rng = np.random.default_rng(seed + 1)
    answer = (base["chosen"] + base["rejected"]) / 2
    prompt = np.clip(4 * answer * np.exp(0.3 * rng.standard_normal(len(answer))), 32, 6000)
    return {"prompt": prompt, "chosen": base["chosen"], "rejected": base["rejected"]}


def scale_lengths(lengths: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    return {k: np.maximum(np.rint(v / scale), 1).astype(np.int64) for k, v in lengths.items()}


def make_rows(lengths: dict[str, np.ndarray], seed: int, vocab_words: int) -> list[dict]:
    """Standard-format rows of uniformly random word tokens with exactly the given lengths."""
    rng = np.random.default_rng(seed + 2)

    def text(n: int) -> str:
        return " ".join(f"w{i}" for i in rng.integers(0, vocab_words, n))

    rows = []
    for p, c, r in zip(lengths["prompt"], lengths["chosen"], lengths["rejected"]):
        rows.append({"prompt": text(int(p)), "chosen": " " + text(int(c)), "rejected": " " + text(int(r))})
    return rows


def quantiles(values) -> dict:
    v = np.asarray(values)
    q = np.percentile(v, [10, 50, 90, 99]).round(1).tolist()
    return {"min": int(v.min()), "p10": q[0], "median": q[1], "p90": q[2], "p99": q[3], "max": int(v.max()),
            "mean": round(float(v.mean()), 1)}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------------------------------------
# entry
# ---------------------------------------------------------------------------------------------
def build(out: str | Path, pairs: int = 1024, scale: float = 8.0, seed: int = 0, vocab_size: int = VOCAB_SIZE,
          model_shape: dict | None = None) -> dict:
    """Write OUT (see module docstring) unless it already holds the same settings; returns summary.json."""
    out = Path(out)
    settings = {"pairs": pairs, "scale": scale, "seed": seed, "vocab_size": vocab_size,
                "model_shape": {**MODEL_SHAPE, **(model_shape or {})}, "format": FORMAT_VERSION}
    summary_path = out / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("settings") == settings:
            return summary
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(vocab_size)
    model = make_model(tokenizer, seed, **(model_shape or {}))
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    words = vocab_size - len(SPECIALS)
    full = uf_like_lengths(pairs, seed)
    sets = {"uf_like": scale_lengths(full, scale), "long_prompt": scale_lengths(long_prompt_lengths(full, seed), scale)}
    summary = {"settings": settings, "num_params": num_params(model), "paths": {"model": str(out / "model")},
               "lengths_full_scale": {k: quantiles(v) for k, v in full.items()}, "lengths": {}}
    for name, lengths in sets.items():
        _write_jsonl(out / f"{name}.jsonl", make_rows(lengths, seed, words))
        summary["paths"][name] = str(out / f"{name}.jsonl")
        # tokens per sequence as the trainers see them: BOS + prompt + answer + EOS
        summary["lengths"][name] = {
            **{k: quantiles(v) for k, v in lengths.items()},
            "pair_tokens": quantiles(2 * (lengths["prompt"] + 1) + lengths["chosen"] + lengths["rejected"] + 2),
        }
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("--pairs", type=int, default=1024)
    parser.add_argument("--scale", type=float, default=8.0, help="divide every full-scale length by this")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = build(args.out, args.pairs, args.scale, args.seed)
    print(json.dumps({k: summary[k] for k in ("num_params", "paths", "lengths")}, indent=1))


if __name__ == "__main__":
    main()
