"""Packed == padded reference end to end from TEXT, through the real tokenizer and truncation.

Rows go through ``tokenize_dataset`` (chat template, BOS/EOS, truncation: keep_end / keep_start, the
prompt cut to max_prompt_length, answers cut to max_length - max_prompt_length -- EOS included --,
1-token answers), then through the packed path (plan, collate_packed, SimPOPolicy, chunked reducer,
step-normalised loss) and the reference padded computation: per-sequence log-probs, every metric and
every gradient must agree (tests/reference.py, relative 1e-5).
"""

from __future__ import annotations

import datasets
import pytest
from reference import reference_step
from run_assets import make_tokenizer
from test_packed_equivalence import check_equivalence, packed_step
from tiny_models import tiny_model

from simpo_ds.config import SimPOConfig
from simpo_ds.data.load import tokenize_dataset
from simpo_ds.data.tokenize import tokenize_row

TOKENIZER = make_tokenizer()  # WordLevel "w0".."w59" + ChatML specials; BOS <s>, EOS <|im_end|>
PAIR_KEYS = ("chosen_input_ids", "chosen_prompt_len", "rejected_input_ids", "rejected_prompt_len")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def words(start: int, stop: int) -> str:
    return " ".join(f"w{i % 60}" for i in range(start, stop))


def conversation(prompt: str, chosen: str, rejected: str) -> dict:
    user = {"role": "user", "content": prompt}
    return {
        "chosen": [user, {"role": "assistant", "content": chosen}],
        "rejected": [user, {"role": "assistant", "content": rejected}],
    }


def tokenize(rows: list[dict], cfg: SimPOConfig) -> list[dict]:
    """``tokenize_dataset`` over the rows (nothing dropped); it must agree with ``tokenize_row``."""
    tokenized, stats = tokenize_dataset(datasets.Dataset.from_list(rows), TOKENIZER, cfg)
    assert stats["kept"] == len(rows), stats
    pairs = [{k: row[k] for k in PAIR_KEYS} for row in tokenized]
    assert pairs == [{k: tokenize_row(row, TOKENIZER, cfg)[k] for k in PAIR_KEYS} for row in rows]
    return pairs


def answer_len(p: dict, side: str) -> int:
    return len(p[f"{side}_input_ids"]) - p[f"{side}_prompt_len"]


# Reference chat mode renders the prompt as [<s>] + 7 template tokens + its words (9 tokens for 2
# words) and each answer alone as <|im_start|> assistant words <|im_end|> (words + 3 tokens).
TRUNCATION_ROWS = [
    conversation(words(0, 2), words(10, 12), words(20, 21)),  # 9 + 5 <= 24: untouched
    conversation(words(0, 15), words(30, 31), words(40, 42)),  # 22 + 5 > 24: prompt cut to 12
    conversation(words(0, 15), words(10, 30), words(30, 44)),  # prompt cut to 12, answers to 12 (no EOS)
    conversation(words(3, 5), words(5, 30), words(40, 41)),  # short prompt, chosen cut to 12
    conversation(words(7, 8), words(8, 9), words(50, 53)),  # 2-token prompt words, short answers
]


@pytest.mark.parametrize("mode, arch", [("keep_end", "llama"), ("keep_start", "qwen2")])
def test_truncated_pairs_packed_equals_padded(mode, arch):
    cfg = SimPOConfig(max_length=24, max_prompt_length=12, truncation_mode=mode)
    pairs = tokenize(TRUNCATION_ROWS, cfg)
    bos, eos = TOKENIZER.bos_token_id, TOKENIZER.eos_token_id
    # the truncation paths this test is about really ran:
    assert [p["chosen_prompt_len"] for p in pairs] == [9, 12, 12, 9, 8]
    assert [(answer_len(p, "chosen"), answer_len(p, "rejected")) for p in pairs] == [
        (5, 4), (4, 5), (12, 12), (12, 4), (4, 6)]
    assert pairs[2]["chosen_input_ids"][-1] != eos and pairs[3]["chosen_input_ids"][-1] != eos  # EOS cut
    assert all(len(p[f"{s}_input_ids"]) <= cfg.max_length for p in pairs for s in ("chosen", "rejected"))
    assert all((p["chosen_input_ids"][0] == bos) == (mode == "keep_start" or i in (0, 3, 4))
               for i, p in enumerate(pairs))  # keep_end drops the BOS of a cut prompt, keep_start keeps it
    model = tiny_model(arch, seed=5, vocab_size=len(TOKENIZER))
    check_equivalence(model, pairs, max_tokens=64, sft_weight=0.2)  # several micro-batches


def test_one_token_answers_packed_equals_padded():
    """Answers of exactly one token: cut to max_length - max_prompt_length = 1 (generation-prompt
    chat mode, so that token is the answer's first word), and an answer that is EOS alone."""
    cfg = SimPOConfig(max_length=14, max_prompt_length=13, chat_template_mode="generation_prompt")
    rows = [
        conversation(words(0, 4), words(10, 12), words(20, 25)),
        conversation(words(1, 2), words(3, 9), words(9, 10)),
    ]
    pairs = tokenize(rows, cfg)
    standard = [{"prompt": words(0, 3), "chosen": "<|im_end|>", "rejected": " " + words(4, 6)}]
    pairs += tokenize(standard, SimPOConfig(max_length=14, max_prompt_length=13))
    assert [(answer_len(p, "chosen"), answer_len(p, "rejected")) for p in pairs] == [(1, 1), (1, 1), (1, 3)]
    assert pairs[0]["chosen_input_ids"][-1] != pairs[0]["rejected_input_ids"][-1]  # two different tokens
    assert pairs[2]["chosen_input_ids"][-1] == TOKENIZER.eos_token_id
    model = tiny_model("llama", seed=6, vocab_size=len(TOKENIZER))
    check_equivalence(model, pairs, max_tokens=40, sft_weight=0.3)
    check_equivalence(model, pairs, max_tokens=40, loss_type="hinge")


def test_policy_exact_even_when_model_config_use_cache_is_true(monkeypatch):
    """transformers builds the block-causal mask of a packed row from position_ids only without a
    cache: SimPOPolicy must pass use_cache=False itself, whatever model.config.use_cache says.
    Checked both ways: exact with it, and a body call without it lets sequences attend to each other."""
    cfg = SimPOConfig(max_length=24, max_prompt_length=12)
    pairs = tokenize(TRUNCATION_ROWS, cfg)
    model = tiny_model("llama", seed=7, vocab_size=len(TOKENIZER))
    model.config.use_cache = True
    check_equivalence(model, pairs, max_tokens=64)

    body = model.get_decoder()
    forward = body.forward
    monkeypatch.setattr(body, "forward", lambda *args, use_cache=None, **kw: forward(*args, **kw))
    _, ref_logps, _ = reference_step(model, pairs)
    logps, _ = packed_step(model, pairs, max_tokens=10_000, beta=2.0, gamma_beta_ratio=0.25)
    err = ((logps - ref_logps).abs() / ref_logps.abs()).max().item()
    assert err > 1e-3, "a body call without use_cache=False should break packing: the check lost its teeth"
