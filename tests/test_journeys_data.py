"""Data journeys (issue 23, items 13, 14, 16 and faults of the same kind), from the user's side: a recipe
in the reference's shape (``dataset_mixer`` + ``dataset_splits``) or a ``train_data`` file goes through
what the trainer runs (``mixture_parts`` -> ``prepare_pairs``), rendered with a real chat template.
In process, tiny tokenizers, no model."""

from __future__ import annotations

from functools import partial

import pytest
import yaml
from run_assets import write_jsonl
from tok_utils import chatml_tokenizer, llama3_tokenizer

from simpo_ds.config import load_config
from simpo_ds.data.formats import to_canonical
from simpo_ds.data.load import TIE_REASON, load_pairs, prepare_pairs
from simpo_ds.data.mixer import mixture_parts
from simpo_ds.data.tokenize import DataError, tokenize_row

QUESTION, CHOSEN, REJECTED = "Hi a b", "Hello c", "Bye d"  # words of the tok_utils vocabulary


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def h4_row(question: str, chosen: str, rejected: str, score_chosen: float, score_rejected: float) -> dict:
    """An ultrafeedback_binarized row: string prompt, whole conversations, H4 score columns."""
    return {"prompt": question, "prompt_id": question, "chosen": [user(question), assistant(chosen)],
            "rejected": [user(question), assistant(rejected)], "messages": [user(question), assistant(chosen)],
            "score_chosen": score_chosen, "score_rejected": score_rejected}


def hh_row(question: str, chosen: str, rejected: str, score_chosen: int, score_rejected: int) -> dict:
    """An hh-rlhf row (implicit prompt) with argilla rating columns."""
    return {"chosen": f"\n\nHuman: {question}\n\nAssistant: {chosen}",
            "rejected": f"\n\nHuman: {question}\n\nAssistant: {rejected}",
            "chosen-rating": score_chosen, "rejected-rating": score_rejected}


