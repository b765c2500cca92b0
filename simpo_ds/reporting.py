"""Where metrics go: ``output_dir/metrics.jsonl`` (rank 0, one flushed line per event), wandb, a bar.

Record format (docs/design.md §7)::

    {"step": 10, "split": "train", "time": 1764000000.0, "epoch": 0.31, "loss": 0.69,
     "rewards/accuracies": 0.62, ..., "lr": 1e-6, "grad_norm": 3.1, "tokens_per_s": 1840.2}
"""

from __future__ import annotations

import atexit
import json
import math
import os
import time
from pathlib import Path

from simpo_ds.io import write_atomic

# Peak dense bf16 TFLOP/s per device, for MFU (tensor cores, no sparsity).
KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def detect_peak_tflops(device_type: str) -> float | None:
    """Peak bf16 TFLOP/s of the local accelerator when its name is known, else None."""
    if device_type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name()
    for key, value in KNOWN_PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def peak_memory_gb(device_type: str) -> float:
    """Peak accelerator memory allocated (CUDA) or peak resident memory of the process (CPU)."""
    if device_type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


RUN_CONFIG = "run_config.yaml"


class Reporter:
    """Writes records on rank 0 only; other ranks get a no-op reporter."""

    def __init__(self, output_dir: str, rank: int, report_to: list, run_name: str | None, config: dict):
        self.enabled = rank == 0
        self.wandb = None
        self.path = Path(output_dir) / "metrics.jsonl"
        if not self.enabled:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        import yaml

        # the resolved config of this run (readable as a recipe; `simpo-ds plot` shows it)
        write_atomic(Path(output_dir) / RUN_CONFIG, yaml.safe_dump(config, sort_keys=False))
        if "wandb" in report_to:
            import wandb

            os.environ.setdefault("WANDB_DIR", output_dir)
            # offline unless the user configured wandb (a login key or an explicit WANDB_MODE)
            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            project = os.environ.get("WANDB_PROJECT", "simpo-ds")
            self.wandb = wandb.init(project=project, name=run_name, config=config, mode=mode)
            atexit.register(self.close)

    def log(self, split: str, step: int, epoch: float, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, "time": time.time(), "epoch": round(epoch, 4)}
        record.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()})
        with open(self.path, "a", encoding="utf-8") as f:  # one complete line per event, flushed
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            numeric = {f"{split}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
            self.wandb.log(numeric, step=step)

    def close(self) -> None:
        """Finish the wandb run (also registered at exit); metrics.jsonl needs no closing."""
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
