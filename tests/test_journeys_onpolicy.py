"""On-policy journeys (issue 23, items 4, 6, 12): the paths users take through ``simpo-ds generate |
score | binarize`` must not lose data, crash or read what they did not mean. In process, tiny models.

- score: a reward model whose head looks for another pad id than its tokenizer's, one whose config
  has none, and one whose pad id is a token of every conversation: batched scores == each
  conversation scored alone, and binarize picks the same chosen / rejected.
- generate: a policy whose generation_config carries penalties (repetition, n-gram, min length,
  top-k, ...) samples exactly what the same weights with a clean generation_config sample.
- resume: a requeue where ``auto`` resolves to another backend or dtype is refused, naming each.
- outputs: no step replaces a file it did not write.
"""

from __future__ import annotations

import importlib.machinery
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from run_assets import make_assets, make_tokenizer, write_jsonl
from test_onpolicy import SAMPLING, _rows
from tiny_models import tiny_config

from simpo_ds.onpolicy import binarize, generate, score
from simpo_ds.onpolicy.prompts import prompt_id

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny policy (its generation_config clean) and 6 preference rows to take prompts from."""
    return make_assets(tmp_path_factory.mktemp("journeys-onpolicy"), pairs=6)


def reward_model(path: Path, head_pad: str | None) -> str:
    """A tiny LlamaForSequenceClassification with run_assets' ChatML tokenizer (pad ``<pad>``); its
    config.pad_token_id is the token ``head_pad`` (None: no pad id)."""
    from transformers import LlamaForSequenceClassification

    tok = make_tokenizer()
    cfg = tiny_config("llama", vocab_size=len(tok))
    cfg.num_labels = 1
    cfg.pad_token_id = None if head_pad is None else tok.convert_tokens_to_ids(head_pad)
    torch.manual_seed(5)
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def generations(path: Path) -> Path:
    """A generations.jsonl of 4 prompts x 3 answers of very different lengths (1 to 30 words)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        prompt = " ".join(f"w{j}" for j in rng.integers(0, 50, 2 + i))
        answers = [" ".join(f"w{j}" for j in rng.integers(0, 50, n)) for n in (1 + i, 12 + 3 * i, 30 - 2 * i)]
        rows.append({"prompt_id": prompt_id(prompt), "prompt": prompt,
                     "messages": [{"role": "user", "content": prompt}], "all_generated_responses": answers})
    path.mkdir(parents=True, exist_ok=True)
    write_jsonl(path / "generations.jsonl", rows)
    return path


