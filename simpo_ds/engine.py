"""Everything DeepSpeed: process group, config filling, ZeRO-3 loading context, engine, checkpoints.

This is the only module that imports ``deepspeed``. The trainer owns gradient accumulation itself
(a step has a variable number of packed micro-batches), so DeepSpeed is configured with one
micro-batch per step and told where the accumulation boundary is::

    engine.set_gradient_accumulation_boundary(last_micro_batch)
    engine.backward(loss * world_size)   # undo DeepSpeed's 1/world_size gradient averaging
    engine.step()                        # once, after the last micro-batch

Checkpoints are written atomically: DeepSpeed saves into ``step_N.partial/``, rank 0 renames it to
``step_N/`` after every rank has finished, then replaces ``latest`` (temp file + rename) and only then
prunes older checkpoints — a crash at any point leaves ``latest`` naming a complete checkpoint. The
``COMPLETE`` marker lists every file with its size; loading verifies them, so a truncated or missing
file is reported by name instead of failing deep inside ``torch.load``. A save that fails on any rank
(disk full, quota) is removed and raises :class:`CheckpointError` on every rank; the previous
checkpoint and ``latest`` are untouched.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import warnings
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from simpo_ds.config import ConfigError
from simpo_ds.io import write_atomic

logger = logging.getLogger(__name__)

# torch 2.13 deprecates the collective names DeepSpeed 0.19 still calls, once per call: keep logs readable.
warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use .*", category=FutureWarning)

LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or one to resume from is incomplete or damaged."""


class CollectiveError(RuntimeError):
    """A collective failed on this rank: it timed out (a peer is stuck or diverged) or a peer died."""


