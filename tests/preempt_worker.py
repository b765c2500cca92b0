"""The real entry point (``simpo_ds.cli.train_main``, exit code included) with test-only slow-downs.

    deepspeed --num_gpus 2 tests/preempt_worker.py [--key value ...]

Environment knobs (unset = the plain trainer):
  SIMPO_TEST_STEP_DELAY=S   sleep S seconds after every optimizer step, so that a test can signal
                            the ranks mid-run before the run is over
  SIMPO_TEST_HANG_SAVE=N    when saving step N, hang for good once DeepSpeed has written the
                            shards into step_N.partial/ (rank 0 first touches ``HANG_MARKER`` in
                            output_dir), so that a test can SIGKILL the job in the middle of a save
  SIMPO_TEST_ENOSPC_SAVE=N  when saving step N, rank SIMPO_TEST_ENOSPC_RANK (default 1) finds the
                            disk full: its checkpoint writer leaves half a file and raises ENOSPC
"""

import errno
import io
import os
import sys
import time
from pathlib import Path

import torch

import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.engine import DeepSpeedEngine

from simpo_ds.cli import train_main
from simpo_ds.trainer import Trainer

HANG_MARKER = "HANGING_IN_SAVE"


def slow_down_steps(delay: float) -> None:
    train_step = Trainer.train_step

    def slow_step(self, pair_ids):
        metrics = train_step(self, pair_ids)
        time.sleep(delay)
        return metrics

    Trainer.train_step = slow_step


def hang_in_save(step: int) -> None:
    save = DeepSpeedEngine.save_checkpoint

    def save_then_hang(self, save_dir, tag=None, **kwargs):
        result = save(self, save_dir, tag=tag, **kwargs)
        if tag == f"step_{step}.partial":
            if self.global_rank == 0:
                (Path(save_dir).parent / HANG_MARKER).write_text(tag)
            while True:
                time.sleep(60)
        return result

    DeepSpeedEngine.save_checkpoint = save_then_hang


def disk_full_in_save(step: int, rank: int) -> None:
    save = TorchCheckpointEngine.save

    def save_until_full(self, state_dict, path: str):
        if f"step_{step}.partial" not in str(path) or dist.get_rank() != rank:
            return save(self, state_dict, path)
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        with open(path, "wb") as f:  # what a full disk leaves: the first half of the file
            f.write(buffer.getvalue()[: buffer.tell() // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    TorchCheckpointEngine.save = save_until_full


if __name__ == "__main__":
    if os.environ.get("SIMPO_TEST_STEP_DELAY"):
        slow_down_steps(float(os.environ["SIMPO_TEST_STEP_DELAY"]))
    if os.environ.get("SIMPO_TEST_HANG_SAVE"):
        hang_in_save(int(os.environ["SIMPO_TEST_HANG_SAVE"]))
    if os.environ.get("SIMPO_TEST_ENOSPC_SAVE"):
        disk_full_in_save(int(os.environ["SIMPO_TEST_ENOSPC_SAVE"]), int(os.environ.get("SIMPO_TEST_ENOSPC_RANK", "1")))
    sys.exit(train_main(sys.argv[1:]))