def scores_alone(rm: str, rows: list[dict]) -> list[list[float]]:
    """Each conversation through the reward model alone: one unpadded forward each."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(rm, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(rm)
    out = []
    for row in rows:
        out.append([])
        for answer in row["all_generated_responses"]:
            text = tok.apply_chat_template(row["messages"] + [{"role": "assistant", "content": answer}], tokenize=False)
            with torch.no_grad():
                out[-1].append(model(input_ids=torch.tensor([tok(text, add_special_tokens=False)["input_ids"]]))
                               .logits[0, 0].item())
    return out


# ---------------------------------------------------------------------------------------------
# item 4: scores are read where the head looks, never at a pad position
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head_pad", ["<unk>", None, "<|im_end|>"], ids=["other-pad", "no-pad", "pad-in-text"])
def test_batched_reward_scores_equal_each_conversation_alone(tmp_path, head_pad, capsys):
    """``<unk>``: the head looks for another id than the tokenizer's ``<pad>``; None: the config has no
    pad id (transformers' head refuses a batch); ``<|im_end|>``: the pad id ends every ChatML turn."""
    rm, data = reward_model(tmp_path / "rm", head_pad), generations(tmp_path / "gen")
    assert score.main(["--data", str(data), "--reward_model", rm, "--batch_size", "6"]) == 0
    scored = _rows(data / "scored.jsonl")
    alone = scores_alone(rm, scored)
    np.testing.assert_allclose([r["all_rm_scores"] for r in scored], alone, rtol=1e-5, atol=1e-6)
    assert ("occurs inside 12 of 12 conversations" in capsys.readouterr().out) == (head_pad == "<|im_end|>")

    assert binarize.main(["--data", str(data), "--out", str(tmp_path / "pairs"), "--test_size", "0"]) == 0
    pairs = {p["prompt_id"]: p for p in _rows(tmp_path / "pairs" / "train.jsonl")}
    for row, values in zip(scored, alone, strict=True):  # the labels the conversations alone give
        answers = row["all_generated_responses"]
        assert pairs[row["prompt_id"]]["chosen"][-1]["content"] == answers[int(np.argmax(values))]
        assert pairs[row["prompt_id"]]["rejected"][-1]["content"] == answers[int(np.argmin(values))]


# ---------------------------------------------------------------------------------------------
# item 6: generate samples with temperature + top-p only, whatever the generation_config says
# ---------------------------------------------------------------------------------------------
def test_generate_ignores_the_models_sampling_penalties(assets, tmp_path):
    from transformers import GenerationConfig

    noisy = tmp_path / "noisy-policy"
    shutil.copytree(assets["model"], noisy)
    config = GenerationConfig.from_pretrained(assets["model"])  # eos and pad kept: those are honoured
    config.update(do_sample=True, temperature=0.3, top_p=0.5, top_k=3, typical_p=0.7, repetition_penalty=1.8,
                  no_repeat_ngram_size=1, min_new_tokens=8, suppress_tokens=[10, 11], bad_words_ids=[[12]],
                  max_new_tokens=2)
    config.save_pretrained(noisy)
    args = ["--prompts", assets["train"], "--backend", "transformers", *SAMPLING]
    assert generate.main(["--model", assets["model"], "--out", str(tmp_path / "clean"), *args]) == 0
    assert generate.main(["--model", str(noisy), "--out", str(tmp_path / "noisy"), *args]) == 0
    clean = (tmp_path / "clean" / "generations.jsonl").read_bytes()
    assert (tmp_path / "noisy" / "generations.jsonl").read_bytes() == clean


# ---------------------------------------------------------------------------------------------
# item 12: the resume check holds the resolved backend and dtype
# ---------------------------------------------------------------------------------------------
def gpu_machine_with_vllm(monkeypatch) -> None:
    """Make this process look like a GPU node with vLLM installed (only resolution runs: refused before)."""
    vllm = types.ModuleType("vllm")
    vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_a_requeue_that_resolves_auto_differently_is_refused(assets, tmp_path, monkeypatch, capsys):
    out = tmp_path / "gen"
    args = ["--model", assets["model"], "--prompts", assets["train"], "--out", str(out), *SAMPLING]
    with monkeypatch.context() as first_job:  # rank 0 of 2 on a CPU node: half the units, no merge
        first_job.setenv("RANK", "0")
        first_job.setenv("WORLD_SIZE", "2")
        first_job.setenv("CUDA_VISIBLE_DEVICES", "")
        assert generate.main(args) == 0
    assert not (out / "generations.jsonl").exists()

    with monkeypatch.context() as requeue:  # the requeue lands on a GPU node: auto -> vllm, bfloat16
        gpu_machine_with_vllm(requeue)
        assert generate.main(args) == 2
        err = capsys.readouterr().err
        assert "backend: 'transformers' on disk, 'vllm' now" in err
        assert "dtype: 'float32' on disk, 'bfloat16' now" in err
    assert generate.main([*args, "--dtype", "bfloat16"]) == 2  # the same, asked for by name
    assert "dtype: 'float32' on disk, 'bfloat16' now" in capsys.readouterr().err
    assert not (out / "generations.jsonl").exists()
    saved = json.loads((out / "generations.parts" / "settings.json").read_text())
    assert (saved["backend"], saved["dtype"]) == ("transformers", "float32")  # as resolved, not "auto"
    assert generate.main([*args, "--dtype", "float32", "--backend", "transformers"]) == 0  # what auto gave: resumes
    assert "1 to do here" in capsys.readouterr().out and (out / "generations.jsonl").exists()

    rm = reward_model(tmp_path / "rm", "<pad>")  # score keeps its resolved dtype too
    assert score.main(["--data", str(out), "--reward_model", rm, "--batch_size", "4"]) == 0
    with monkeypatch.context() as requeue:
        gpu_machine_with_vllm(requeue)
        assert score.main(["--data", str(out), "--reward_model", rm, "--batch_size", "4"]) == 2
    assert "dtype: 'float32' on disk, 'bfloat16' now" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# outputs: a step replaces only what it wrote itself
# ---------------------------------------------------------------------------------------------
def test_no_step_replaces_a_file_it_did_not_write(assets, tmp_path, capsys):
    data = generations(tmp_path / "gen")
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("train.jsonl", "notes.jsonl"):
        (mine / name).write_text('{"prompt": "my own data"}\n')
    rules = tmp_path / "rules.py"
    rules.write_text("def words(prompt, response):\n    return len(response.split())\n")

    assert score.main(["--data", str(data), "--scorer", f"{rules}:words", "--out", str(mine / "notes.jsonl")]) == 2
    assert "notes.jsonl exists and was not written by simpo-ds score" in capsys.readouterr().err
    assert not (mine / "notes.parts").exists()
    assert score.main(["--data", str(data), "--scorer", f"{rules}:words"]) == 0
    assert score.main(["--data", str(data), "--scorer", f"{rules}:words"]) == 0  # its own output: a rerun is fine

    assert binarize.main(["--data", str(data), "--out", str(mine)]) == 2
    assert "train.jsonl exists and was not written by simpo-ds binarize" in capsys.readouterr().err
    assert binarize.main(["--data", str(data), "--out", str(tmp_path / "pairs")]) == 0
    assert binarize.main(["--data", str(data), "--out", str(tmp_path / "pairs"), "--test_size", "1"]) == 0

    (mine / "generations.jsonl").write_text('{"prompt": "my own data"}\n')
    args = ["--model", assets["model"], "--prompts", assets["train"], "--out", str(mine), *SAMPLING]
    assert generate.main(args) == 2
    assert "generations.jsonl exists and was not written by simpo-ds generate" in capsys.readouterr().err
    assert not (mine / "generations.parts").exists()
    assert [p.read_text() for p in sorted(mine.iterdir())] == ['{"prompt": "my own data"}\n'] * 3
