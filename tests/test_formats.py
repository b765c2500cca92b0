"""The preference-data formats people have (issue 16): each, written in its own shape, gives the same
tokenized pairs and the same metrics as the same pairs in the explicit format; bad rows name the
file, the row and the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from reference import reference_step
from run_assets import make_tokenizer
from tiny_models import tiny_model

from simpo_ds.config import SimPOConfig
from simpo_ds.data.formats import extract_prompt, to_canonical
from simpo_ds.data.load import load_pairs, tokenize_dataset, validate_columns
from simpo_ds.data.tokenize import DataError
from simpo_ds.trainer import PairData

QA = [("w1 w2 w3", "w4 w5", "w6"), ("w7", "w8 w9 w10 w11", "w8 w12"), ("w13 w14", "w15", "w16 w17 w18")]


def write(tmp_path: Path, name: str, rows: list[dict]) -> str:
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def pairs_of(path: str, cfg=None) -> tuple[list[dict], str]:
    raw, info = to_canonical(load_pairs(path), path)
    validate_columns(raw, path)
    tokenized, _ = tokenize_dataset(raw, make_tokenizer(), cfg or SimPOConfig(max_length=64, max_prompt_length=32))
    return PairData(tokenized).pairs(range(len(tokenized))), info["format"]


def metrics_of(pairs) -> dict:
    with torch.no_grad():
        return reference_step(tiny_model(vocab_size=len(make_tokenizer())), pairs)[2]


def conversational_rows():
    return [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for q, c, r in QA]


def test_sharegpt_and_h4_binarized_equal_the_explicit_conversational_format(tmp_path):
    explicit, fmt = pairs_of(write(tmp_path, "explicit", conversational_rows()))
    assert fmt == "conversational"
    sharegpt = [{"chosen": [{"from": "human", "value": q}, {"from": "gpt", "value": c}],
                 "rejected": [{"from": "human", "value": q}, {"from": "gpt", "value": r}]} for q, c, r in QA]
    h4 = [{"prompt": q, "prompt_id": str(i), "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": c}],
           "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": r}],
           "score_chosen": 8.0, "score_rejected": 5.0 + i} for i, (q, c, r) in enumerate(QA)]
    for name, rows, expected_format in (("sharegpt", sharegpt, "ShareGPT"), ("h4", h4, "H4 ultrafeedback_binarized")):
        got, fmt = pairs_of(write(tmp_path, name, rows))
        assert fmt == expected_format and got == explicit, name
        assert metrics_of(got) == metrics_of(explicit)


def test_hh_rlhf_implicit_prompt_equals_explicit_and_keeps_shared_first_words(tmp_path):
    rows = [{"chosen": f"\n\nHuman: {q}\n\nAssistant: {c}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {r}"}
            for q, c, r in QA]
    explicit = [{"prompt": f"\n\nHuman: {q}\n\nAssistant:", "chosen": f" {c}", "rejected": f" {r}"} for q, c, r in QA]
    got, fmt = pairs_of(write(tmp_path, "hh", rows))
    want, _ = pairs_of(write(tmp_path, "hh_explicit", explicit))
    assert fmt == "standard, implicit prompt" and got == want
    assert metrics_of(got) == metrics_of(want)
    # pair 1's answers both begin with "w8": it stays in both answers, not in the prompt
    assert extract_prompt(rows[1]["chosen"], rows[1]["rejected"]) == "\n\nHuman: w7\n\nAssistant:"
    w8 = make_tokenizer().convert_tokens_to_ids("w8")
    for key in ("chosen", "rejected"):
        assert got[1][f"{key}_input_ids"][got[1][f"{key}_prompt_len"]] == w8


def test_whitespace_fallback_never_splits_a_word():
    assert extract_prompt("Q: say it A: fourteen", "Q: say it A: four") == "Q: say it A: "
    assert extract_prompt("abc", "abd") is None


def test_ties_are_counted_and_dropped_on_request(tmp_path):
    rows = [{"prompt": q, "chosen": c, "rejected": r, "chosen-rating": 4, "rejected-rating": 4 if i else 2}
            for i, (q, c, r) in enumerate(QA)]
    path = write(tmp_path, "argilla", rows)
    kept, info = to_canonical(load_pairs(path), path)
    assert (len(kept), info["ties"], info["scores"]) == (3, 2, "argilla chosen-rating/rejected-rating")
    dropped, info = to_canonical(load_pairs(path), path, drop_ties=True)
    assert len(dropped) == 1 and info["ties_dropped"] and dropped[0]["chosen"] == QA[0][1]


@pytest.mark.parametrize(
    "rows,message",
    [
        ([{"chosen": [{"from": "human", "value": "w1"}, {"from": "gpt"}], "rejected": [{"from": "gpt", "value": "w2"}]}],
         r"sharegpt\.jsonl: row 0: chosen\[1\] must have 'from' and 'value'"),
        ([{"chosen": [{"from": "human", "value": "w1"}], "rejected": [{"from": "robot", "value": "w2"}]}],
         r"row 0: rejected\[0\]\['from'\] is 'robot'"),
        ([{"chosen": "\n\nHuman: w1\n\nAssistant: w2", "rejected": "\n\nHuman: w1\n\nAssistant: w3"},
          {"chosen": "w5 w6", "rejected": 7}], r"row 1: 'rejected' must be a string, got int"),
        ([{"chosen": "a", "rejected": "b"}], r"row 0: 'chosen' and 'rejected' share no prompt prefix"),
        ([{"prompt": "w1", "chosen": "w2", "rejected": "w3", "score_chosen": 1.0, "score_rejected": "high"}],
         r"row 0: 'score_rejected' must be a number, got 'high'"),
        ([{"prompt": "w1", "chosen": "w2"}], r"missing column 'rejected'"),
        ([{"prompt": "w1", "chosen": 3, "rejected": "w3"}], r"row 0: 'chosen' must be a string or a non-empty list"),
    ],
    ids=["sharegpt-missing-value", "sharegpt-bad-role", "implicit-wrong-type", "implicit-no-prefix", "bad-score",
         "missing-column", "chosen-not-text"],
)
def test_bad_rows_name_file_row_and_key(tmp_path, rows, message):
    path = write(tmp_path, "sharegpt", rows)
    with pytest.raises(DataError, match=message) as info:
        to_canonical(load_pairs(path), path)
    assert path in str(info.value)