def recipe(tmp_path, entry, splits: list[str], **keys):
    """A recipe in the reference's shape, written to tmp_path and read as ``launch/train.py`` reads it."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "unused", "dataset_mixer": {str(entry): 1.0},
                                    "dataset_splits": splits, "max_length": 64, "max_prompt_length": 32, **keys}))
    return load_config(str(path))


def trainer_data(cfg, tokenizer, kind: str = "train"):
    """What the trainer does with a ``dataset_mixer`` recipe (``SimPOTrainer._sources`` / ``_tokenize_split``)."""
    return prepare_pairs(partial(mixture_parts, cfg, kind), "dataset_mixer", tokenizer, cfg)


def occurrences(ids: list[int], sub: list[int]) -> int:
    return sum(ids[i : i + len(sub)] == sub for i in range(len(ids) - len(sub) + 1))


# ---- item 13: the data record of a dataset_mixer recipe ----------------------------------------


@pytest.mark.parametrize("drop_ties", [False, True], ids=["keep-ties", "drop-ties"])
@pytest.mark.parametrize("fmt,make_row", [("H4 ultrafeedback_binarized", h4_row), ("standard, implicit prompt", hh_row)],
                         ids=["h4", "hh-rlhf"])
def test_mixer_record_has_the_format_rows_and_ties_of_train_data(tmp_path, fmt, make_row, drop_ties):
    data = tmp_path / "prefs"
    data.mkdir()
    train = write_jsonl(data / "train_prefs.jsonl", [make_row("Hi a", "Hello b", "Bye", 8, 5),
                                                     make_row("Hi c", "Hello d", "Bye e", 7, 7)])  # one tie
    write_jsonl(data / "test_prefs.jsonl", [make_row("Hi e", "Hello f", "Bye", 9, 1)])
    cfg = recipe(tmp_path, data, ["train_prefs", "test_prefs"], drop_ties=drop_ties)
    tokenized, record, report = trainer_data(cfg, chatml_tokenizer())
    expected = {"rows": 2, "kept": 1 if drop_ties else 2, "dropped": {TIE_REASON: 1} if drop_ties else {},
                "format": fmt, "score_ties": 1, "ties_dropped": drop_ties}
    assert record == expected and len(tokenized) == expected["kept"]
    assert report["warnings"]["score ties"] == 1
    plain = load_config(None, ["--train_data", str(train), "--drop_ties", str(drop_ties).lower(),
                               "--max_length", "64", "--max_prompt_length", "32"])
    assert prepare_pairs(plain.train_data, plain.train_data, chatml_tokenizer(), plain)[1] == expected


# ---- item 14: answers-only conversations keep their prompt --------------------------------------

ANSWERS_ONLY = {"chosen": [assistant(CHOSEN)], "rejected": [assistant(REJECTED)]}
SHAPES = {
    "string prompt, answers only": dict(ANSWERS_ONLY, prompt=QUESTION),
    "message prompt, answers only": dict(ANSWERS_ONLY, prompt=[user(QUESTION)]),
    "string prompt, whole conversations (H4)": {"prompt": QUESTION, "chosen": [user(QUESTION), assistant(CHOSEN)],
                                                "rejected": [user(QUESTION), assistant(REJECTED)]},
    "ShareGPT, string prompt, answers only": {"prompt": QUESTION, "chosen": [{"from": "gpt", "value": CHOSEN}],
                                              "rejected": [{"from": "gpt", "value": REJECTED}]},
}


@pytest.mark.parametrize("make_tokenizer", [chatml_tokenizer, llama3_tokenizer], ids=["chatml", "llama3"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_answers_only_rows_train_with_the_question_as_the_user_turn(tmp_path, shape, make_tokenizer):
    data = tmp_path / "prefs"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [SHAPES[shape]])
    tokenizer = make_tokenizer()
    cfg = recipe(tmp_path, data, ["train", "test"])
    tokenized, record, _ = trainer_data(cfg, tokenizer)
    pair = tokenized[0]
    prompt_ids = pair["chosen_input_ids"][: pair["chosen_prompt_len"]]
    question = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    assert occurrences(prompt_ids, question) == 1  # there, and not doubled
    assert tokenizer.convert_ids_to_tokens(prompt_ids).count("user") == 1
    explicit = {"prompt": [user(QUESTION)], "chosen": [assistant(CHOSEN)], "rejected": [assistant(REJECTED)]}
    want = tokenize_row(explicit, tokenizer, cfg)
    assert {k: pair[k] for k in want if k != "drop_reason"} == {k: v for k, v in want.items() if k != "drop_reason"}
    assert record["kept"] == 1


def test_a_prompt_that_resolves_to_nothing_names_the_file_and_row(tmp_path):
    data = tmp_path / "prefs"
    data.mkdir()
    write_jsonl(data / "train.jsonl", [SHAPES["string prompt, answers only"], dict(ANSWERS_ONLY, prompt=" ")])
    cfg = recipe(tmp_path, data, ["train"])
    with pytest.raises(DataError, match=r"prefs:train: bad rows: empty prompt.* in 1 row\(s\), e\.g\. row\(s\) \[1\]"):
        trainer_data(cfg, chatml_tokenizer())
    # a standard row with an empty prompt string is the user's own choice: trained, but warned and counted
    standard = write_jsonl(tmp_path / "standard.jsonl", [{"prompt": "", "chosen": "a", "rejected": "b"}])
    _, record, report = prepare_pairs(str(standard), str(standard), chatml_tokenizer(), cfg)
    assert record["kept"] == 1 and report["warnings"]["empty 'prompt'"] == {"count": 1, "rows": [0]}


# ---- item 16: score columns -------------------------------------------------------------------


def test_scores_are_read_for_ties_and_not_kept(tmp_path):
    path = str(write_jsonl(tmp_path / "uf.jsonl", [h4_row("Hi a", "Hello b", "Bye", 7, 7),
                                                    h4_row("Hi c", "Hello d", "Bye", 8, 2)]))
    ds, info = to_canonical(load_pairs(path), path)
    assert ds.column_names == ["prompt", "chosen", "rejected"]  # as the module docstring says
    assert (info["rows"], info["ties"], info["tie_rows"], info["ties_dropped"]) == (2, 1, [0], False)


# ---- faults of the same kind --------------------------------------------------------------------


def test_rows_named_in_errors_are_file_rows_when_ties_are_dropped(tmp_path):
    def row(question_chosen, question_rejected, scores):
        return {"chosen": [user(question_chosen), assistant("a")], "rejected": [user(question_rejected), assistant("b")],
                "chosen-rating": scores[0], "rejected-rating": scores[1]}

    path = str(write_jsonl(tmp_path / "t.jsonl", [row("Hi", "Hi", (2, 2)), row("Hello", "Hello", (3, 1)),
                                                   row("Hi", "Hello", (3, 1))]))  # a tie, a pair, a bad row
    cfg = load_config(None, ["--drop_ties", "true"])
    with pytest.raises(DataError, match=r"t\.jsonl: bad rows: conversational prompt mismatch.*row\(s\) \[2\]"):
        prepare_pairs(path, path, chatml_tokenizer(), cfg)


def test_mixer_reads_exactly_the_named_split_and_never_guesses(tmp_path):
    """A local copy of ultrafeedback_binarized: train_prefs / train_sft / test_prefs files."""
    data = tmp_path / "uf"
    (data / "data").mkdir(parents=True)
    write_jsonl(data / "data" / "train_prefs-00000-of-00001.jsonl", [h4_row("Hi a", "Hello b", "Bye", 8, 5)])
    write_jsonl(data / "data" / "train_sft-00000-of-00001.jsonl", [{"messages": [user("Hi"), assistant("a")]}])
    write_jsonl(data / "data" / "test_prefs-00000-of-00001.jsonl", [h4_row("Hi c", "Hello d", "Bye", 8, 5)] * 2)
    cfg = recipe(tmp_path, data, ["train_prefs", "test_prefs"])
    assert [(name.rsplit(":", 1)[1], len(ds)) for name, ds in mixture_parts(cfg, "train")] == [("train_prefs", 1)]
    assert trainer_data(cfg, chatml_tokenizer(), "test")[1]["rows"] == 2
    with pytest.raises(DataError, match=r"split 'train': no file train\.jsonl.*train_prefs-00000-of-00001\.jsonl"):
        mixture_parts(recipe(tmp_path, data, ["train", "test"]), "train")


def test_mixer_file_entry_is_training_data_and_never_a_hub_lookup(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [h4_row("Hi a", "Hello b", "Bye", 8, 5)])
    cfg = recipe(tmp_path, path, ["train", "test"])
    assert trainer_data(cfg, chatml_tokenizer())[1]["rows"] == 1
    with pytest.raises(DataError, match=r"no entry has a test split.*file entries are training data only"):
        mixture_parts(cfg, "test")
    with pytest.raises(DataError, match=r"'\./missing\.jsonl': no such file or directory"):
        mixture_parts(recipe(tmp_path, "./missing.jsonl", ["train"]), "train")
