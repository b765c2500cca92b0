"""Faults: NaN on one rank, repeated NaN aborts naming the pairs, determinism of a seeded run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from run_assets import make_assets
from test_distributed import COMMON, ROOT, free_port, read_metrics

pytestmark = pytest.mark.distributed


def launch_env(args: list[str], env: dict, ranks: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
           str(free_port()), "tests/dist_worker.py", *args]
    full_env = dict(os.environ, WANDB_MODE="disabled", **env)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        pytest.fail(f"timed out after {timeout}s; process group killed")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("rel_assets"), pairs=48)


def args_for(assets, out, *extra):
    return ["--model_name_or_path", assets["model"], "--train_data", assets["train"], "--output_dir", str(out),
            "--ds", "ds_configs/zero3.json", "--max_tokens_per_microbatch", "128", "--save_final", "false",
            *COMMON, *extra]


def test_nan_on_one_rank_skips_the_step_everywhere(assets, tmp_path):
    """Rank 1's first layer returns NaN during step 2: every rank skips that update (DeepSpeed sees
    a non-finite global grad norm), the schedule does not advance, the pairs are recorded, and
    training goes on with finite steps 3-4."""
    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    assert launch_env(args_for(assets, clean, "--max_steps", "4"), {}).returncode == 0
    result = launch_env(args_for(assets, faulty, "--max_steps", "4"),
                        {"SIMPO_TEST_NAN_STEPS": "2", "SIMPO_TEST_NAN_RANK": "1"})
    assert result.returncode == 0, result.stdout[-4000:]
    records = {r["step"]: r for r in read_metrics(faulty)}
    reference = {r["step"]: r for r in read_metrics(clean)}
    assert records[1]["loss"] == pytest.approx(reference[1]["loss"], rel=1e-6)
    assert records[2]["loss"] is None and records[2]["skipped"] == 1.0
    assert all(records[s]["loss"] is not None and records[s]["skipped"] == 0.0 for s in (3, 4))
    assert records[3]["lr"] == pytest.approx(reference[2]["lr"], rel=1e-9)  # schedule held back one step
    bad = [json.loads(line) for line in (faulty / "nonfinite_steps.jsonl").read_text().splitlines()]
    assert [b["step"] for b in bad] == [2] and len(bad[0]["pair_ids"]) == 8 and bad[0]["update_applied"] is False


def test_repeated_nan_aborts_naming_the_step_and_pairs(assets, tmp_path):
    out = tmp_path / "abort"
    result = launch_env(args_for(assets, out, "--max_steps", "6", "--max_nonfinite_steps", "2"),
                        {"SIMPO_TEST_NAN_STEPS": "2,3,4,5,6", "SIMPO_TEST_NAN_RANK": "0"})
    assert result.returncode != 0
    assert "2 consecutive non-finite steps (last: step 3)" in result.stdout
    assert str(out / "nonfinite_steps.jsonl") in result.stdout
    assert [r["step"] for r in read_metrics(out)] == [1, 2]  # step 3 raised before logging


def test_same_seed_same_losses(assets, tmp_path):
    """Two runs with the same seed: identical pack plans and losses, step by step."""
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        result = subprocess.run([sys.executable, "launch/train.py", *args_for(assets, out, "--max_steps", "3")],
                                cwd=ROOT, env=dict(os.environ, WANDB_MODE="disabled"), capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append([(r["step"], r["loss"], r["tokens/real"]) for r in read_metrics(out)])
    assert runs[0] == runs[1] and len(runs[0]) == 3


def test_stuck_rank_becomes_an_error_not_a_hang(assets, tmp_path):
    """Rank 1 stops responding: rank 0's next collective fails after collective_timeout_s and the
    job exits non-zero (the launcher then stops the stuck rank) instead of hanging forever."""
    import time

    start = time.monotonic()
    result = launch_env(args_for(assets, tmp_path / "stuck", "--max_steps", "2", "--collective_timeout_s", "20"),
                        {"SIMPO_TEST_HANG_RANK": "1"}, timeout=240)
    assert result.returncode != 0
    assert time.monotonic() - start < 200
    assert "timed out" in result.stdout.lower() or "timeout" in result.stdout.lower(), result.stdout[-3000:]
    # the message says which rank and what it was doing (rank 1 sleeps before the optimizer step)
    assert "CollectiveError: rank 0 at train step 1, optimizer step: a collective failed" in result.stdout, \
        result.stdout[-3000:]
    assert "collective_timeout_s=20s" in result.stdout
