"""On-disk assets for end-to-end runs: a tiny model dir (weights + tokenizer) and jsonl pair files.

    python tests/run_assets.py OUT_DIR [--arch llama|qwen2] [--pairs 48]

writes OUT_DIR/model/ (save_pretrained: config, safetensors, tokenizer with a ChatML template) and
OUT_DIR/train.jsonl, OUT_DIR/eval.jsonl (conversational rows with very different lengths).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from tiny_models import tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
NUM_WORDS = 60  # w0 .. w59; a larger vocabulary (make_tokenizer(num_words)) only adds unused words
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tokenizer(num_words: int = NUM_WORDS) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: specials, "system", "user", "assistant", then w0 .. w{num_words-1}."""
    words = ["system", "user", "assistant"] + [f"w{i}" for i in range(num_words)]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>"
    )
    hf.chat_template = CHATML
    return hf


def _words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(60)}" for _ in range(n))


def make_rows(n: int, seed: int, long_every: int = 0) -> list[dict]:
    """Conversational pairs; lengths 1..40 words; every ``long_every``-th pair is far longer."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        scale = 6 if long_every and i % long_every == 0 else 1
        prompt = [{"role": "user", "content": _words(rng, rng.randint(1, 12) * scale)}]
        chosen = _words(rng, rng.choice([1, 2, rng.randint(3, 40)]) * scale)
        rejected = _words(rng, rng.choice([1, rng.randint(2, 30)]) * scale)
        if rejected == chosen:
            rejected += " w0"
        rows.append(
            {
                "chosen": prompt + [{"role": "assistant", "content": chosen}],
                "rejected": prompt + [{"role": "assistant", "content": rejected}],
            }
        )
    return rows


def skewed_rows(long_words: int = 1500, short_words: int = 40, seed: int = 0) -> list[dict]:
    """Two pairs of about equal size: a long prompt with short answers, a short prompt with long
    answers. Balanced by tokens, each rank gets one; at a 40k vocabulary (auto chunk 1024 rows) the
    first needs one lm_head chunk and the second three — the shape that hung ZeRO-3 (issue 15)."""
    rng = random.Random(seed)
    rows = []
    for prompt_words, answer_words in ((long_words, short_words), (short_words, long_words)):
        prompt = [{"role": "user", "content": _words(rng, prompt_words)}]
        rows.append({
            "chosen": prompt + [{"role": "assistant", "content": _words(rng, answer_words)}],
            "rejected": prompt + [{"role": "assistant", "content": _words(rng, answer_words - 3)}],
        })
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_assets(out: Path, arch: str = "llama", pairs: int = 48, seed: int = 0, num_words: int = NUM_WORDS) -> dict:
    """Model dir + train/eval jsonl; ``num_words`` sets the vocabulary (e.g. 40_000 for a real-sized
    lm_head, whose auto reducer chunk is then 1024 rows instead of 8192)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(num_words)
    model = tiny_model(arch, seed=seed, vocab_size=len(tokenizer))
    model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return {
        "model": str(out / "model"),
        "train": str(write_jsonl(out / "train.jsonl", make_rows(pairs, seed))),
        "eval": str(write_jsonl(out / "eval.jsonl", make_rows(max(pairs // 4, 4), seed + 1))),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--arch", default="llama")
    parser.add_argument("--pairs", type=int, default=48)
    args = parser.parse_args()
    print(json.dumps(make_assets(Path(args.out), args.arch, args.pairs)))
