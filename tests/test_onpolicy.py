"""On-policy data (issue 19): generate -> score -> binarize -> train, on tiny random models.

- prompts: loaded from a preference set, deduplicated, keyed by sha256, rendered token for token as
  training renders the prompt before an answer (both chat_template_modes).
- generate: a fixed seed gives the same answers from 1 process, from 2 ranks under the deepspeed
  launcher, and from a run SIGKILLed after its first batch and rerun (no duplicate, none missing);
  other settings into the same directory are refused.
- score: a tiny LlamaForSequenceClassification's batched, padded scores == a direct forward of each
  rendered conversation alone; the ``--scorer file.py:function`` path; a non-finite score is refused.
- binarize: hand-built scores -> the expected chosen/rejected, dropped ties / identical answers,
  seeded split, report; bad rows name file, row and key; the input is never overwritten.
- end to end: the binarized directory trains with launch/train.py and a reference-style recipe
  (``dataset_mixer: {DIR: 1.0}``, ``dataset_splits: [train, test]``), unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from run_assets import make_assets, make_tokenizer, write_jsonl
from test_distributed import ROOT, launch
from tiny_models import tiny_config

from simpo_ds.data.tokenize import DataError, encode_prompt, render_generation_prompt, tokenize_row
from simpo_ds.onpolicy import binarize, generate, score
from simpo_ds.onpolicy.generate import EXIT_AFTER_UNITS
from simpo_ds.onpolicy.prompts import load_prompts, prompt_id

SAMPLING = ["--num_samples", "3", "--max_new_tokens", "8", "--batch_size", "4", "--seed", "7"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")


def cli(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "simpo_ds.cli", *args], cwd=ROOT, env=env or ENV,
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        pytest.fail(f"simpo-ds {args[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def onpolicy(tmp_path_factory):
    """A tiny policy, a tiny reward model (same tokenizer, pad token set), 12 prompts, and their
    generations from one process."""
    root = tmp_path_factory.mktemp("onpolicy")
    assets = make_assets(root / "assets", pairs=12)
    tok = make_tokenizer()
    cfg = tiny_config("llama", vocab_size=len(tok))
    cfg.num_labels, cfg.pad_token_id = 1, tok.pad_token_id
    torch.manual_seed(3)
    from transformers import LlamaForSequenceClassification

    LlamaForSequenceClassification(cfg).save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    one = root / "gen-1proc"
    cli("generate", "--model", assets["model"], "--prompts", assets["train"], "--out", str(one), *SAMPLING)
    return {**assets, "root": root, "rm": str(root / "rm"), "one": one}


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------
def test_prompts_are_deduplicated_keyed_and_checked(tmp_path):
    rows = [{"prompt": "w1 w2", "chosen": "a", "rejected": "b"}, {"prompt": "w3", "chosen": "c", "rejected": "d"},
            {"prompt": "w1 w2", "chosen": "e", "rejected": "f"}]
    prompts = load_prompts(str(write_jsonl(tmp_path / "p.jsonl", rows)))
    by_hash = sorted(["w1 w2", "w3"], key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    assert [p["prompt"] for p in prompts] == by_hash
    assert prompts[0]["prompt_id"] == hashlib.sha256(prompts[0]["prompt"].encode()).hexdigest()  # UltraFeedback's id
    conversational = [{"chosen": [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}],
                       "rejected": [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w4"}]}]
    (same,) = load_prompts(str(write_jsonl(tmp_path / "c.jsonl", conversational)))
    assert same["prompt"] == "w1 w2" and same["prompt_id"] == prompt_id("w1 w2")  # one user turn: its string
    with pytest.raises(DataError, match=r"e.jsonl: row 1: empty 'prompt'"):
        load_prompts(str(write_jsonl(tmp_path / "e.jsonl", [{"prompt": "w1"}, {"prompt": " "}])))
    with pytest.raises(DataError, match=r"no 'prompt', 'messages' or 'chosen' column"):
        load_prompts(str(write_jsonl(tmp_path / "n.jsonl", [{"question": "w1"}])))


@pytest.mark.parametrize("mode", ["reference", "generation_prompt"])
def test_generation_prompt_is_what_training_puts_before_the_answer(mode):
    """The ids generate samples after == the ids training puts before the answer's content."""
    tok = make_tokenizer()
    messages = [{"role": "user", "content": "w1 w2 w3"}]
    row = {"chosen": messages + [{"role": "assistant", "content": "w4 w5"}],
           "rejected": messages + [{"role": "assistant", "content": "w6"}]}
    settings = Namespace(max_length=64, max_prompt_length=32, truncation_mode="keep_end", chat_template_mode=mode,
                         auto_insert_empty_system_msg=True)
    trained = tokenize_row(row, tok, settings)["chosen_input_ids"]
    ids = encode_prompt(tok, render_generation_prompt(tok, messages, auto_insert_empty_system_msg=True))
    assert ids[0] == tok.bos_token_id and tok.convert_ids_to_tokens(ids[1:3]) == ["<|im_start|>", "system"]
    assert trained[: len(ids)] == ids and trained[len(ids) : len(ids) + 2] == tok.convert_tokens_to_ids(["w4", "w5"])


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------
def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.distributed
def test_generate_is_the_same_on_1_or_2_ranks_and_after_a_kill(onpolicy):
    one, args = onpolicy["one"], ["--model", onpolicy["model"], "--prompts", onpolicy["train"], *SAMPLING]
    rows = _rows(one / "generations.jsonl")
    assert [r["prompt_id"] for r in rows] == [p["prompt_id"] for p in load_prompts(onpolicy["train"])]  # all, sorted
    assert all(len(r["all_generated_responses"]) == 3 for r in rows)
    assert sum(len(set(r["all_generated_responses"])) > 1 for r in rows) >= len(rows) - 1  # sampled, not greedy

    two = onpolicy["root"] / "gen-2ranks"
    _, out = launch("launch/generate.py", [*args, "--out", str(two)], ranks=2)
    assert "rank 1/2" in out
    assert (two / "generations.jsonl").read_bytes() == (one / "generations.jsonl").read_bytes()

    killed = onpolicy["root"] / "gen-killed"
    first = cli("generate", *args, "--out", str(killed), env=dict(ENV, **{EXIT_AFTER_UNITS: "1"}), check=False)
    assert first.returncode == -9 and not (killed / "generations.jsonl").exists()
    assert len(list((killed / "generations.parts" / "units").glob("*.jsonl"))) == 1
    again = cli("generate", *args, "--out", str(killed))
    assert "2 to do here" in again.stdout  # the batch on disk is skipped
    assert (killed / "generations.jsonl").read_bytes() == (one / "generations.jsonl").read_bytes()



