"""The benchmark code paths at toy size (seconds), so ``bench/`` cannot rot silently.

Full runs: ``python -m bench.throughput`` and ``python -m bench.reducer_memory`` (bench/RESULTS.md).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import make_data, reducer_memory  # noqa: E402

TOY_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}


def test_make_data_is_seeded_and_ultrafeedback_shaped(tmp_path):
    a = make_data.build(tmp_path / "a", pairs=400, scale=8, model_shape=TOY_MODEL)
    rows = make_data.make_rows(make_data.scale_lengths(make_data.uf_like_lengths(400, 0), 8), 0, 1000)
    assert rows == make_data.make_rows(make_data.scale_lengths(make_data.uf_like_lengths(400, 0), 8), 0, 1000)
    assert make_data.build(tmp_path / "a", pairs=400, scale=8, model_shape=TOY_MODEL) == a  # cached
    full = a["lengths_full_scale"]
    assert 120 <= full["prompt"]["median"] <= 180 and full["prompt"]["max"] <= 1000  # long tail, capped
    assert 250 <= full["chosen"]["median"] <= 350 and full["chosen"]["min"] >= 50 and full["chosen"]["max"] <= 1500
    scaled = a["lengths"]["uf_like"]
    assert scaled["chosen"]["median"] == pytest.approx(full["chosen"]["median"] / 8, abs=2)
    long_prompt = a["lengths"]["long_prompt"]
    assert 3 <= long_prompt["prompt"]["median"] / scaled["chosen"]["median"] <= 5
    # one word = one token, answers start with a space: ids are exactly the generated lengths
    tok = make_data.make_tokenizer()
    row = json.loads((tmp_path / "a" / "uf_like.jsonl").read_text().splitlines()[0])
    ids = tok(row["prompt"] + row["chosen"], add_special_tokens=False)["input_ids"]
    assert len(ids) == len(row["prompt"].split()) + len(row["chosen"].split()) and tok.unk_token_id not in ids
    assert len(tok) == make_data.VOCAB_SIZE


def test_throughput_toy_run_agrees_on_the_first_loss(tmp_path):
    systems = "packed,padded" + (",trl" if importlib.util.find_spec("trl") else "")
    cmd = [sys.executable, "-m", "bench.throughput", "--toy", "--inline", "--systems", systems,
           "--data-dir", str(tmp_path / "data"), "--run-dir", str(tmp_path / "runs"), "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "TRL_EXPERIMENTAL_SILENCE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "| simpo-ds packed (`sdpa_varlen`, the CPU default) |" in out and "| simpo-ds padded" in out
    assert "max difference" in out and "same step-1 pairs in every run: True" in out
    assert "first-step loss agrees across systems to 1e-4" in out and "**met**; same step-1" in out
    assert "pack efficiency ≥ 98% on the UltraFeedback-like set: 100.0%" in out


def test_reducer_memory_case_and_report():
    full = reducer_memory.measure("full", vocab=500, tokens=128, hidden=8)
    chunked = reducer_memory.measure("chunked", vocab=500, tokens=128, chunk=32, hidden=8)
    assert full["grad_ok"] and chunked["grad_ok"]
    for row in (full, chunked):
        row["k"] = 4.0
    skipped = {"method": "full", "vocab": 128_256, "tokens": 8192, "chunk": 0, "k": 4.0,
               "skipped_need_bytes": 4 * 8192 * 128_256 * 4, "available_bytes": 2**33}
    target_chunk = {**chunked, "vocab": 128_256, "tokens": 8192, "peak_bytes": 2**30}
    env = {"cpu": "x", "cores": 2, "memory_gib": 1, "python": "3", "commit": "c", "date": "d", "load_avg": "0",
           **{name: "0" for name in ("torch", "transformers", "deepspeed", "trl", "datasets", "peft")}}
    text = reducer_memory.report([full, chunked, skipped, target_chunk], (("chunked", 32),), 16.0, env)
    assert "skipped (would need 15.7 GiB; 8.0 GiB available)" in text
    assert "chunked 32: 6.4% — **met**" in text


def test_gpu_check_dry_run_runs_every_phase(tmp_path):
    """``python -m bench.gpu_check --dry-run``: the GPU check's every phase at toy shapes on CPU, so
    a lent GPU machine is never spent on a script that has not run."""
    result = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                            env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    phases = json.loads((tmp_path / "RESULTS_gpu.json").read_text())["phases"]
    assert set(phases) == {"exact", "throughput", "reducer"} and not any("error" in p for p in phases.values())
    exact = phases["exact"]["result"]
    assert exact["pass"] and exact["fp32"]["logps"] < 1e-4 and exact["zero3_step"]["rel_error"] < 1e-5
    assert phases["throughput"]["result"]["ratios"]["packed_vs_padded"] > 0
    assert (tmp_path / "RESULTS_gpu.md").is_file()
