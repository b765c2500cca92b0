"""Fast tests of the demo tools: data generator, verifier, plots/report, length statistics.

No model is loaded: the tokenizer is the tiny ChatML word tokenizer of tests/run_assets.py.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from run_assets import make_rows, make_tokenizer, write_jsonl

from simpo_ds import plot, stats
from simpo_ds.demo import eval_prompts, follows_instruction, locate_gguf, prefers, wants_one_word, word_count

REPO = Path(__file__).resolve().parents[1]


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO / "scripts" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- data generator and verifier ---------------------------------------------------------------
def test_verifier():
    assert word_count("Rome.") == 1 and word_count("cock-a-doodle-doo!") == 1 and word_count(" ... ") == 0
    assert word_count("The capital of Italy is Rome.") == 6
    asked = "Answer in one word. What color is snow?"
    assert wants_one_word(asked) and not wants_one_word("What color is snow?")
    assert follows_instruction(asked, "White.") and not follows_instruction(asked, "Snow is white.")
    assert follows_instruction("What color is snow?", "Snow is white.")
    assert not follows_instruction("What color is snow?", "White.")
    assert not follows_instruction(asked, "")  # an empty answer never counts


def test_prefers():
    asked = "What color is snow? Answer in one word."
    assert prefers(asked, "white", "White.", "Snow is white.")  # format
    assert prefers(asked, "white", "White.", "Black.")  # right word
    assert not prefers(asked, "white", "Black.", "White.") and not prefers(asked, "white", "White.", "White!")
    assert prefers("What color is snow?", "white", "Snow is white.", "White.")
    assert not prefers("What color is snow?", "white", "Snow is black.", "White.")


def test_generator_is_deterministic_and_verifiable():
    gen = _load_generator()
    train, evals = gen.make_splits(seed=0)
    assert (train, evals) == gen.make_splits(seed=0)
    assert gen.make_splits(seed=1)[0] != train
    assert (len(train), len(evals)) == (224, 60)
    for row in train + evals:
        prompt = row["chosen"][0]["content"]
        assert row["chosen"][:-1] == row["rejected"][:-1]
        assert [m["role"] for m in row["chosen"]] == ["user", "assistant"]
        chosen, rejected = row["chosen"][-1]["content"], row["rejected"][-1]["content"]
        assert follows_instruction(prompt, chosen)
        assert not follows_instruction(prompt, rejected)
    # both kinds, balanced: "always terse" / "never terse" score 50%
    for rows in (train, evals):
        asked = sum(wants_one_word(r["chosen"][0]["content"]) for r in rows)
        assert asked == len(rows) // 2


def test_eval_questions_are_held_out():
    gen = _load_generator()
    train, evals = gen.make_splits(seed=0)

    def question(row):  # the prompt without the instruction
        text = row["chosen"][0]["content"]
        for instruction in gen.ONE_WORD_INSTRUCTIONS:
            text = text.replace(instruction, "")
        return text.strip()

    assert not {question(r) for r in train} & {question(r) for r in evals}


def test_committed_data_matches_generator(tmp_path):
    """data/demo/*.jsonl are what the script writes (regenerate with scripts/make_demo_data.py)."""
    gen = _load_generator()
    gen.main(["--out", str(tmp_path)])
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_text() == (REPO / "data" / "demo" / name).read_text()
    assert len(eval_prompts(tmp_path / "eval.jsonl")) == len((tmp_path / "eval.jsonl").read_text().splitlines())


def test_locate_gguf_names_the_install_command():
    with pytest.raises(FileNotFoundError, match="pip install"):
        locate_gguf("surely_not_an_installed_package_xyz")


# ---- plots and report ----------------------------------------------------------------------
def _metrics_file(path: Path) -> Path:
    records = [
        {"step": 0, "split": "data", "time": 100.0, "split_name": "train", "rows": 8, "kept": 8, "dropped": {}},
        {"step": 0, "split": "eval", "time": 101.0, "loss": 1.0, "rewards/accuracies": 0.5, "rewards/margins": 0.0,
         "logps/chosen": -2.0, "logps/rejected": -2.0},
    ]
    for step in (1, 2, 3):
        records.append({"step": step, "split": "train", "time": 101.0 + step, "epoch": step / 3, "loss": 1.0 / step,
                        "rewards/accuracies": 0.5 + 0.1 * step, "rewards/margins": 0.2 * step,
                        "logps/chosen": -2.0 + 0.1 * step, "logps/rejected": -2.0 - 0.1 * step,
                        "tokens_per_s": 100.0, "lr": 1e-5})
    records.append({"step": 3, "split": "eval", "time": 110.0, "loss": 0.3, "rewards/accuracies": 0.9,
                    "rewards/margins": 1.5, "logps/chosen": -1.8, "logps/rejected": -2.5})
    lines = [json.dumps(r) for r in records]
    # a resumed run appends: step 3 again (wins), a non-finite value logged as null, a torn last line
    lines.append(json.dumps({"step": 3, "split": "train", "time": 120.0, "loss": 0.25, "rewards/accuracies": None,
                             "tokens_per_s": 90.0}))
    lines.append('{"step": 4, "split": "tr')
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_metrics_last_record_per_step_wins(tmp_path):
    metrics = plot.read_metrics(_metrics_file(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in metrics["train"]] == [1, 2, 3]
    assert metrics["train"][-1]["loss"] == 0.25
    assert [r["step"] for r in metrics["eval"]] == [0, 3]
    assert plot.series(metrics["train"], "rewards/accuracies") == ([1, 2], [0.6, 0.7])  # null skipped
    assert len(metrics["data"]) == 1


def test_make_report_writes_pngs_and_markdown(tmp_path):
    _metrics_file(tmp_path / "metrics.jsonl")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("beta: 2.5\nlearning_rate: 1.0e-5\n")
    out = plot.make_report(tmp_path, recipe=str(recipe), title="t")
    names = sorted(p.name for p in out["plots"])
    assert names == ["accuracy.png", "logps.png", "loss.png", "margins.png", "overview.png", "throughput.png"]
    for path in out["plots"]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    report = out["report"].read_text()
    assert "| `rewards/accuracies` | 0.5 | 0.9 |" in report  # base (step 0) vs last eval
    assert "![accuracy](plots/accuracy.png)" in report
    assert "| `beta` | `2.5` |" in report


def test_plot_main_errors_without_metrics(tmp_path, capsys):
    assert plot.main([str(tmp_path)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().out


# ---- stats -------------------------------------------------------------------------------------
def test_percentile_table():
    table = stats.percentile_table({"x": np.arange(1, 101)}, percentiles=(50, 100))
    assert table.splitlines()[-1] == "| x | 50.5 | 50 | 100 |"


def test_padded_and_packed_cost():
    chosen, rejected = np.array([10, 2, 10, 2]), np.array([4, 4, 4, 4])
    padded = stats.padded_cost(chosen, rejected, batch_size=4)
    assert padded == {"real": 40, "processed": 80, "efficiency": 0.5}  # 8 rows x 10
    packed = stats.packed_cost(chosen + rejected, train_batch_size=4, world_size=2, max_tokens=100)
    assert packed["real"] == 40 and packed["filler"] == 0 and packed["micro_batches_per_step"] == 1
    assert packed["efficiency"] == pytest.approx(40 / (2 * 20))  # ranks balanced 20/20


def test_stats_report_counts_truncation(tmp_path):
    tok_dir = tmp_path / "tok"
    make_tokenizer().save_pretrained(tok_dir)
    data = write_jsonl(tmp_path / "pairs.jsonl", make_rows(24, seed=0, long_every=6))
    png = tmp_path / "hist.png"
    args = [str(data), "--tokenizer", str(tok_dir), "--png", str(png), "--batch_size", "4", "--world_size", "2"]
    assert stats.main(args + ["--max_length", "1000", "--max_prompt_length", "900"]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    cfg = stats._settings(stats.argparse.Namespace(
        config=None, max_length=40, max_prompt_length=30, chat_template_mode=None, truncation_mode=None,
        max_tokens_per_microbatch=None, train_batch_size=None, auto_insert_empty_system_msg=None))
    report = stats.build_report(str(data), str(tok_dir), cfg, batch_size=4, world_size=2, png=None)
    truncated = int(report.split("| truncated | ")[1].split(" |")[0])
    assert 0 < truncated < 24  # the long rows (every 6th) are cut, the short ones are not
    assert "| padded, 4 pairs / micro-batch |" in report


def test_generation_section_scores_with_the_verifier():
    from simpo_ds.demo import generation_section, mentions

    assert mentions("The capital of Hungary is Budapest.", "budapest") and not mentions("Budapesti.", "budapest")
    expected = {"Answer in one word. What is the capital of Italy?": "rome", "What is the capital of Italy?": "rome"}
    outputs = {"base": ["The capital of Italy is Rome.", "The capital of Italy is Rome."],
               "trained": ["Rome.", "Italy's capital is Milan."]}
    text = "\n".join(generation_section(expected, outputs))
    assert "| asking for one word | 0/1 | 1/1 |" in text
    assert "| plain | 1/1 | 1/1 |" in text and "| all | 1/2 | 2/2 |" in text
    assert "base 2/2, trained 1/2" in text