def is_collective_failure(err: BaseException) -> bool:
    """Whether ``err`` is a failed collective (gloo/NCCL timeout, peer closed), not a bug of ours."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        marker in text for marker in ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer",
                                      "NCCL", "Gloo", "gloo", "collective mismatch")
    )


# ---------------------------------------------------------------------------------------------
# process group
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Waits where one rank works while the others stand by (rank 0 tokenizes a dataset first, writes the
# exported model, converts a checkpoint) may last far longer than any training collective: they run on
# a second (gloo) group with this timeout, so ``collective_timeout_s`` can stay short.
ONE_SIDED_TIMEOUT_S = 4 * 3600
_wait_group = None


def init_distributed(timeout_s: int = 300) -> tuple[int, int, torch.device]:
    """Join (or create, for a plain ``python`` run) the process group -> (rank, world_size, device).

    Backend: nccl on CUDA, gloo on CPU (DeepSpeed's accelerator decides). ``timeout_s`` bounds every
    training and evaluation collective (a stuck or diverged rank becomes an error within it);
    :func:`barrier` and :func:`broadcast_object` wait on a separate group bounded by
    ``ONE_SIDED_TIMEOUT_S``.
    """
    global _wait_group
    if "RANK" not in os.environ:  # single process without a launcher
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    accel = get_accelerator()
    if accel.device_name() == "cuda":
        torch.cuda.set_device(local_rank())
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend=accel.communication_backend_name(), timeout=timedelta(seconds=timeout_s)
        )
    if _wait_group is None and dist.get_world_size() > 1:
        _wait_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=max(timeout_s, ONE_SIDED_TIMEOUT_S)))
    if accel.device_name() == "cpu":
        _unlink_shm_buffers()
    device = torch.device(accel.device_name(), local_rank()) if accel.device_name() == "cuda" else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def shutdown_distributed() -> None:
    """Destroy the process groups at the end of a run that ended well on every rank (after a barrier).

    A process that exits with its gloo groups alive can abort during interpreter teardown ("terminate
    called without an active exception", SIGABRT: pytorch/pytorch#190489), failing a finished job.
    Not for a failed run: its peers may be stuck in a collective, and destroying would wait on them.
    """
    global _wait_group
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()
        _wait_group = None


def _unlink_shm_buffers() -> None:
    """Remove the name of this rank's DeepSpeed CPU all-reduce buffer from /dev/shm.

    DeepSpeed's shm all-reduce (CPU accelerator) creates one ~66 MiB buffer per rank under /dev/shm
    and never unlinks it, so every run, clean or killed, leaves its buffers in RAM. Once every rank has
    mapped every buffer (DeepSpeed's init maps them all; the barrier says every rank is past it), the
    names can go: the mappings live on until the processes exit, and then the memory is freed.
    """
    dist.barrier()
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_*_{os.environ.get('MASTER_PORT', '*')}_{dist.get_rank()}"
    for path in Path("/dev/shm").glob(name):
        path.unlink(missing_ok=True)


def local_rank() -> int:
    """This process's index on its node (LOCAL_RANK, set by every launcher; 0 without one)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def device_type() -> str:
    return get_accelerator().device_name()


def barrier() -> None:
    """Wait for every rank (on the one-sided-wait group: rank 0 may be writing files meanwhile)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier(group=_wait_group)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place, returned for chaining)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from ``src`` to every rank (the others may wait long: one-sided group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_wait_group)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's picklable ``obj``, in rank order."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
def from_accelerate() -> bool:
    """Started by ``accelerate launch`` with a DeepSpeed config (it exports ACCELERATE_* settings)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def accelerate_ds_config() -> tuple[dict | None, str]:
    """The DeepSpeed settings ``accelerate launch`` passes -> (config dict, or None when it names a
    ``deepspeed_config_file``; a description for messages). Read: zero stage, optimizer / parameter
    offload device, zero3_save_16bit_model (the other accelerate DeepSpeed fields have no counterpart
    here: the trainer owns accumulation and clipping)."""
    env = os.environ
    if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        return None, env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]
    zero: dict = {"stage": int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3"))}
    for kind in ("optimizer", "param"):
        device = env.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{kind.upper()}_DEVICE", "none")
        if device not in ("none", ""):
            zero[f"offload_{kind}"] = {"device": device, "pin_memory": True}
    if zero["stage"] == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = (
            env.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "true").lower() == "true")
        zero.update({k: "auto" for k in ("reduce_bucket_size", "stage3_prefetch_bucket_size",
                                          "stage3_param_persistence_threshold")})
    return {"zero_optimization": zero}, "the accelerate launch config (ACCELERATE_DEEPSPEED_* settings)"


def ds_config_source(path: str | None) -> str:
    """Where :func:`fill_ds_config` takes the DeepSpeed settings from, for the log."""
    if path:
        return path
    if from_accelerate():
        return accelerate_ds_config()[1]
    return "the built-in default (ZeRO-3)"


def launcher_dtype(torch_dtype: str) -> str:
    """``torch_dtype`` unless it is ``auto`` and ``accelerate launch`` set a mixed precision (bf16/fp16)."""
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no") if from_accelerate() else "no"
    if torch_dtype != "auto" or precision not in ("bf16", "fp16"):
        return torch_dtype
    return {"bf16": "bfloat16", "fp16": "float16"}[precision]


def fill_ds_config(path: str | None, cfg, world_size: int, dtype: torch.dtype, hidden_size: int, *,
                   global_batch: int | None = None, dp_size: int | None = None, total_steps: int | None = None,
                   warmup_steps: int | None = None) -> dict:
    """Read a DeepSpeed JSON and fill every ``"auto"`` from the run config — the ONE place.

    Without ``path``: under ``accelerate launch``, the DeepSpeed settings it passes (its
    ``deepspeed_config_file``, or zero stage / offload devices, :func:`accelerate_ds_config`); else
    ZeRO-3. The JSONs of the transformers / accelerate docs work as they are:

    - batch: one micro-batch per DeepSpeed step (the trainer accumulates variable-size packed
      micro-batches itself), so DeepSpeed's train_batch_size = world_size;
    - precision: ``fp16`` / ``bf16`` ``"enabled": "auto"`` follow the run's ``dtype``;
    - ``optimizer``: DeepSpeed builds it, its ``"auto"`` params from learning_rate, adam_*,
      weight_decay; ``scheduler``: not used (logged): the trainer schedules the learning rate
      (lr_scheduler_type, warmup_ratio), its ``"auto"`` params need no value.

    An explicit value that contradicts the run (``fp16.enabled: true`` on a bf16 run, another
    ``lr``, ``gradient_clipping``, batch size or warmup) is a ConfigError naming every such key, as
    transformers' Trainer does: the run would otherwise silently follow one of the two.
    ``global_batch`` (pairs per step), ``dp_size`` (data-parallel ranks), ``total_steps`` and
    ``warmup_steps`` are the run's values for those checks (a check is skipped when None).
    """
    ds = None
    if path is None and from_accelerate():
        ds, path = accelerate_ds_config()
    try:
        ds = ds if ds is not None else json.loads(Path(path).read_text()) if path else {"zero_optimization": {"stage": 3}}
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from None
    except OSError as err:
        raise ConfigError(f"DeepSpeed config {path}: cannot read ({err})") from None
    if zero_stage(ds) not in (1, 2, 3):
        raise ConfigError(
            f"{path}: zero_optimization.stage must be 1, 2 or 3, got {zero_stage(ds)} (a missing "
            "zero_optimization means 0). Without ZeRO, DeepSpeed neither reports the gradient norm nor "
            "skips non-finite fp32 updates; stage 1 costs the same on one GPU and shards optimizer states"
        )
    conflicts: list[str] = []
    _check_batch(ds, cfg, global_batch, dp_size, conflicts)
    ds["train_micro_batch_size_per_gpu"] = 1
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = world_size
    _fill(ds, "gradient_clipping", cfg.max_grad_norm, f"max_grad_norm={cfg.max_grad_norm}", conflicts)
    _fill_precision(ds, cfg, dtype, conflicts)
    zero = ds.setdefault("zero_optimization", {})
    auto = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in auto.items():
        if zero.get(key) == "auto":
            zero[key] = value
    if "optimizer" in ds:
        params = ds["optimizer"].setdefault("params", {})
        run = {"lr": (cfg.learning_rate, "learning_rate"), "betas": ([cfg.adam_beta1, cfg.adam_beta2], "adam_beta1/2"),
               "eps": (cfg.adam_epsilon, "adam_epsilon"), "weight_decay": (cfg.weight_decay, "weight_decay")}
        for key, (value, name) in run.items():
            _fill(params, key, value, f"{name}={value}", conflicts, where="optimizer.params.")
    elif zero.get("offload_optimizer", {}).get("device") in ("cpu", "nvme"):
        ds["zero_force_ds_cpu_optimizer"] = False  # the client torch AdamW runs on the CPU copy
    if "scheduler" in ds:
        _check_scheduler(ds.pop("scheduler"), cfg, total_steps, warmup_steps, conflicts)
        logger.info("DeepSpeed config %s: its scheduler block is not used; the learning rate follows "
                    "lr_scheduler_type=%s with warmup_ratio=%s", path, cfg.lr_scheduler_type, cfg.warmup_ratio)
    if conflicts:
        raise ConfigError(f"{path} contradicts this run (write \"auto\" there, or change the run's key):\n  - "
                          + "\n  - ".join(conflicts))
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise ConfigError(f"{path}: cannot fill 'auto' for {', '.join(leftover)}")
    return ds


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    try:
        return abs(float(a) - float(b)) <= 1e-12 * max(abs(float(a)), abs(float(b)), 1.0)
    except (TypeError, ValueError):
        return a == b


def _fill(block: dict, key: str, value, run: str, conflicts: list, where: str = "") -> None:
    """``block[key]``: "auto" or absent -> ``value``; an explicit other value -> a conflict."""
    given = block.get(key, "auto")
    if given != "auto" and not _same(given, value):
        conflicts.append(f"{where}{key}={json.dumps(given)}, but this run has {run}")
    block[key] = value


def _fill_precision(ds: dict, cfg, dtype: torch.dtype, conflicts: list) -> None:
    """``bf16`` / ``fp16`` blocks follow ``dtype``: "auto" (or absent) is filled, an explicit
    ``enabled`` that disagrees is a conflict (DeepSpeed would train in another precision)."""
    if "bfloat16" in ds:  # DeepSpeed's other name of the bf16 block
        ds["bf16"] = ds.pop("bfloat16")
    run = f"torch_dtype={cfg.torch_dtype} -> {str(dtype).removeprefix('torch.')} (set torch_dtype, or bf16/fp16: true)"
    for key, wanted in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
        block = ds.get(key)
        if block is None:
            if wanted:
                ds[key] = {"enabled": True}
        else:
            _fill(block, "enabled", wanted, run, conflicts, where=f"{key}.")
        if wanted and key == "fp16":
            ds[key].setdefault("initial_scale_power", 16)


def _check_batch(ds: dict, cfg, global_batch: int | None, dp_size: int | None, conflicts: list) -> None:
    """Explicit DeepSpeed batch fields must describe the run's batch (pairs per optimizer step)."""
    if global_batch is None or dp_size is None:
        return
    explicit = {k: ds[k] for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
                if ds.get(k, "auto") != "auto"}
    run = f"{global_batch} pairs per step over {dp_size} data-parallel rank(s)"
    if "train_batch_size" in explicit and explicit["train_batch_size"] != global_batch:
        conflicts.append(f"train_batch_size={explicit['train_batch_size']}, but this run has {run}")
    per_device = {"train_micro_batch_size_per_gpu": cfg.per_device_train_batch_size,
                  "gradient_accumulation_steps": cfg.gradient_accumulation_steps}
    for key, value in per_device.items():
        if key in explicit and value is not None and explicit[key] != value:
            conflicts.append(f"{key}={explicit[key]}, but this run has {key.replace('train_micro_batch_size_per_gpu', 'per_device_train_batch_size')}={value}")
    if {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps"} & explicit.keys():
        micro = explicit.get("train_micro_batch_size_per_gpu", cfg.per_device_train_batch_size or 1)
        accumulation = explicit.get("gradient_accumulation_steps", cfg.gradient_accumulation_steps or 1)
        if micro * accumulation * dp_size != global_batch:
            conflicts.append(f"train_micro_batch_size_per_gpu x gradient_accumulation_steps = {micro} x {accumulation} "
                             f"(x {dp_size} ranks = {micro * accumulation * dp_size}), but this run has {run}")


def _check_scheduler(block: dict, cfg, total_steps: int | None, warmup_steps: int | None, conflicts: list) -> None:
    """The (unused) scheduler block's explicit values must agree with the trainer's schedule."""
    params = block.get("params", {})
    run = {"warmup_min_lr": (0.0, "a warmup from 0"), "warmup_max_lr": (cfg.learning_rate, f"learning_rate={cfg.learning_rate}"),
           "warmup_num_steps": (warmup_steps, f"{warmup_steps} warmup steps (warmup_ratio={cfg.warmup_ratio})"),
           "total_num_steps": (total_steps, f"{total_steps} steps"),
           "cos_min_ratio": (0.0, "a decay to 0")}
    for key, (value, text) in run.items():
        if key in params and value is not None:
            _fill(params, key, value, text, conflicts, where="scheduler.params.")


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def zero3_init_context(ds_config: dict):
    """Keep the returned object alive while loading: transformers then loads under zero.Init
    (not when ``accelerate launch`` says ``zero3_init_flag: false``: then each rank loads the full
    model and DeepSpeed partitions it at initialize)."""
    if zero_stage(ds_config) != 3:
        return None
    if from_accelerate() and os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "true").lower() == "false":
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


# ---------------------------------------------------------------------------------------------
# engine
# ---------------------------------------------------------------------------------------------
def build_engine(module: torch.nn.Module, ds_config: dict, cfg, scheduler_fn):
    """deepspeed.initialize with the client AdamW (unless the DS config names an optimizer).

    The client AdamW is torch's fused kernel on CPU and CUDA (one pass over the flat ZeRO partition
    instead of a dozen elementwise ops: 0.02 s vs 0.15 s per step for 31 M fp32 parameters on 2 CPU
    cores). ``scheduler_fn(optimizer) -> LRScheduler`` builds the schedule on DeepSpeed's optimizer.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(
            params,
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon,
            weight_decay=cfg.weight_decay,
            fused=all(p.device.type in ("cpu", "cuda") for p in params) or None,
        )
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        model_parameters=params,
        optimizer=optimizer,
        lr_scheduler=scheduler_fn,
        config=ds_config,
    )
    return engine


def global_grad_norm(engine) -> float:
    """Global gradient norm before clipping, as DeepSpeed computed it in the last step."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if isinstance(norm, torch.Tensor) else norm)


def full_gradients(engine) -> dict[str, torch.Tensor]:
    """Full (gathered) gradients of every trainable parameter; call between backward and step.

    Collective under ZeRO-3: every rank must call it.
    """
    from deepspeed.utils import safe_get_full_grad

    out = {}
    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            grad = safe_get_full_grad(param)
            if grad is not None:
                out[name] = grad.detach().float().cpu().clone()
    return out


def consolidated_state_dict(engine) -> dict | None:
    """Full model state dict on rank 0 (ZeRO-3: gathered 16-bit/param dtype), None elsewhere."""
    if zero_stage(engine.config) == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    if dist.get_rank() == 0:
        return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
    return None


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
# Layout of ``output_dir/checkpoints/``:
#   step_N/             complete checkpoint: DeepSpeed files + COMPLETE ({"step", "world_size", "files":
#                       {path: bytes}, "train_batch_size"})
#   step_N.partial/     being written (or left by a killed save: ignored, removed by the next save)
#   step_N/universal/   the same checkpoint converted for another world size (made on demand)
#   latest              the tag of the newest complete checkpoint, replaced atomically, written last
COMPLETE = "COMPLETE"
UNIVERSAL = "universal"


def save_checkpoint(engine, root: str | Path, step: int, client_state: dict, keep: int, marker: dict | None = None) -> Path:
    """Atomic DeepSpeed checkpoint ``root/step_{step}`` (model, optimizer, scheduler, client_state).

    Every rank writes its shard into ``step_N.partial/``; after a barrier rank 0 marks it COMPLETE
    (step, world size, every file's size, plus ``marker``: what resuming must check before loading),
    renames it to ``step_N/``, then replaces ``latest``, then
    prunes. A kill at any point leaves ``latest`` naming a complete checkpoint (at worst the previous
    one). A write error on any rank (e.g. ENOSPC) removes the partial directory and raises
    :class:`CheckpointError` on every rank.
    """
    root = Path(root)
    tag = f"step_{step}"
    partial = root / f"{tag}.partial"
    if dist.get_rank() == 0 and partial.exists():
        shutil.rmtree(partial)
    barrier()
    error = _save_shards(engine, root, partial.name, client_state)
    errors = [e for e in all_gather_object(error) if e]
    final = root / tag
    if errors:
        if dist.get_rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
        barrier()
        kept = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
        raise CheckpointError(
            f"could not write checkpoint {final}: {errors[0]}. Nothing was replaced: "
            + (f"{root / LATEST} still names {kept}." if kept else "there is no earlier checkpoint.")
        )
    if dist.get_rank() == 0:
        write_atomic(partial / COMPLETE, json.dumps(
            {**(marker or {}), "step": step, "world_size": dist.get_world_size(), "files": _file_sizes(partial)}))
        stale = root / f"{tag}.stale"
        if final.exists():  # re-saving a step (resumed from an older checkpoint): swap, then delete
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
        os.replace(partial, final)
        write_atomic(root / LATEST, tag)
        shutil.rmtree(stale, ignore_errors=True)
        _prune(root, keep)
    barrier()
    return final


def _save_shards(engine, root: Path, tag: str, client_state: dict) -> str | None:
    """``engine.save_checkpoint`` into ``root/tag`` -> None, or this rank's first write error as text.

    DeepSpeed's save runs collectives between and after the file writes (ZeRO-3 re-gathers parameters
    at the end), so a rank must not leave it early: a failing write (disk full, quota, I/O error) is
    recorded instead of raised, the rank goes through the rest of the save with its peers, and the
    caller exchanges the errors afterwards.
    """
    writer = engine.checkpoint_engine
    errors = []

    def record_errors(write):
        def guarded(*args, **kwargs):
            if errors:  # one failure is enough: skip the remaining writes of this rank
                return None
            try:
                return write(*args, **kwargs)
            except OSError as err:
                errors.append(f"rank {dist.get_rank()}: {err}")
                return None

        return guarded

    writer.save, writer.makedirs = record_errors(writer.save), record_errors(writer.makedirs)
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    finally:
        del writer.save, writer.makedirs  # the class's methods again
    return errors[0] if errors else None


def _file_sizes(directory: Path) -> dict[str, int]:
    """``{relative path: bytes}`` of every file under ``directory``."""
    return {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def verify_checkpoint(path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is complete and every file it lists is intact."""
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no {COMPLETE} marker): it was interrupted while saving")
    try:
        marker = json.loads((path / COMPLETE).read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint {path}: unreadable {COMPLETE} marker ({err})") from err
    for name, size in marker.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is damaged: {name} is missing")
        if file.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint {path} is damaged: {name} has {file.stat().st_size} bytes, {size} were written"
            )


def _step_of(path: Path) -> int | None:
    """``step_12`` -> 12; None for anything else (``step_12.partial``, ``latest``, ...)."""
    number = path.name.removeprefix("step_")
    return int(number) if path.name.startswith("step_") and number.isdigit() and path.is_dir() else None


def _complete_steps(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    steps = [p for p in root.glob("step_*") if _step_of(p) is not None and (p / COMPLETE).is_file()]
    return sorted(steps, key=_step_of)


def _prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints; drop leftovers of killed saves (no save is running)."""
    steps = sorted((p for p in root.glob("step_*") if _step_of(p) is not None), key=_step_of)
    leftovers = [p for p in root.glob("step_*") if p.name.endswith((".partial", ".stale"))]
    for old in steps[:-keep] + leftovers:
        shutil.rmtree(old, ignore_errors=True)


def _latest_complete(root: Path) -> Path | None:
    """The checkpoint ``root/latest`` names; if it is missing, incomplete or damaged (a hand-edited,
    interrupted or truncated directory), the newest intact ``step_N`` with a warning; None when
    there is none."""
    latest = root / LATEST
    named = root / latest.read_text().strip() if latest.is_file() else None
    candidates = ([named] if named else []) + [p for p in reversed(_complete_steps(root)) if p != named]
    for path in candidates:
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            logger.warning("skipping %s", err)
            continue
        if path != named and named is not None:
            logger.warning("%s names %s, which is not usable: resuming from %s instead", latest, named.name, path)
        return path
    return None


def resolve_checkpoint(root: str | Path, which: str) -> Path | None:
    """The checkpoint directory to resume from, verified complete and intact.

    ``latest``: the one ``root/latest`` names, else the newest intact one (error if none); ``auto``:
    the same, or None (start from scratch) when nothing was saved yet — what a requeued job passes
    every time; else a path, which must verify.
    """
    root = Path(root)
    if which in ("latest", "auto"):
        path = _latest_complete(root)
        if path is None and which == "latest":
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no complete checkpoint in {root}")
        return path
    path = Path(which)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    verify_checkpoint(path)
    return path


ABANDONED = "abandoned"


def start_branch(root: str | Path, step: int) -> Path | None:
    """Resuming at ``step`` while ``root`` holds later checkpoints starts a new branch: those later
    ones (the abandoned run, e.g. after a loss spike) are moved to
    ``root/abandoned/<time>_after_step_<step>/`` — never deleted, never again resumed by ``latest`` /
    ``auto``, never counted by ``save_total_limit`` — and ``latest`` names the newest checkpoint left
    (the resumed one when it is in ``root``). Rank 0 moves, every rank waits. -> the folder they went
    to, or None when there were none."""
    import time

    root, moved_to = Path(root), None
    if dist.get_rank() == 0:
        later = sorted((p for p in root.glob("step_*") if _step_number(p.name) is not None
                        and _step_number(p.name) > step), key=lambda p: p.name)
        if later:
            moved_to = root / ABANDONED / f"{time.strftime('%Y%m%d-%H%M%S')}_after_step_{step}"
            moved_to.mkdir(parents=True)
            for path in later:
                os.replace(path, moved_to / path.name)
            remaining = _complete_steps(root)
            if remaining:
                write_atomic(root / LATEST, remaining[-1].name)
            else:  # resumed from elsewhere and nothing of this run is left before it
                (root / LATEST).unlink(missing_ok=True)
            logger.warning(
                "resumed at step %d while later checkpoints existed: a new branch starts here. %s moved to "
                "%s (kept, not resumable by 'latest', not counted by save_total_limit); latest now names %s",
                step, ", ".join(p.name for p in later), moved_to, remaining[-1].name if remaining else "nothing")
    moved_to = broadcast_object(moved_to)
    barrier()
    return moved_to


def _step_number(name: str) -> int | None:
    """``step_12`` / ``step_12.partial`` / ``step_12.stale`` -> 12; None for anything else."""
    number = name.removeprefix("step_").split(".", 1)[0]
    return int(number) if name.startswith("step_") and number.isdigit() else None


def checkpoint_marker(path: Path) -> dict:
    """The ``COMPLETE`` marker of a verified checkpoint (step, world_size, files, what the trainer added)."""
    return json.loads((path / COMPLETE).read_text())


def saved_world_size(path: Path) -> int:
    """Number of data-parallel ranks that wrote the checkpoint (COMPLETE marker, else its shards)."""
    marker = checkpoint_marker(path)
    if "world_size" in marker:
        return int(marker["world_size"])
    shards = {p.name.split("_mp_rank")[0] for p in path.glob("*zero_pp_rank_*_optim_states.pt")}
    return max(len(shards), 1)


def load_checkpoint(engine, path: Path) -> dict:
    """Load model, optimizer, scheduler from a checkpoint directory -> its client_state.

    A checkpoint saved by a different number of ranks is first converted to DeepSpeed's universal
    format (``path/universal/``, once, by rank 0) and loaded with ``load_universal``.
    """
    world_size = dist.get_world_size()
    saved = saved_world_size(path)
    if saved != world_size:
        logger.warning("checkpoint %s was saved by %d rank(s), loading it on %d", path, saved, world_size)
        path = to_universal(path)
        engine._config.load_universal_checkpoint = True  # read by load_checkpoint only
    try:
        load_path, client_state = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    finally:
        engine._config.load_universal_checkpoint = False
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
    return client_state


def universal_command(path: Path, out: Path) -> list[str]:
    """The DeepSpeed command that converts checkpoint ``path`` into a universal one at ``out``."""
    import sys

    return [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
            "--output_folder", str(out), "--num_extract_workers", "4", "--num_merge_workers", "2"]


def to_universal(path: Path) -> Path:
    """``path/universal/`` (made by rank 0 unless already complete; every rank waits for it)."""
    import subprocess

    out = path / UNIVERSAL
    error = None
    if dist.get_rank() == 0 and not (out / COMPLETE).is_file():
        partial = path / f"{UNIVERSAL}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        cmd = universal_command(path, partial)
        logger.info("converting to a universal checkpoint: %s", " ".join(cmd))
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode == 0:
            write_atomic(partial / COMPLETE, (path / COMPLETE).read_text())
            shutil.rmtree(out, ignore_errors=True)
            os.replace(partial, out)
        else:
            error = (f"could not convert checkpoint {path} to the universal format needed to resume on a "
                     f"different number of ranks (exit {done.returncode}):\n{done.stdout[-3000:]}\nRun it yourself: "
                     f"{' '.join(universal_command(path, out))} && echo '{{}}' > {out / COMPLETE}")
    error = broadcast_object(error)
    if error:
        raise RuntimeError(error)
    return out
