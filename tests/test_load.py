"""Loading, validating and tokenizing preference datasets (simpo_ds/data/load.py)."""

import json
from types import SimpleNamespace

import datasets
import pytest
from tok_utils import chatml_tokenizer, word_tokenizer

from simpo_ds.data import load as load_mod
from simpo_ds.data.load import DataError, load_pairs, tokenize_dataset, validate_columns

ROWS = [
    {"prompt": "a b", "chosen": " c", "rejected": " d"},
    {"prompt": "e", "chosen": " f g", "rejected": " h"},
    {"prompt": "i j", "chosen": " a", "rejected": " b"},
]
CONV_ROW = {
    "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bye"}],
}


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "hf_cache")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg(**kw):
    base = dict(
        max_length=16,
        max_prompt_length=8,
        truncation_mode="keep_end",
        chat_template_mode="reference",
        auto_insert_empty_system_msg=True,
        strict=False,
    )
    return SimpleNamespace(**{**base, **kw})


# ---- load_pairs ----------------------------------------------------------------------------------


def test_load_jsonl(tmp_path, cache):
    ds = load_pairs(str(write_jsonl(tmp_path / "t.jsonl", ROWS)), cache_dir=cache)
    assert ds.to_list() == ROWS


def test_load_json_array(tmp_path, cache):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(ROWS))
    assert load_pairs(str(path), cache_dir=cache).to_list() == ROWS


def test_load_parquet(tmp_path, cache):
    path = tmp_path / "t.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    assert load_pairs(str(path), cache_dir=cache).to_list() == ROWS


def test_load_directory_concatenates_files_in_name_order(tmp_path, cache):
    write_jsonl(tmp_path / "part-0.jsonl", ROWS[:2])
    write_jsonl(tmp_path / "part-1.jsonl", ROWS[2:])
    (tmp_path / "README.md").write_text("ignored")
    assert load_pairs(str(tmp_path), cache_dir=cache).to_list() == ROWS


def test_load_conversational_jsonl(tmp_path, cache):
    ds = load_pairs(str(write_jsonl(tmp_path / "c.jsonl", [CONV_ROW])), cache_dir=cache)
    assert ds[0]["chosen"] == CONV_ROW["chosen"]


def test_missing_file_names_the_path(tmp_path):
    path = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=f"{path}: no such file or directory"):
        load_pairs(path)


def test_empty_directory_is_an_error(tmp_path):
    with pytest.raises(DataError, match="directory holds no"):
        load_pairs(str(tmp_path))


def test_unsupported_suffix_is_an_error(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError, match=r"t\.csv: unsupported file type '\.csv'"):
        load_pairs(str(path))


def test_hub_spec_splits_name_and_split(monkeypatch):
    calls = []
    monkeypatch.setattr(load_mod.datasets, "load_dataset", lambda name, **kw: calls.append((name, kw["split"])))
    load_pairs("org/prefs:test_prefs")
    load_pairs("org/prefs")
    assert calls == [("org/prefs", "test_prefs"), ("org/prefs", "train")]


def test_hub_failure_names_the_spec(monkeypatch):
    def offline(name, **kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(load_mod.datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"'org/prefs:train'.*hub failed \(ConnectionError: no network\)"):
        load_pairs("org/prefs:train")


# ---- validate_columns ----------------------------------------------------------------------------


def test_validate_clean_dataset():
    report = validate_columns(datasets.Dataset.from_list(ROWS), "t.jsonl")
    assert report == {"source": "t.jsonl", "rows": 3, "format": "standard", "warnings": {}}


def test_missing_column_names_it_and_lists_present():
    ds = datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "other": "c"}])
    with pytest.raises(DataError) as err:
        validate_columns(ds, "t.jsonl")
    assert str(err.value) == "t.jsonl: missing column 'rejected' (columns present: ['prompt', 'chosen', 'other'])"


def test_missing_chosen_column_is_named():
    ds = datasets.Dataset.from_list([{"prompt": "a", "response": "b", "rejected": "c"}])
    with pytest.raises(DataError, match=r"missing column 'chosen' \(columns present: \['prompt', 'response', 'rejected'\]\)"):
        validate_columns(ds, "t.jsonl")


def test_prompt_column_required_for_standard_rows():
    ds = datasets.Dataset.from_list([{"chosen": "b", "rejected": "c"}])
    with pytest.raises(DataError, match="missing column 'prompt'"):
        validate_columns(ds, "t.jsonl")


def test_conversational_rows_need_no_prompt_column():
    report = validate_columns(datasets.Dataset.from_list([CONV_ROW]), "c.jsonl")
    assert report["format"] == "conversational" and report["warnings"] == {}


