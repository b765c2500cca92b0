"""launch/slurm/*.sbatch on a real Slurm: a one-node cluster on localhost (slurmctld + slurmd + munge,
``scripts/slurm_cluster.sh``), CPU ranks, the tiny model.

For each script: submit with 1 node x 2 CPU ranks; the multi-node ones are preempted mid-run the
way ``#SBATCH --signal=B:USR1@300`` does it (SIGUSR1 to the batch shell only, here through
``scancel --signal=USR1 --batch``) and must forward the signal, get the ranks to checkpoint, requeue
themselves and finish from the checkpoint on restart. Checked: the job completes after exactly one
restart, metrics.jsonl holds every step once and equals the other scripts' runs per step, the export
loads with plain transformers.

Needs root and Debian's slurmctld/slurmd/slurm-client/munge (skipped otherwise):
``bash scripts/slurm_test.sh`` installs them and runs these tests (CI). The helpers of
launch/slurm/common.sh are also tested without Slurm, with fake Slurm variables and a fake srun.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from run_assets import make_assets
from test_preemption import COMPARED, RTOL, metric_error

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
JOB_TIMEOUT_S = 420  # per job, restart included (a loaded 2-core machine is slow to start ranks)
# the daemons live in sbin, which a minimal PATH (env -i, some CI runners) leaves out
os.environ["PATH"] = os.pathsep.join(
    [os.environ.get("PATH", "")] + [d for d in ("/usr/local/sbin", "/usr/sbin", "/sbin")
                                    if d not in os.environ.get("PATH", "").split(os.pathsep)]
)
SLURM = os.geteuid() == 0 and all(shutil.which(c) for c in ("slurmctld", "slurmd", "sbatch", "munged"))
needs_slurm = pytest.mark.skipif(
    not SLURM, reason="needs root and slurmctld/slurmd/sbatch/munged (bash scripts/slurm_test.sh installs them)"
)


def sh(*cmd: str, env: dict, timeout: int = 60) -> str:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def torch_extensions_dir() -> str:
    """Where the DeepSpeed CPU op is already compiled (launch/slurm/common.sh would default elsewhere)."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    accel = "cpu" if torch.version.cuda is None else f"cu{torch.version.cuda.replace('.', '')}"
    return os.path.join(get_default_build_root(), f"py{sys.version_info.major}{sys.version_info.minor}_{accel}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Environment for sbatch/scontrol/squeue talking to a private one-node cluster (CPUs=2)."""
    state = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, CPUS="2")
    sh("bash", "scripts/slurm_cluster.sh", "up", str(state), env=env)
    env = dict(os.environ, SLURM_CONF=str(state / "slurm.conf"), WANDB_MODE="disabled", PYTHON=sys.executable,
               CPU_RANKS_PER_NODE="2", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=torch_extensions_dir())
    try:
        yield env
    finally:
        subprocess.run(["scancel", "--full", "--user", "root"], env=env, timeout=30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and subprocess.run(["squeue", "-h"], env=env, capture_output=True,
                                                             text=True, timeout=30).stdout.strip():
            time.sleep(1)
        subprocess.run(["bash", "scripts/slurm_cluster.sh", "down", str(state)], timeout=60)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"), arch="llama", pairs=48)


def job_state(job: str, env: dict) -> dict:
    """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
    out = sh("scontrol", "show", "job", "-o", job, env=env)
    return dict(re.findall(r"(\w+)=(\S*)", out))


def train_records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["split"] == "train"]


class Job:
    def __init__(self, script: str, out: Path, assets: dict, env: dict):
        self.env, self.out, self.log = env, out, out.parent / f"{out.name}.log"
        args = ["--config", "recipes/tiny_cpu.yaml", "--model_name_or_path", assets["model"],
                "--train_data", assets["train"], "--eval_data", assets["eval"], "--output_dir", str(out),
                "--max_steps", str(STEPS), "--eval_on_start", "false", "--save_steps", "4", "--report_to", "none"]
        # the scripts' own #SBATCH lines, but no GPU, the node's 2 CPUs and a short time limit
        self.id = sh("sbatch", "--parsable", "--chdir", str(ROOT), "--nodes=1", "--gpus-per-node=0",
                     "--cpus-per-task=2", "--time=10", f"--output={self.log}", f"launch/slurm/{script}", *args,
                     env=env).strip().split(";")[0]
        self.deadline = time.monotonic() + JOB_TIMEOUT_S

    def state(self) -> dict:
        return job_state(self.id, self.env)

    def wait_for(self, condition, what: str) -> None:
        while not condition():
            if time.monotonic() > self.deadline:
                subprocess.run(["scancel", self.id], env=self.env, timeout=30)
                pytest.fail(f"job {self.id}: timed out waiting for {what}; {self.state()}\n{self.tail()}")
            time.sleep(0.5)

    def tail(self) -> str:
        return self.log.read_text()[-6000:] if self.log.exists() else "(no job log)"


SCRIPTS = [("train.sbatch", True), ("train_deepspeed.sbatch", True), ("train_single_node.sbatch", False)]
RESULTS: dict[str, list[dict]] = {}


@pytest.mark.slurm
@pytest.mark.distributed
@needs_slurm
@pytest.mark.parametrize("script,preempt", SCRIPTS, ids=[s for s, _ in SCRIPTS])
def test_sbatch_trains_and_survives_preemption(cluster, assets, tmp_path, script, preempt):
    job = Job(script, tmp_path / "out", assets, cluster)
    if preempt:
        job.wait_for(lambda: len(train_records(job.out)) >= 2, "step 2")
        sh("scancel", "--signal=USR1", "--batch", job.id, env=cluster)  # what --signal=B:USR1@T does
        job.wait_for(lambda: job.state()["Restarts"] == "1", "the job to requeue itself")
        stopped_at = train_records(job.out)[-1]["step"]
        assert (job.out / "checkpoints" / "latest").read_text() == f"step_{stopped_at}"
    job.wait_for(lambda: job.state()["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), "the end")

    state = job.state()
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", f"{state}\n{job.tail()}"
    assert state["Restarts"] == ("1" if preempt else "0")
    log = job.log.read_text()
    if preempt:
        assert "requeueing job" in log and f"resumed from {job.out}/checkpoints/step_{stopped_at}" in log, job.tail()
    records = train_records(job.out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), job.tail()
    RESULTS[script] = records
    baseline = RESULTS.get(SCRIPTS[0][0], records)
    for got, ref in zip(records, baseline):
        for name in COMPARED:
            assert metric_error(name, got, ref) <= RTOL, f"{script} vs {SCRIPTS[0][0]}: step {got['step']} {name}"

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(job.out / "final")
    tokenizer = AutoTokenizer.from_pretrained(job.out / "final")
    ids = tokenizer("w1 w2 w3", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


# ---------------------------------------------------------------------------------------------
# without Slurm: the scripts' logic with fake Slurm variables
# ---------------------------------------------------------------------------------------------
def common_sh(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """Run ``script`` in bash after sourcing launch/slurm/common.sh, with a fake ``scontrol`` (it
    logs its arguments to tmp_path/scontrol.log) first on PATH and no GPU tools."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/scontrol.log\n')
    (bin_dir / "scontrol").chmod(0o755)
    base = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "SIMPO_DIR": str(ROOT)}
    return subprocess.run(["bash", "-c", f"source launch/slurm/common.sh\n{script}"], cwd=ROOT, env={**base, **env},
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "env,expected",
    [({"SLURM_GPUS_ON_NODE": "4"}, "4"), ({"SLURM_GPUS_PER_NODE": "a100:8"}, "8"),
     ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, "3"), ({}, "0")],
)
def test_gpus_per_node_from_slurm_variables(tmp_path, env, expected):
    assert common_sh("gpus_per_node", tmp_path, **env).stdout.strip() == expected


