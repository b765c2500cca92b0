"""Multi-node without a cluster: two torchrun "nodes" on one machine, and resuming on fewer ranks.

- Two launcher groups (``torchrun --nnodes 2 --node_rank 0|1 --nproc_per_node 1 --master_addr
  127.0.0.1``), each in its own session like two machines, rendezvous over loopback and train the
  tiny recipe with sequence parallelism across the two nodes (N = 2): every logged metric (train and
  eval, per step) and the exported weights equal those of a single-node 2-rank data-parallel run to
  1e-5 relative.
- A 2-rank checkpoint resumed on 1 rank (DeepSpeed universal checkpoint, converted on the fly)
  continues the 2-rank trajectory to 1e-5.

Every launcher group runs in its own session and is killed whole on timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_assets import make_assets
from test_distributed import free_port
from test_preemption import COMPARED, RTOL, assert_same_weights, metric_error

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
STEPS = 6


def torchrun(*launcher_args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher_args, "launch/train.py"]


def run_groups(commands: list[list[str]], logs: list[Path], timeout: int = TIMEOUT_S) -> None:
    """Start every command in its own session at once; all must exit 0 within ``timeout``."""
    # torchrun sets OMP_NUM_THREADS=1 only when it starts several ranks: the same for every run
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    procs = []
    for cmd, log in zip(commands, logs):
        with open(log, "w") as out:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    report = "\n".join(f"--- {log.name} (exit {p.returncode}):\n{log.read_text()[-4000:]}" for p, log in zip(procs, logs))
    if time.monotonic() > deadline:
        pytest.fail(f"timed out after {timeout}s (process groups killed):\n{report}")
    if any(p.returncode != 0 for p in procs):
        pytest.fail(f"a launcher group failed:\n{report}")


def records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] != "data"]


def assert_same_records(got: list[dict], expected: list[dict], skip: tuple[str, ...] = ()) -> float:
    """Same (step, split) sequence, every compared metric (but ``skip``) within RTOL: returns the max error."""
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in expected]
    worst = 0.0
    for a, b in zip(got, expected):
        for name in (n for n in COMPARED if n not in skip):
            if name in b:
                err = metric_error(name, a, b)
                assert err <= RTOL, f"step {b['step']} {b['split']} {name}: {a[name]} vs {b[name]} ({err:.1e})"
                worst = max(worst, err)
    return worst


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"), arch="llama", pairs=48)


def train_args(assets, out: Path, *extra: str) -> list[str]:
    """The tiny recipe with the test assets; checkpoints at steps 2, 4, 6 (all kept)."""
    return ["--config", "recipes/tiny_cpu.yaml", "--ds", "ds_configs/zero3.json",
            "--model_name_or_path", assets["model"], "--train_data", assets["train"], "--eval_data", assets["eval"],
            "--output_dir", str(out), "--max_steps", str(STEPS), "--eval_steps", "3", "--save_steps", "2",
            "--save_total_limit", "3", "--max_tokens_per_microbatch", "128", "--report_to", "none", *extra]


@pytest.fixture(scope="module")
def single_node(assets, tmp_path_factory):
    """One node, two ranks: the run the others must reproduce."""
    out = tmp_path_factory.mktemp("single_node")
    run_groups([torchrun("--standalone", "--nproc_per_node", "2") + train_args(assets, out)], [out / "log.txt"])
    return out


def test_two_nodes_over_loopback_equal_one_node(assets, single_node, tmp_path):
    """Under sequence parallelism (N = 2): the two nodes share every packed row, the all-to-alls cross
    the "network"; the result is the one-node data-parallel run's (the same mean loss per step)."""
    out, port = tmp_path / "two_nodes", str(free_port())
    nodes = [
        torchrun("--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
                 "--master_addr", "127.0.0.1", "--master_port", port)
        + train_args(assets, out, "--sequence_parallel_size", "2", "--attn_implementation", "sdpa_varlen")
        for rank in (0, 1)
    ]
    run_groups(nodes, [tmp_path / "node0.txt", tmp_path / "node1.txt"])
    got, expected = records(out), records(single_node)
    assert [r["step"] for r in got if r["split"] == "train"] == list(range(1, STEPS + 1))
    err = assert_same_records(got, expected, skip=("tokens/padded",))  # SP pads each row to a multiple of N
    assert all(a["tokens/real"] == b["tokens/real"] for a, b in zip(got, expected) if "tokens/real" in b)
    werr = assert_same_weights(out / "final", single_node / "final")
    assert json.loads((out / "checkpoints" / "step_6" / "COMPLETE").read_text())["world_size"] == 2
    print(f"\ntwo nodes vs one node: max relative error metrics {err:.1e}, exported weights {werr:.1e}")


def test_resume_two_rank_checkpoint_on_one_rank(assets, single_node, tmp_path):
    """The 2-rank checkpoint of step 2 resumed by a 1-rank job: converted to a universal
    checkpoint once (step_2/universal/), then steps 3-6 follow the 2-rank run."""
    out = tmp_path / "one_rank"
    shutil.copytree(single_node / "checkpoints" / "step_2", out / "checkpoints" / "step_2")
    (out / "checkpoints" / "latest").write_text("step_2")
    run_groups([torchrun("--standalone", "--nproc_per_node", "1") + train_args(assets, out, "--resume_from_checkpoint",
                                                                               "latest")], [tmp_path / "log.txt"])
    log = (tmp_path / "log.txt").read_text()
    assert "saved by 2 rank(s), loading it on 1" in log
    assert (out / "checkpoints" / "step_2" / "universal" / "COMPLETE").is_file()
    expected = [r for r in records(single_node) if r["step"] > 2]
    err = assert_same_records(records(out), expected)
    werr = assert_same_weights(out / "final", single_node / "final")
    assert json.loads((out / "checkpoints" / "step_6" / "COMPLETE").read_text())["world_size"] == 1
    print(f"\n2-rank checkpoint resumed on 1 rank: max relative error metrics {err:.1e}, weights {werr:.1e}")


def test_resume_with_another_global_batch_fails_before_loading(assets, single_node, tmp_path):
    """The data position is the step number: a changed train_batch_size is refused, naming the saved
    one, before any conversion or loading (exit 2)."""
    out = tmp_path / "other_batch"
    shutil.copytree(single_node / "checkpoints" / "step_2", out / "checkpoints" / "step_2")
    cmd = torchrun("--standalone", "--nproc_per_node", "1") + train_args(
        assets, out, "--resume_from_checkpoint", "latest", "--train_batch_size", "4")
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode != 0
    assert "was trained with train_batch_size=8" in done.stderr and "pass --train_batch_size 8" in done.stderr, done.stderr[-3000:]
    assert not (out / "checkpoints" / "step_2" / "universal").exists()
