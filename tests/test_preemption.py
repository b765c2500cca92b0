"""Preemption: SIGTERM / SIGUSR1 stop the run cleanly, a killed save never breaks ``latest``, and every
resumed trajectory equals the uninterrupted one.

The runs use the real launcher (``deepspeed --num_gpus 2``, ZeRO-3, CPU/gloo) on
``tests/preempt_worker.py`` (the real entry point; test-only knobs slow the steps down or hang a
save). Signals go to the training ranks themselves, found in the launcher's process tree. Metrics
are compared per step with those of an uninterrupted run to 1e-5 relative, and so are the exported
weights. Every launch runs in its own session and is killed whole on timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from run_assets import make_assets

from simpo_ds.cli import EXIT_CHECKPOINT, EXIT_PREEMPTED
from simpo_ds.engine import COMPLETE, CheckpointError, resolve_checkpoint, verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]
WORKER = "tests/preempt_worker.py"
TIMEOUT_S = 300
RTOL = 1e-5
STEPS = 8
# metrics that do not depend on timing
COMPARED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "logits/chosen", "logits/rejected", "grad_norm", "lr", "tokens/real", "tokens/padded")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
class Launch:
    """``deepspeed --num_gpus N WORKER args`` in its own session (log in a file)."""

    def __init__(self, args: list[str], log: Path, ranks: int = 2, **env: str):
        from test_distributed import free_port

        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(free_port()), WORKER, *args]
        self.log = log
        full_env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1", **env)
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.deadline = time.monotonic() + TIMEOUT_S

    def ranks(self) -> dict[int, psutil.Process]:
        """The training processes (not the launchers), by local rank."""
        found = {}
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                cmdline = child.cmdline()
            except psutil.NoSuchProcess:
                continue
            if WORKER in cmdline and "deepspeed.launcher.launch" not in cmdline:
                rank = next(a for a in cmdline if a.startswith("--local_rank=")).split("=")[1]
                found[int(rank)] = child
        return found

    def signal_ranks(self, sig: int, ranks: tuple[int, ...] = (0, 1)) -> None:
        procs = self.ranks()
        assert set(ranks) <= procs.keys(), f"training ranks not found: {procs}"
        for rank in ranks:
            procs[rank].send_signal(sig)

    def wait_until(self, condition, what: str) -> None:
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended (exit {self.proc.returncode}) before {what}:\n{self.tail()}")
            if time.monotonic() > self.deadline:
                self.kill()
                pytest.fail(f"timed out waiting for {what}:\n{self.tail()}")
            time.sleep(0.2)

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=max(self.deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"launch timed out after {TIMEOUT_S}s (process group killed):\n{self.tail()}")

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def tail(self) -> str:
        return self.log.read_text()[-6000:]


def train_records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["split"] == "train"]


def logged_step(out: Path) -> int:
    records = train_records(out)
    return records[-1]["step"] if records else 0


def metric_error(name: str, got: dict, ref: dict) -> float:
    """|got - ref| / |ref|; a margin (a difference of two rewards of ~8 that nearly cancel, summed in
    fp32) is measured on the scale of the rewards, as its rounding error is."""
    scale = abs(ref[name])
    if name == "rewards/margins":
        scale = max(scale, abs(ref["rewards/chosen"]), abs(ref["rewards/rejected"]))
    return abs(got[name] - ref[name]) / max(scale, 1e-6)


def assert_same_trajectory(records: list[dict], reference: list[dict]) -> float:
    """Records cover steps 1..STEPS once each and equal the reference's: returns the max error."""
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), [r["step"] for r in records]
    worst = 0.0
    for got, ref in zip(records, reference):
        for name in COMPARED:
            err = metric_error(name, got, ref)
            assert err <= RTOL, f"step {got['step']} {name}: {got[name]} vs {ref[name]} (relative error {err:.1e})"
            worst = max(worst, err)
    return worst


def assert_same_weights(final: Path, reference_final: Path) -> float:
    from safetensors.torch import load_file

    got, ref = load_file(final / "model.safetensors"), load_file(reference_final / "model.safetensors")
    assert got.keys() == ref.keys()
    worst = 0.0
    for name, tensor in ref.items():
        err = ((got[name] - tensor).abs().max() / tensor.abs().max().clamp_min(1e-12)).item()
        assert err <= RTOL, f"exported {name}: relative error {err:.1e}"
        worst = max(worst, err)
    return worst


def checkpoint_info(out: Path) -> tuple[str, dict]:
    root = out / "checkpoints"
    tag = (root / "latest").read_text().strip()
    return tag, json.loads((root / tag / COMPLETE).read_text())


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"), arch="llama", pairs=48)