def test_setup_without_gpus_falls_back_to_cpu_ranks(tmp_path):
    done = common_sh('slurm_setup; echo "$NPROC_PER_NODE $MASTER_ADDR $MASTER_PORT $NNODES $OMP_NUM_THREADS"',
                     tmp_path, SLURM_JOB_ID="1234", SLURM_JOB_NUM_NODES="2", SLURM_CPUS_ON_NODE="8",
                     MASTER_ADDR="node001", CPU_RANKS_PER_NODE="2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "2 node001 16234 2 4"


def test_resume_args_added_unless_given(tmp_path):
    assert common_sh("resume_args --config x.yaml", tmp_path).stdout.strip() == "--resume_from_checkpoint auto"
    assert common_sh("resume_args --resume_from_checkpoint /ckpt/step_4", tmp_path).stdout.strip() == ""


FAKE_STEP = """
fake_step() {  # stands for `srun torchrun ...`: trains until SIGUSR1, then "checkpoints" and exits 3
    trap 'echo got USR1 > "$OUT/step.log"; exit 3' USR1
    echo started > "$OUT/started"
    for _ in $(seq 300); do sleep 0.1; done
}
"""


@pytest.mark.parametrize("signal_name,requeued", [("USR1", True), ("NONE", False)])
def test_run_preemptible_forwards_usr1_and_requeues(tmp_path, signal_name, requeued):
    """The batch shell gets SIGUSR1 (as from --signal=B:USR1@T): the step gets it, stops with exit 3,
    the job requeues itself. Without a signal a failing step is not requeued."""
    script = FAKE_STEP + f"""
        if [[ {signal_name} == USR1 ]]; then
            (while [[ ! -e "$OUT/started" ]]; do sleep 0.1; done; kill -USR1 $$) &
            run_preemptible fake_step
        else
            run_preemptible bash -c 'exit 3'
        fi
    """
    done = common_sh(script, tmp_path, SLURM_JOB_ID="77", OUT=str(tmp_path))
    assert done.returncode == 3, done.stdout + done.stderr
    log = tmp_path / "scontrol.log"
    if requeued:
        assert (tmp_path / "step.log").read_text().strip() == "got USR1"
        assert log.read_text().split() == ["requeue", "77"]
        assert "requeueing job 77" in done.stdout
    else:
        assert not log.exists()


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "launch" / "slurm").glob("*.sbatch")))
def test_sbatch_headers(script):
    """Preemption needs the signal to reach the batch shell (B:) and the job to be requeueable."""
    text = (ROOT / "launch" / "slurm" / script).read_text()
    assert re.search(r"^#SBATCH --signal=B:USR1@\d+$", text, re.M)
    assert re.search(r"^#SBATCH --requeue$", text, re.M) and "run_preemptible srun" in text
    assert subprocess.run(["bash", "-n", str(ROOT / "launch" / "slurm" / script)]).returncode == 0


def test_hostfile_example_parses():
    from deepspeed.launcher.runner import _parse_hostfile

    lines = (ROOT / "launch" / "hostfile.example").read_text().splitlines()
    assert dict(_parse_hostfile(lines)) == {"node001": 8, "node002": 8}