def test_warnings_count_rows_and_quote_indices():
    rows = ROWS + [
        {"prompt": "a", "chosen": " x", "rejected": " x"},
        {"prompt": "a", "chosen": "", "rejected": " y"},
        {"prompt": "a", "chosen": " z", "rejected": " z"},
    ]
    report = validate_columns(datasets.Dataset.from_list(rows), "t.jsonl")
    assert report["warnings"] == {
        "chosen == rejected": {"count": 2, "rows": [3, 5]},
        "empty 'chosen'": {"count": 1, "rows": [4]},
    }


def test_non_string_field_is_fatal_with_row_indices():
    rows = ROWS + [{"prompt": "a", "chosen": None, "rejected": " y"}]
    with pytest.raises(DataError, match=r"t\.jsonl: bad rows: non-string 'chosen' in 1 row\(s\), e\.g\. row\(s\) \[3\]"):
        validate_columns(datasets.Dataset.from_list(rows), "t.jsonl")


def test_conversational_prompt_mismatch_is_fatal():
    bad = dict(CONV_ROW, rejected=[{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "Bye"}])
    ds = datasets.Dataset.from_list([CONV_ROW, bad, bad])
    with pytest.raises(DataError, match=r"prompt mismatch: 'rejected'\[:-1\].* in 2 row\(s\), e\.g\. row\(s\) \[1, 2\]"):
        validate_columns(ds, "c.jsonl")


# ---- tokenize_dataset ----------------------------------------------------------------------------


def test_tokenize_dataset_keeps_index_and_ids():
    out, stats = tokenize_dataset(datasets.Dataset.from_list(ROWS), word_tokenizer(), cfg())
    assert stats == {"rows": 3, "kept": 3, "dropped": {}}
    assert sorted(out.column_names) == [
        "chosen_input_ids", "chosen_prompt_len", "index", "rejected_input_ids", "rejected_prompt_len",
    ]
    # row 1: prompt "e" -> [BOS, 14]; chosen " f g" -> [15, 16, EOS]
    assert out[1] == {
        "chosen_input_ids": [1, 14, 15, 16, 2],
        "chosen_prompt_len": 2,
        "rejected_input_ids": [1, 14, 17, 2],
        "rejected_prompt_len": 2,
        "index": 1,
    }


def test_rows_with_empty_answers_are_dropped_and_counted():
    # max_prompt_length == max_length (the reference NaNs here): an answer that does not fit is cut
    # to 5 - 5 = 0 tokens. Rows 0 and 2 have 3 prompt + 2 answer tokens = 5 and fit; row 1 has
    # [BOS, 14] + [15, 16, 17, 18, EOS] = 7 > 5, so both its answers become empty: dropped.
    rows = [ROWS[0], {"prompt": "e", "chosen": " f g h i", "rejected": " j"}, ROWS[2]]
    out, stats = tokenize_dataset(datasets.Dataset.from_list(rows), word_tokenizer(), cfg(max_length=5, max_prompt_length=5))
    assert stats == {"rows": 3, "kept": 2, "dropped": {"empty chosen answer after truncation": 1}}
    assert out["index"] == [0, 2]


def test_strict_makes_a_dropped_row_an_error():
    rows = [ROWS[0], {"prompt": "e", "chosen": " f g h i", "rejected": " j"}]
    with pytest.raises(DataError, match=r"row 1: empty chosen answer after truncation \(strict=true; 1 row"):
        tokenize_dataset(datasets.Dataset.from_list(rows), word_tokenizer(), cfg(max_length=5, max_prompt_length=5, strict=True))


def test_tokenize_dataset_conversational_names_bad_row():
    bad = dict(CONV_ROW, rejected=[{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "Bye"}])
    with pytest.raises(DataError, match=r"row 1: conversational prompt mismatch"):
        tokenize_dataset(datasets.Dataset.from_list([CONV_ROW, bad]), chatml_tokenizer(), cfg())


def test_tokenize_dataset_from_file_uses_the_datasets_cache(tmp_path, cache):
    ds = load_pairs(str(write_jsonl(tmp_path / "t.jsonl", ROWS)), cache_dir=cache)
    first, _ = tokenize_dataset(ds, word_tokenizer(), cfg())
    again, _ = tokenize_dataset(ds, word_tokenizer(), cfg(beta=5.0))  # non-tokenizing field: same key
    assert first.cache_files == again.cache_files and first.cache_files
    other, _ = tokenize_dataset(ds, word_tokenizer(), cfg(max_length=4))
    assert other.cache_files != first.cache_files
