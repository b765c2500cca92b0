"""Sharded, resumable work on files: what ``generate`` and ``score`` share.

A job cuts its work into numbered units (a batch of prompts or of answers), the same list on every
rank and every rerun. Rank r of w does units r, r + w, r + 2w, ... and writes each as one jsonl file,
atomically (``generations.parts/units/00012.jsonl`` appears whole or not at all), so a killed run loses only the unit in
flight and a rerun -- with any number of ranks -- skips every unit already on disk. The last rank to
finish (any rank that sees every unit on disk) merges them into the output file, again atomically.
No process group: ranks only share the directory, so any launcher works (torchrun, deepspeed, srun,
or several plain processes with RANK/WORLD_SIZE set).

    job = Job(Path(out) / "generations.parts", settings, Path(out) / "generations.jsonl", "generate")
    # ^ refuses a directory made with other settings, and an output file another tool wrote
    for u in job.todo(num_units, rank, world):
        job.write_unit(u, records)
    if job.complete(num_units):
        records = job.read_units(num_units)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

from simpo_ds.data.tokenize import DataError

SETTINGS = "settings.json"


def rank_and_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun/deepspeed (RANK, WORLD_SIZE, LOCAL_RANK) or srun
    (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID); (0, 1, 0) for a plain process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def pin_gpu(local_rank: int, world: int) -> int:
    """With several ranks, show each only its own GPU (``CUDA_VISIBLE_DEVICES``; vLLM takes the first
    visible one) -> the device index to use, 0. Must run before anything initializes CUDA; harmless on
    CPU. One process keeps what it sees (and uses its first device)."""
    if world == 1:
        return local_rank
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if len(visible) != 1:  # unset, or a node's list: pick this rank's entry
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[local_rank] if local_rank < len(visible) else str(local_rank)
    return 0


def without_launcher_args(argv: list[str]) -> list[str]:
    """``argv`` minus the ``--local_rank=N`` the deepspeed launcher adds (LOCAL_RANK is in the env)."""
    return [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]


def command(name: str, parser, run, argv: list[str] | None) -> int:
    """``simpo-ds NAME``: parse (launcher arguments dropped), run; bad input -> its message, exit 2."""
    args = parser().parse_args(without_launcher_args(sys.argv[1:] if argv is None else argv))
    try:
        run(args)
    except (DataError, OSError) as err:
        print(f"simpo-ds {name}: error: {err}", file=sys.stderr)
        return 2
    return 0


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")  # unique across nodes
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(path: Path, records: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a jsonl file; a line that is not a JSON object is a ``DataError`` naming file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {line_no}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {line_no}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


class Job:
    """The unit files of one step (``root``: ``OUT/generations.parts``, ``OUT/scored.parts``) and the settings they
    were made with (a rerun with other settings would mix two distributions: refused). ``output``, the
    file the units merge into, may only be replaced when this job wrote it: an existing one without
    ``root/settings.json`` beside it belongs to someone else (refused, nothing created)."""

    def __init__(self, root: Path, settings: dict, output: Path, tool: str):
        path = root / SETTINGS
        if output.exists() and not path.exists():
            raise DataError(f"{output} exists and was not written by simpo-ds {tool} (no {path}): choose "
                            f"another output, or move that file away")
        self.root, self.units, self.settings = root, root / "units", settings
        self.units.mkdir(parents=True, exist_ok=True)
        if path.exists():
            saved = json.loads(path.read_text())
            changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
            if changed:
                detail = "; ".join(f"{k}: {old!r} on disk, {new!r} now" for k, (old, new) in changed.items())
                raise DataError(f"{root} was made with other settings ({detail}): use another output "
                                f"directory, or rerun with the same settings to resume")
        else:
            write_atomic(path, json.dumps(settings, indent=1, sort_keys=True))

    def unit_path(self, unit: int) -> Path:
        return self.units / f"{unit:05d}.jsonl"

    def todo(self, num_units: int, rank: int, world: int) -> list[int]:
        """This rank's units that are not on disk yet."""
        return [u for u in range(rank, num_units, world) if not self.unit_path(u).exists()]

    def write_unit(self, unit: int, records: list[dict]) -> None:
        write_jsonl(self.unit_path(unit), records)

    def complete(self, num_units: int) -> bool:
        return all(self.unit_path(u).exists() for u in range(num_units))

    def read_units(self, num_units: int) -> list[dict]:
        return [r for u in range(num_units) for r in read_jsonl(self.unit_path(u))]


def length_batches(lengths: list[int], keys: list[str], batch_size: int) -> list[list[int]]:
    """Indices cut into batches of ``batch_size``, longest first (ties by key): little padding, and
    the same batches whatever the number of ranks."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], keys[i]))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(dtype: str) -> str:
    """The dtype ``--dtype`` means on this machine: ``auto`` = bfloat16 with a GPU, float32 without.
    What a resume check compares (a requeue on another kind of node resolves ``auto`` differently)."""
    import torch

    if dtype not in DTYPES:
        raise DataError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return "bfloat16" if torch.cuda.is_available() else "float32"
    return dtype


def device_and_dtype(local_rank: int, dtype: str):
    """(this rank's device, the torch dtype of ``dtype`` as ``resolve_dtype`` resolves it)."""
    import torch

    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return device, getattr(torch, resolve_dtype(dtype))


def parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")