def test_generate_reruns_and_refusals(onpolicy, capsys):
    """In process: a finished directory has nothing to do; other settings or greedy sampling are refused."""
    one, args = onpolicy["one"], ["--model", onpolicy["model"], "--prompts", onpolicy["train"], *SAMPLING]
    before = (one / "generations.jsonl").read_bytes()
    assert generate.main([*args, "--out", str(one)]) == 0
    assert "0 to do here" in capsys.readouterr().out and (one / "generations.jsonl").read_bytes() == before
    assert generate.main([*[a if a != "7" else "8" for a in args], "--out", str(one)]) == 2
    assert "seed: 7 on disk, 8 now" in capsys.readouterr().err
    assert generate.main([*args, "--temperature", "0", "--out", str(one)]) == 2
    assert "--temperature 0.0: sampling needs a temperature > 0" in capsys.readouterr().err
    assert generate.main([*args, "--num_samples", "1", "--out", str(one)]) == 2
    assert "preference pairs need at least 2 answers" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# score
# ---------------------------------------------------------------------------------------------
def test_reward_model_scores_equal_a_direct_forward(onpolicy, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "scored.jsonl"
    score.run(score.parser().parse_args(["--data", str(onpolicy["one"]), "--reward_model", onpolicy["rm"],
                                         "--batch_size", "5", "--out", str(out)]))
    model = AutoModelForSequenceClassification.from_pretrained(onpolicy["rm"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(onpolicy["rm"])
    got, expected = [], []
    for row in _rows(out):
        for answer, value in zip(row["all_generated_responses"], row["all_rm_scores"], strict=True):
            text = tok.apply_chat_template(row["messages"] + [{"role": "assistant", "content": answer}], tokenize=False)
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                expected.append(model(input_ids=ids).logits[0, 0].item())
            got.append(value)
    assert len(got) == 36 and len(set(len(a) for r in _rows(out) for a in r["all_generated_responses"])) > 1
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_score_output_and_pad_free_scoring(onpolicy):
    """``output.score`` (ArmoRM's custom head) is read when the model returns one; without a pad token
    conversations are scored one at a time, to the same values."""
    from types import SimpleNamespace

    rm = score.RewardModel(onpolicy["rm"], "float32", 0, trust_remote_code=False)
    batch = [rm.encode([{"role": "user", "content": "w1"}, {"role": "assistant", "content": answer}])
             for answer in ("w2", "w3 w4")]
    padded = rm.scores(batch)
    rm.pad = None
    assert rm.scores(batch) == pytest.approx(padded, rel=1e-5, abs=1e-6)
    inner = rm.model
    rm.model = lambda **kw: SimpleNamespace(score=inner(**kw).logits[:, 0] * 2 + 1, logits=torch.zeros(len(batch), 19))
    assert rm.scores(batch) == pytest.approx([2 * v + 1 for v in padded], rel=1e-5)
    rm.model = lambda **kw: SimpleNamespace(logits=torch.zeros(len(batch), 3))
    with pytest.raises(DataError, match="its head has 3 labels and no 'score' output"):
        rm.scores(batch)


def test_scorer_function_and_its_refusals(onpolicy, tmp_path, capsys):
    rules = tmp_path / "rules.py"
    rules.write_text("def words(prompt, response):\n    return len(response.split())\n\n"
                     "def broken(prompt, response):\n    return float('nan')\n")
    out = tmp_path / "words.jsonl"
    assert score.main(["--data", str(onpolicy["one"]), "--scorer", f"{rules}:words", "--out", str(out)]) == 0
    for row in _rows(out):
        assert row["all_rm_scores"] == [float(len(a.split())) for a in row["all_generated_responses"]]
    assert score.main(["--data", str(onpolicy["one"]), "--scorer", f"{rules}:broken", "--out",
                       str(tmp_path / "nan.jsonl")]) == 2
    assert "answer 0: the score nan is not a finite number" in capsys.readouterr().err
    generations = onpolicy["one"] / "generations.jsonl"
    assert score.main(["--data", str(onpolicy["one"]), "--scorer", f"{rules}:words", "--out", str(generations)]) == 2
    assert "is the input file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    first = generations.read_text().splitlines()[0]
    bad.write_text(first + "\n" + json.dumps({"prompt_id": "x", "messages": []}) + "\n")
    assert score.main(["--data", str(bad), "--scorer", f"{rules}:words"]) == 2
    assert "bad.jsonl: row 1: 'messages' must be a list" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# binarize
# ---------------------------------------------------------------------------------------------
def scored_row(i: int, answers: list[str], scores: list[float]) -> dict:
    prompt = f"w{i}"
    return {"prompt_id": prompt_id(prompt), "prompt": prompt, "messages": [{"role": "user", "content": prompt}],
            "all_generated_responses": answers, "all_rm_scores": scores}


def test_binarize_picks_best_and_worst_drops_ties_and_splits(tmp_path):
    special = [scored_row(0, ["a", "b", "c"], [0.1, 0.9, 0.5]),  # chosen b, rejected a
               scored_row(1, ["a", "b", "c"], [0.9, 0.9, 0.1]),  # a tie for best: the first, a
               scored_row(2, ["a", "b", "c"], [0.5, 0.5, 0.5]),  # all tied: dropped
               scored_row(3, ["x", "x", "x"], [0.1, 0.2, 0.3]),  # identical answers: dropped
               scored_row(4, ["a", "b", "a"], [0.9, 0.5, 0.1]),  # best and worst are one text: dropped
               scored_row(5, ["", "b"], [0.9, 0.1])]  # empty best: dropped
    rows = special + [scored_row(i, ["short", "a longer answer"], [float(i), 0.0]) for i in range(6, 14)]
    data = tmp_path / "scored.jsonl"
    write_jsonl(data, rows)
    before = data.read_bytes()
    stats = binarize.run(binarize.parser().parse_args(["--data", str(tmp_path), "--out", str(tmp_path / "out"),
                                                       "--test_size", "0.3", "--seed", "3"]))
    assert data.read_bytes() == before
    train, test = _rows(tmp_path / "out" / "train.jsonl"), _rows(tmp_path / "out" / "test.jsonl")
    pairs = {p["prompt"]: p for p in train + test}
    assert sorted(pairs) == sorted(["w0", "w1"] + [f"w{i}" for i in range(6, 14)])
    assert pairs["w0"]["chosen"][-1]["content"] == "b" and pairs["w0"]["rejected"][-1]["content"] == "a"
    assert pairs["w1"]["chosen"] == [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "a"}]
    assert pairs["w1"]["rejected"][-1]["content"] == "c" and pairs["w1"]["score_rejected"] == 0.1
    assert stats["dropped"] == {binarize.TIED: 1, binarize.IDENTICAL: 1, binarize.SAME_TEXT: 1, binarize.EMPTY: 1}
    # the split: a seeded permutation of the kept rows in prompt_id order, 30% to test
    kept = sorted(pairs.values(), key=lambda p: p["prompt_id"])
    chosen = set(np.random.default_rng(3).permutation(len(kept))[:3].tolist())
    assert [p["prompt_id"] for p in test] == [p["prompt_id"] for i, p in enumerate(kept) if i in chosen]
    assert [p["prompt_id"] for p in train] == sorted(p["prompt_id"] for p in train)
    assert stats["chosen_longer_fraction"] == 0.0 and stats["rejected_words_mean"] > stats["chosen_words_mean"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "dropped, all scores tied: 1" in report and "chosen is the longer answer in 0% of pairs" in report
    assert (tmp_path / "out" / "margins.png").stat().st_size > 1000


@pytest.mark.parametrize("row,message", [
    ({"all_rm_scores": None}, "row 1: 'all_rm_scores' must be a list of 2 numbers"),
    ({"all_rm_scores": [0.1]}, "row 1: 'all_rm_scores' must be a list of 2 numbers"),
    ({"all_rm_scores": [0.1, float("nan")]}, "row 1: 'all_rm_scores'[1] = nan is not a finite number"),
    ({"all_generated_responses": ["one"], "all_rm_scores": [0.1]},
     "row 1: 'all_generated_responses' must be a list of at least 2"),
    ({"prompt_id": None}, "row 1: missing or non-string 'prompt_id'"),
])
def test_binarize_names_the_bad_row_and_key(tmp_path, row, message, capsys):
    data = tmp_path / "scored.jsonl"
    write_jsonl(data, [scored_row(0, ["a", "b"], [1.0, 0.0]), {**scored_row(1, ["a", "b"], [1.0, 0.0]), **row}])
    assert binarize.main(["--data", str(data), "--out", str(tmp_path / "out")]) == 2
    assert f"scored.jsonl: {message}" in capsys.readouterr().err
    assert not (tmp_path / "out" / "train.jsonl").exists()


def test_binarize_refuses_to_overwrite_its_input(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    write_jsonl(data, [scored_row(0, ["a", "b"], [1.0, 0.0]), scored_row(1, ["a", "b"], [1.0, 0.0])])
    before = data.read_bytes()
    assert binarize.main(["--data", str(data), "--out", str(tmp_path)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err and data.read_bytes() == before


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------
@pytest.mark.distributed
def test_generate_score_binarize_then_train(onpolicy, tmp_path):
    """The chain on the 1-process generations (score on 2 ranks == 1 process), then one training step
    + eval with a recipe in the reference's format naming the binarized directory."""
    work = tmp_path / "gen"
    work.mkdir()
    (work / "generations.jsonl").write_bytes((onpolicy["one"] / "generations.jsonl").read_bytes())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "launch/score.py"]
    done = subprocess.run([*torchrun, "--data", str(work), "--reward_model", onpolicy["rm"], "--batch_size", "4"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "rank 1/2" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    alone = tmp_path / "alone.jsonl"  # the same batches in one process: sharding changes no score
    score.run(score.parser().parse_args(["--data", str(work), "--reward_model", onpolicy["rm"], "--batch_size", "4",
                                         "--out", str(alone)]))
    assert (work / "scored.jsonl").read_bytes() == alone.read_bytes()
    assert binarize.main(["--data", str(work), "--out", str(tmp_path / "pairs"), "--test_size", "2"]) == 0
    kept = len(_rows(tmp_path / "pairs" / "train.jsonl"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model_name_or_path: {onpolicy['model']}\ntorch_dtype: float32\nattn_implementation: sdpa\n"
                      f"dataset_mixer:\n  {tmp_path / 'pairs'}: 1.0\ndataset_splits:\n- train\n- test\n"
                      f"max_length: 128\nmax_prompt_length: 64\nper_device_train_batch_size: 4\n"
                      f"gradient_accumulation_steps: 1\nlearning_rate: 1.0e-3\nmax_steps: 1\neval_on_start: true\n"
                      f"logging_steps: 1\noutput_dir: {tmp_path / 'run'}\nsave_final: false\n")
    proc = subprocess.run([sys.executable, "launch/train.py", str(recipe)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    data = {r["split_name"]: r for r in records if r["split"] == "data"}
    assert data["train"]["kept"] == kept and data["eval"]["kept"] == 2
    (step,) = [r for r in records if r["split"] == "train"]
    assert step["step"] == 1 and np.isfinite(step["loss"])
    assert [r["step"] for r in records if r["split"] == "eval"] == [0, 1]  # on start and at the end