def args_for(assets, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", assets["model"], "--train_data", assets["train"], "--output_dir", str(out),
            "--ds", "ds_configs/zero3.json", "--train_batch_size", "8", "--max_length", "128",
            "--max_prompt_length", "64", "--max_tokens_per_microbatch", "128", "--learning_rate", "1e-3",
            "--max_steps", str(STEPS), "--logging_steps", "1", "--report_to", "none", *extra]


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    """8 steps on 2 ranks in one go (48 pairs, 8 per step: the second epoch starts at step 7)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run = Launch(args_for(assets, out), out / "log.txt")
    assert run.wait() == 0, run.tail()
    return {"records": train_records(out), "final": out / "final"}


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------
@pytest.mark.distributed
def test_sigterm_and_sigusr1_stop_cleanly_and_resume_equals_uninterrupted(assets, uninterrupted, tmp_path):
    """SIGTERM to every rank mid-run -> exit 3 with a complete checkpoint; resume; SIGUSR1 to ONE
    rank (the other learns it through the step's all-reduce) -> exit 3 again; resume to the end.
    The three runs together log exactly the uninterrupted run's steps and export the same weights."""
    out = tmp_path / "run"
    slow = {"SIMPO_TEST_STEP_DELAY": "1.0"}

    first = Launch(args_for(assets, out), tmp_path / "log1.txt", **slow)
    first.wait_until(lambda: logged_step(out) >= 2, "step 2")
    first.signal_ranks(signal.SIGTERM)
    assert first.wait() == EXIT_PREEMPTED, first.tail()
    tag, marker = checkpoint_info(out)
    stopped_at = logged_step(out)
    assert tag == f"step_{stopped_at}" and (marker["step"], marker["world_size"]) == (stopped_at, 2)
    assert marker["files"] and all(size > 0 for size in marker["files"].values())  # what loading verifies
    assert 2 <= stopped_at < STEPS
    assert not (out / "final").exists()
    assert "stopped by signal SIGTERM" in first.tail()

    second = Launch(args_for(assets, out, "--resume_from_checkpoint", "latest"), tmp_path / "log2.txt", **slow)
    second.wait_until(lambda: logged_step(out) >= stopped_at + 1, f"step {stopped_at + 1}")
    second.signal_ranks(signal.SIGUSR1, ranks=(1,))
    assert second.wait() == EXIT_PREEMPTED, second.tail()
    tag, marker = checkpoint_info(out)
    stopped_again = logged_step(out)
    assert tag == f"step_{stopped_again}" and stopped_at < stopped_again < STEPS
    assert "resumed from" in second.tail() and "stopped by signal (on another rank)" in second.tail()

    third = Launch(args_for(assets, out, "--resume_from_checkpoint", "auto"), tmp_path / "log3.txt")
    assert third.wait() == 0, third.tail()

    err = assert_same_trajectory(train_records(out), uninterrupted["records"])
    werr = assert_same_weights(out / "final", uninterrupted["final"])
    print(f"\nstopped after steps {stopped_at} and {stopped_again}; max relative error: metrics {err:.1e}, "
          f"exported weights {werr:.1e}")


@pytest.mark.distributed
def test_kill_during_save_keeps_latest_on_the_previous_checkpoint(assets, uninterrupted, tmp_path):
    """SIGKILL the whole job while DeepSpeed is writing step 4: ``latest`` still names step 2, the
    half-written step_4.partial/ is ignored, and resuming from it reaches the uninterrupted result."""
    out = tmp_path / "run"
    run = Launch(args_for(assets, out, "--save_steps", "2"), tmp_path / "log1.txt", SIMPO_TEST_HANG_SAVE="4")
    run.wait_until(lambda: (out / "HANGING_IN_SAVE").exists(), "the hang in the save of step 4")
    run.kill()

    root = out / "checkpoints"
    assert (root / "latest").read_text() == "step_2"
    assert (root / "step_2" / COMPLETE).is_file()
    assert (root / "step_4.partial").is_dir() and not (root / "step_4.partial" / COMPLETE).exists()
    assert not (root / "step_4").exists()
    assert resolve_checkpoint(root, "auto") == root / "step_2"

    resumed = Launch(args_for(assets, out, "--save_steps", "2", "--resume_from_checkpoint", "auto"),
                     tmp_path / "log2.txt")
    assert resumed.wait() == 0, resumed.tail()
    assert "resumed from" in resumed.tail() and "step_2 at step 2" in resumed.tail()
    assert not (root / "step_4.partial").exists()
    # steps 1-4 were logged before the kill, 3-8 after resuming from step 2
    records = train_records(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 3, 4, 5, 6, 7, 8]
    err = assert_same_trajectory(records[:2] + records[4:], uninterrupted["records"])
    werr = assert_same_weights(out / "final", uninterrupted["final"])
    print(f"\nmax relative error after the killed save: metrics {err:.1e}, exported weights {werr:.1e}")


@pytest.fixture(scope="module")
def disk_full_run(assets, tmp_path_factory):
    """Checkpoints every 2 steps; rank 1's disk is full when step 6 is saved (half a file, ENOSPC)."""
    out = tmp_path_factory.mktemp("disk_full") / "run"
    run = Launch(args_for(assets, out, "--save_steps", "2"), out.parent / "log.txt", SIMPO_TEST_ENOSPC_SAVE="6")
    return {"out": out, "exit": run.wait(), "log": run.tail()}


@pytest.mark.distributed
def test_disk_full_during_save_fails_clearly_and_keeps_the_previous_checkpoint(disk_full_run):
    out, root = disk_full_run["out"], disk_full_run["out"] / "checkpoints"
    assert disk_full_run["exit"] == EXIT_CHECKPOINT, disk_full_run["log"]
    log = disk_full_run["log"]
    assert "could not write checkpoint" in log and "step_6" in log and "No space left on device" in log, log
    assert "rank 1" in log and "still names step_4" in log
    assert (root / "latest").read_text() == "step_4"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_2", "step_4"]  # half-written step_6 removed
    verify_checkpoint(root / "step_4")
    assert resolve_checkpoint(root, "auto") == root / "step_4"
    assert logged_step(out) == 6 and not (out / "final").exists()


@pytest.mark.distributed
def test_damaged_checkpoint_is_refused_by_name_and_latest_falls_back(assets, disk_full_run, tmp_path):
    """Truncate one optimizer shard of step_4: resuming that path exits 5 naming the file; ``latest``
    (which names step_4) falls back to step_2 with a warning."""
    root = disk_full_run["out"] / "checkpoints"
    shard = next((root / "step_4").rglob("*zero_pp_rank_1_*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"{shard.name} has 1000 bytes"):
        verify_checkpoint(root / "step_4")
    assert resolve_checkpoint(root, "latest") == root / "step_2"

    run = Launch(args_for(assets, disk_full_run["out"], "--resume_from_checkpoint", str(root / "step_4")),
                 tmp_path / "log.txt")
    assert run.wait() == EXIT_CHECKPOINT, run.tail()
    assert f"checkpoint {root / 'step_4'} is damaged: " in run.tail() and shard.name in run.tail()


# ---------------------------------------------------------------------------------------------
# checkpoint resolution (no launcher)
# ---------------------------------------------------------------------------------------------
def fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    path = root / f"step_{step}"
    path.mkdir(parents=True)
    if complete:
        (path / COMPLETE).write_text(json.dumps({"step": step, "world_size": 2}))
    return path


def test_resolve_checkpoint_follows_latest_and_skips_broken_ones(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    assert resolve_checkpoint(root, "auto") is None  # nothing saved yet: start fresh
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(root, "latest")

    two, four = fake_checkpoint(root, 2), fake_checkpoint(root, 4)
    (root / "step_6.partial").mkdir()  # killed while saving
    (root / "latest").write_text("step_2")  # killed after renaming step_4, before replacing latest
    assert resolve_checkpoint(root, "latest") == two
    assert resolve_checkpoint(root, "auto") == two

    (root / "latest").write_text("step_6")  # names something broken (hand-edited): newest complete
    assert resolve_checkpoint(root, "auto") == four
    (root / "latest").unlink()
    assert resolve_checkpoint(root, "latest") == four

    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_checkpoint(root, str(root / "step_6.partial"))
    assert resolve_checkpoint(root, str(two)) == two

    (four / "model.pt").write_bytes(b"x" * 10)  # a file listed in the marker, truncated later
    (four / COMPLETE).write_text(json.dumps({"step": 4, "world_size": 2, "files": {"model.pt": 100}}))
    (root / "latest").write_text("step_4")
    with pytest.raises(CheckpointError, match="model.pt has 10 bytes, 100 were written"):
        resolve_checkpoint(root, str(four))
    assert resolve_checkpoint(root, "latest") == two
    (four / "model.pt").unlink()
    with pytest.raises(CheckpointError, match="model.pt is missing"):
        verify_checkpoint(four)
