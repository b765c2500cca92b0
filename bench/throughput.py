"""Training throughput: simpo-ds packed vs simpo-ds padded vs TRL's CPOTrainer (loss_type="simpo").

    python -m bench.throughput                  # lengths / 8 (~15 min on 2 CPU cores)
    python -m bench.throughput --scale 1 --budget 8192 --steps 4 --repeats 2 --systems packed,padded,trl \\
        --data-dir outputs/bench/data_full --section throughput_full_scale    # full lengths (~25 min)
    python -m bench.throughput --profile        # + where a packed step's time goes (one more process)
    python -m bench.throughput --toy --inline   # seconds: every code path at toy size (the smoke test)

Same model (a random Llama from ``bench.make_data``), same data (UltraFeedback-like lengths), same
hardware, same global batch (``--batch`` pairs per optimizer step) and the same pairs in the same steps
for the three systems; each run is a fresh process (``--worker``), and runs are interleaved
(packed, padded, trl, then rotated) so a change in machine load hits every system alike. Per run:

- real tokens/s and optimizer steps/s over the steady-state steps (the first step is warm-up: the
  wall-clock interval between the ends of consecutive optimizer steps, so collation is included);
- pack efficiency = real ÷ processed tokens (processed counts padding);
- attention work ÷ needed: attention-score elements the kernel computes (a packed row of T tokens:
  T², sdpa masks but does not skip; a padded row of L: L²) over the block-diagonal need Σ s_i²;
- useful TFLOP/s = ``simpo_ds.flops.training_flops`` per second: decoder matmul weights (no embedding) × 6 per
  real token, lm_head 6·H·V per answer-label row, attention 12·L·H_q per causal (q, k) pair;
- peak RSS of the process; the loss of the first step (same pairs, so it must agree across systems).

simpo-ds runs the real ``Trainer`` on one process, fp32, default attention, with ``--ds`` (default ZeRO-2: the
least DeepSpeed overhead on one process) and its own ``metrics.jsonl``. TRL is
``trl.experimental.cpo.CPOTrainer`` (trl 1.16 moved CPO there) with ``loss_type="simpo"``,
``cpo_alpha=0`` and ``simpo_gamma = gamma_beta_ratio * beta`` (TRL subtracts simpo_gamma / beta from
the difference of average log-probs, then scales by beta: the same loss), sequential sampling over
the rows in simpo-ds' step order, per-device batch ``--trl-micro`` pairs and gradient accumulation to
the same global batch. trl is a benchmark-only dependency (``pip install trl``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import ROOT, environment, environment_markdown, median, peak_rss_gib, write_section

SYSTEMS = ("packed", "padded", "trl")
EXPERIMENTS = ("packed_sdpa",)  # simpo-ds packed with the other CPU attention: see run_simpo
LABELS = {
    "packed": "simpo-ds packed (`sdpa_varlen`, the CPU default)",
    "packed_sdpa": "simpo-ds packed, `attn_implementation=sdpa`",
    "padded": "simpo-ds padded (`packing=False`)",
    "trl": "TRL CPOTrainer simpo",
}


@dataclass
class Settings:
    data_dir: str = "outputs/bench/data"  # bench.make_data output (built when missing)
    run_dir: str = "outputs/bench/throughput"  # per-run output dirs, logs, runs.jsonl
    dataset: str = "uf_like"  # uf_like | long_prompt
    pairs: int = 1024  # rows generated
    scale: float = 8.0  # full-scale token lengths divided by this
    batch: int = 16  # pairs per optimizer step (global), every system
    budget: int = 1024  # simpo-ds max_tokens_per_microbatch (the default 8192 / scale)
    trl_micro: int = 4  # TRL per_device_train_batch_size; accumulation = batch / trl_micro
    steps: int = 9  # optimizer steps per run; the first is warm-up
    repeats: int = 3
    ds: str = "ds_configs/zero2.json"
    beta: float = 2.0
    gamma_beta_ratio: float = 0.25
    learning_rate: float = 1e-4
    seed: int = 42
    max_length: int = 8192  # no truncation at these lengths (both trainers)
    model_shape: dict | None = None  # overrides of bench.make_data.MODEL_SHAPE (toy runs, SHAPES)
    vocab_size: int = 8192  # of the random model and its word-level tokenizer
    dtype: str = "float32"  # float32 (CPU) | bfloat16 (GPU: both trainers in bf16)
    threads: int = 0  # torch intra-op threads per run; 0 = every core

    @property
    def data_path(self) -> Path:
        return ROOT / self.data_dir / f"{self.dataset}.jsonl"

    @property
    def model_path(self) -> Path:
        return ROOT / self.data_dir / "model"


# Random models shaped like real ones (LlamaConfig: the same matmul shapes; Qwen2's qkv bias aside).
SHAPES = {
    "qwen2-0.5b": (dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                        num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True), 151936),
    "qwen2-1.5b": (dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                        num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True), 151936),
}

TOY = dict(data_dir="outputs/bench/toy_data", run_dir="outputs/bench/toy_runs", pairs=32, batch=4, budget=256,
           trl_micro=2, steps=2, repeats=1, model_shape={"hidden_size": 32, "intermediate_size": 64,
                                                         "num_hidden_layers": 1, "max_position_embeddings": 1024})


class _StepClock:
    """Wall-clock and process CPU time at the end of each optimizer step; the intervals between
    consecutive ends are the step times (collation and loop overhead included). CPU time counts only
    while this process runs, so it is robust to other load on a shared machine (with 1 thread)."""

    def __init__(self):
        self.marks: list[tuple[float, float]] = []

    def start(self) -> None:
        self.marks = [(time.perf_counter(), time.process_time())]

    def after(self, value=None):
        self.marks.append((time.perf_counter(), time.process_time()))
        return value

    def intervals(self) -> list[tuple[float, float]]:
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(self.marks, self.marks[1:])]


def step_order(num_rows: int, seed: int):
    """Row order of epoch 0 — the same seeded permutation as ``simpo_ds.trainer.Trainer._step_pairs``."""
    import numpy as np

    return np.random.default_rng(seed).permutation(num_rows)


# =============================================================================================
# workers (one process per run)
# =============================================================================================
def run_simpo(s: Settings, packing: bool, out: Path, attn: str = "auto") -> dict:
    """The real simpo-ds Trainer for ``s.steps`` steps; per-step numbers from its metrics.jsonl.

    ``attn``: ``auto`` is what ships (CPU: ``sdpa_varlen`` for packed rows, one sdpa per sequence;
    ``sdpa`` for padded batches); ``sdpa`` on a packed row (the ``packed_sdpa`` row) masks the whole
    row block-causally and computes T^2 scores for a row of T tokens.
    """
    from simpo_ds.config import SimPOConfig
    from simpo_ds.trainer import Trainer

    cfg = SimPOConfig(
        model_name_or_path=str(s.model_path), train_data=str(s.data_path), output_dir=str(out),
        deepspeed=str(ROOT / s.ds), torch_dtype=s.dtype, attn_implementation=attn,
        packing=packing, max_tokens_per_microbatch=s.budget, train_batch_size=s.batch, max_steps=s.steps,
        max_length=s.max_length, max_prompt_length=s.max_length - 1, beta=s.beta,
        gamma_beta_ratio=s.gamma_beta_ratio, learning_rate=s.learning_rate, lr_scheduler_type="constant",
        warmup_ratio=0.0, max_grad_norm=1.0, seed=s.seed, logging_steps=1, save_final=False,
    )
    trainer = Trainer(cfg)
    trainer.setup()
    clock = _StepClock()
    train_step = trainer.train_step
    trainer.train_step = lambda pair_ids: clock.after(train_step(pair_ids))  # bench-side wrapper
    clock.start()
    trainer.train()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    data = next(r for r in records if r["split"] == "data")
    if data["dropped"]:
        raise RuntimeError(f"simpo-ds dropped rows {data['dropped']}: the systems would see different pairs")
    train = [r for r in records if r["split"] == "train"]
    steps = []
    for k, (r, (wall, cpu)) in enumerate(zip(train, clock.intervals())):
        computed, needed = _simpo_attention_work(trainer, k, packing)
        steps.append({
            "real": r["tokens/real"], "processed": r["tokens/padded"], "attn_computed": computed,
            "attn_needed": needed, "flops": r["tflops_per_device"] * 1e12 * r["step_time_s"],
            "wall_s": wall, "cpu_s": cpu, "inner_s": r["step_time_s"], "loss": r["loss"],
        })
    first_rows = [int(i) for i in trainer.train_data.dataset[[int(i) for i in trainer._step_pairs(0)]]["index"]]
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.policy.parameters())
    return {"steps": steps, "num_params": n_params, "first_step_rows": sorted(first_rows)}


def _simpo_attention_work(trainer, step: int, packing: bool) -> tuple[float, float]:
    """(score elements computed, needed) for step ``step``, re-planned exactly as ``train_step`` does."""
    from simpo_ds.data.packing import plan_step

    data, pair_ids = trainer.train_data, trainer._step_pairs(step)
    plan = plan_step(data.pair_tokens[pair_ids].tolist(), trainer.world_size, trainer.cfg.max_tokens_per_microbatch)
    computed = needed = 0.0
    for micro in plan[trainer.rank]:
        pairs = data.pairs(pair_ids[list(micro.pairs)])
        lengths = [len(p[k]) for p in pairs for k in ("chosen_input_ids", "rejected_input_ids")]
        needed += sum(n * n for n in lengths)
        if packing and trainer.attn_impl == "sdpa_varlen":
            computed += sum(n * n for n in lengths)
        else:
            computed += sum(lengths) ** 2 if packing else len(lengths) * max(lengths) ** 2
    return computed, needed


def run_trl(s: Settings, out: Path) -> dict:
    """TRL CPOTrainer(loss_type="simpo", cpo_alpha=0) over the same rows in simpo-ds' step order."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    from simpo_ds.flops import flop_shape, training_flops

    rows = [json.loads(line) for line in s.data_path.read_text().splitlines()]
    order = step_order(len(rows), s.seed)[: s.steps * s.batch]
    dataset = datasets.Dataset.from_list([rows[i] for i in order])
    tokenizer = AutoTokenizer.from_pretrained(s.model_path)
    model = AutoModelForCausalLM.from_pretrained(s.model_path, dtype=getattr(torch, s.dtype), attn_implementation="sdpa")
    micro_records: list[dict] = []

    class Recording(CPOTrainer):
        def get_batch_loss_metrics(self, model, batch, train_eval="train"):
            loss, metrics = super().get_batch_loss_metrics(model, batch, train_eval)
            masks = (batch["chosen_attention_mask"], batch["rejected_attention_mask"])
            width = max(m.shape[1] for m in masks)  # concatenated_inputs pads both halves to this
            lengths = torch.cat([m.sum(-1) for m in masks]).double()
            labels = sum(int((batch[k] != -100).sum()) for k in ("chosen_labels", "rejected_labels"))
            micro_records.append({
                "real": float(lengths.sum()), "processed": float(lengths.numel() * width),
                "attn_computed": float(lengths.numel() * width**2), "attn_needed": float((lengths**2).sum()),
                "causal_pairs": float(((lengths**2).sum() + lengths.sum()) / 2), "head_rows": float(labels),
                "loss": float(loss.detach()),
            })
            return loss, metrics

    clock = _StepClock()

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock.start()

        def on_step_end(self, args, state, control, **kw):
            clock.after()

    args = CPOConfig(
        output_dir=str(out), per_device_train_batch_size=s.trl_micro,
        gradient_accumulation_steps=s.batch // s.trl_micro, max_steps=s.steps, learning_rate=s.learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused",
        beta=s.beta, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=s.gamma_beta_ratio * s.beta,
        max_length=s.max_length, train_sampling_strategy="sequential", use_cpu=not torch.cuda.is_available(),
        bf16=s.dtype == "bfloat16",
        dataloader_num_workers=0, logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        seed=s.seed, remove_unused_columns=False,
    )
    trainer = Recording(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                        callbacks=[Clock()])
    trainer.train()
    shape = flop_shape(model)
    n_params = sum(p.numel() for p in model.parameters())
    accumulation = s.batch // s.trl_micro
    steps = []
    for k in range(s.steps):
        micro = micro_records[k * accumulation : (k + 1) * accumulation]
        total = {key: sum(m[key] for m in micro)
                 for key in ("real", "processed", "attn_computed", "attn_needed", "causal_pairs", "head_rows")}
        # useful FLOPs of these pairs, counted as simpo-ds counts its own (simpo_ds.flops)
        total["flops"] = training_flops(shape, total["real"], total["head_rows"], total["causal_pairs"])
        total["wall_s"], total["cpu_s"] = clock.intervals()[k]
        total["loss"] = sum(m["loss"] for m in micro) / len(micro)  # equal-size micro-batches: the pair mean
        steps.append(total)
    return {"steps": steps, "num_params": n_params, "first_step_rows": sorted(int(i) for i in order[: s.batch])}


def run_profile(s: Settings, out: Path) -> dict:
    """A packed simpo-ds run with timers around each phase of ``train_step`` (bench-side wrappers on
    the instances; the trainer is unchanged) and a torch.profiler op table of one steady step."""
    import torch

    import simpo_ds.trainer as trainer_module
    from simpo_ds.config import SimPOConfig
    from simpo_ds.trainer import Trainer

    cfg = SimPOConfig(
        model_name_or_path=str(s.model_path), train_data=str(s.data_path), output_dir=str(out),
        deepspeed=str(ROOT / s.ds), torch_dtype=s.dtype, attn_implementation="auto", packing=True,
        max_tokens_per_microbatch=s.budget, train_batch_size=s.batch, max_steps=10**6,
        max_length=s.max_length, max_prompt_length=s.max_length - 1, beta=s.beta,
        gamma_beta_ratio=s.gamma_beta_ratio, learning_rate=s.learning_rate, lr_scheduler_type="constant",
        warmup_ratio=0.0, seed=s.seed, save_final=False,
    )
    trainer = Trainer(cfg)
    trainer.setup()
    trainer.engine.train()
    phases: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    body = trainer.policy.causal_lm.get_decoder()
    body_start = []
    body.register_forward_pre_hook(lambda *_: body_start.append(time.perf_counter()))
    body.register_forward_hook(
        lambda *_: phases.__setitem__("forward: decoder body", phases.get("forward: decoder body", 0.0)
                                      + time.perf_counter() - body_start.pop()))
    trainer._collate = timed("collation (+ fetching rows)", trainer._collate)
    trainer.engine.forward = timed("forward: total", trainer.engine.forward)
    trainer.engine.backward = timed("backward (incl. reducer recompute, ZeRO grad hooks)", trainer.engine.backward)
    trainer.engine.step = timed("optimizer step (DeepSpeed ZeRO + AdamW)", trainer.engine.step)
    trainer_module.plan_step = timed("planning", trainer_module.plan_step)
    trainer_module.microbatch_loss = timed("loss + metrics", trainer_module.microbatch_loss)

    trainer.train_step(trainer._step_pairs(0))  # warm-up
    phases.clear()
    measured = max(s.steps - 1, 1)
    start = time.perf_counter()
    for k in range(1, 1 + measured):
        trainer.train_step(trainer._step_pairs(k))
    total = time.perf_counter() - start
    per_step = {name: value / measured for name, value in phases.items()}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        trainer.train_step(trainer._step_pairs(1 + measured))
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60)
    per_step["forward: reducer (lm_head chunks, log-softmax, index_add)"] = (
        per_step.pop("forward: total") - per_step["forward: decoder body"])
    per_step["other (step bookkeeping, metrics)"] = total / measured - sum(per_step.values())
    return {"per_step_s": per_step, "step_s": total / measured, "op_table": table, "steps": []}


def run_sgemm(repeats: int = 20, n: int = 1024) -> dict:
    """The attainable matmul rate (best of ``repeats`` n x n x n products): the MFU peak on CPU (fp32).
    On a GPU: bf16 8192³ products, synchronised (the dense peak MFU is usually quoted against)."""
    import torch

    cuda = torch.cuda.is_available()
    n = 8192 if cuda else n
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2)) if cuda else (torch.randn(n, n), torch.randn(n, n))
    a @ b
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return {"peak_tflops": 2 * n**3 / best / 1e12, "steps": [], "num_params": 0, "first_step_rows": []}


def worker(system: str, s: Settings, result: Path) -> None:
    import torch

    torch.set_num_threads(s.threads or os.cpu_count())
    out = ROOT / s.run_dir / result.stem
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.perf_counter()
    if system == "sgemm":
        res = run_sgemm()
    elif system == "trl":
        res = run_trl(s, out)
    elif system == "profile":
        res = run_profile(s, out)
    else:
        res = run_simpo(s, system != "padded", out, attn="sdpa" if system == "packed_sdpa" else "auto")
    res.update(system=system, process_s=time.perf_counter() - started, peak_rss_gib=peak_rss_gib(),
               peak_gpu_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0)
    result.write_text(json.dumps(res))


# =============================================================================================
# orchestration
# =============================================================================================
def worker_env(s: Settings) -> dict:
    return {
        "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
        "OMP_NUM_THREADS": str(s.threads or os.cpu_count()),
        # a bench-private JIT cache: DeepSpeed's CPU comm op (built once, ~1 min) is otherwise rebuilt
        # whenever another process sharing the default cache has invalidated it
        "TORCH_EXTENSIONS_DIR": os.environ.get("BENCH_TORCH_EXTENSIONS_DIR",
                                               str(ROOT / "outputs" / "bench" / "torch_extensions")),
    }


def _spawn(system: str, s: Settings, tag: str, inline: bool) -> dict:
    run_dir = ROOT / s.run_dir
    result = run_dir / f"{tag}.json"
    if inline:
        worker(system, s, result)
        return json.loads(result.read_text())
    env = {**os.environ, **worker_env(s)}
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "bench.throughput", "--worker", system,
           "--settings", json.dumps(dataclasses.asdict(s)), "--result", str(result)]
    with open(run_dir / f"{tag}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=1200)
    if proc.returncode != 0 or not result.is_file():
        raise RuntimeError(f"{system} run failed (exit {proc.returncode}); see {run_dir / f'{tag}.log'}")
    return json.loads(result.read_text())


def summarize_run(res: dict) -> dict:
    """Per-run numbers over the steady-state steps (all steps count for efficiency and work ratios)."""
    steps, steady = res["steps"], res["steps"][1:] or res["steps"]
    wall = sum(x["wall_s"] for x in steady)
    return {
        "system": res["system"],
        "tokens_per_s": sum(x["real"] for x in steady) / wall,
        "tokens_per_cpu_s": sum(x["real"] for x in steady) / sum(x["cpu_s"] for x in steady),
        "steps_per_s": len(steady) / wall,
        "pack_efficiency": sum(x["real"] for x in steps) / sum(x["processed"] for x in steps),
        "attn_work_ratio": sum(x["attn_computed"] for x in steps) / sum(x["attn_needed"] for x in steps),
        "tflops": sum(x["flops"] for x in steady) / wall / 1e12,
        "peak_rss_gib": res["peak_rss_gib"],
        "peak_gpu_gib": res.get("peak_gpu_gib", 0.0),
        "first_loss": steps[0]["loss"],
        "real_tokens_per_step": sum(x["real"] for x in steps) / len(steps),
    }


def run_all(s: Settings, systems, inline: bool = False, profile: bool = False) -> tuple[list[dict], dict | None]:
    from bench.make_data import build

    (ROOT / s.run_dir).mkdir(parents=True, exist_ok=True)
    summary = build(ROOT / s.data_dir, s.pairs, s.scale, vocab_size=s.vocab_size, model_shape=s.model_shape)
    peak = _spawn("sgemm", s, "sgemm", inline)["peak_tflops"]
    runs = []
    for r in range(s.repeats):
        rotated = systems[r % len(systems):] + systems[: r % len(systems)]  # interleave, vary the position
        for system in rotated:
            t = time.perf_counter()
            res = _spawn(system, s, f"{system}_r{r}", inline)
            row = {**summarize_run(res), "repeat": r, "first_step_rows": res["first_step_rows"],
                   "num_params": res["num_params"]}
            runs.append(row)
            print(f"[{time.strftime('%H:%M:%S')}] {system} r{r}: {row['tokens_per_s']:.0f} tok/s, "
                  f"{row['tokens_per_cpu_s']:.0f} tok/cpu-s, {row['steps_per_s']:.3f} steps/s, eff {row['pack_efficiency']:.3f}, "
                  f"loss {row['first_loss']:.6f}, rss {row['peak_rss_gib']:.2f} GiB "
                  f"({time.perf_counter() - t:.0f} s, load {os.getloadavg()[0]:.1f})", flush=True)
    with open(ROOT / s.run_dir / "runs.jsonl", "a") as f:
        for row in runs:
            f.write(json.dumps({k: v for k, v in row.items() if k != "first_step_rows"}) + "\n")
    prof = _spawn("profile", s, "profile", inline) if profile else None
    peak = max(peak, _spawn("sgemm", s, "sgemm", inline)["peak_tflops"])  # the better of start and end
    return runs, {"data": summary, "profile": prof, "peak_tflops": peak}


# =============================================================================================
# report
# =============================================================================================
def aggregate(runs: list[dict], systems) -> dict[str, dict]:
    keys = ("tokens_per_s", "tokens_per_cpu_s", "steps_per_s", "pack_efficiency", "attn_work_ratio", "tflops", "peak_rss_gib",
            "peak_gpu_gib", "first_loss", "real_tokens_per_step")
    out = {}
    for system in systems:
        mine = [r for r in runs if r["system"] == system]
        if mine:
            out[system] = {k: median(r[k] for r in mine) for k in keys}
            out[system]["spread"] = (min(r["tokens_per_s"] for r in mine), max(r["tokens_per_s"] for r in mine))
            out[system]["n"] = len(mine)
    return out


def paired_ratios(runs: list[dict], a: str, b: str) -> list[float]:
    """tokens/s of ``a`` ÷ ``b`` within each repeat (runs of one repeat are minutes apart), so the
    spread of the ratio shows how much machine load moved during the benchmark."""
    by = {(r["system"], r["repeat"]): r["tokens_per_s"] for r in runs}
    return [by[(a, k)] / by[(b, k)] for k in sorted({r["repeat"] for r in runs}) if (a, k) in by and (b, k) in by]


def _check(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def report(s: Settings, runs: list[dict], extra: dict, env: dict, env_end: str, systems, command: str) -> str:
    agg = aggregate(runs, systems)
    data = extra["data"]
    lengths = data["lengths"][s.dataset]
    same_rows = len({tuple(r["first_step_rows"]) for r in runs}) == 1
    losses = [agg[x]["first_loss"] for x in agg]
    loss_gap = max(losses) - min(losses)
    lines = [
        f"## Throughput: packed vs padded vs TRL (CPU, {s.threads or os.cpu_count()} thread(s) per run)",
        "",
        f"`{command}`",
        "",
        environment_markdown(env) + f"- load average at the end: {env_end}",
        f"- model: random Llama {json.dumps(data['settings']['model_shape'])}, vocab {data['settings']['vocab_size']}"
        f" -> **{data['num_params'] / 1e6:.2f} M parameters**; fp32, **{s.threads or os.cpu_count()} torch thread(s)** per run",
        f"- data: `{s.dataset}` ({s.pairs} pairs, seed {data['settings']['seed']}), UltraFeedback-like lengths "
        f"**divided by {s.scale:g}**: prompt median {lengths['prompt']['median']:g} (p90 {lengths['prompt']['p90']:g}, "
        f"max {lengths['prompt']['max']}), chosen median {lengths['chosen']['median']:g} (max {lengths['chosen']['max']}), "
        f"rejected median {lengths['rejected']['median']:g}; tokens per pair (BOS+EOS, prompt twice) median "
        f"{lengths['pair_tokens']['median']:g}, mean {lengths['pair_tokens']['mean']:g}",
        f"- global batch **{s.batch} pairs** per optimizer step for all; simpo-ds: `{s.ds}` on 1 process, "
        f"`max_tokens_per_microbatch={s.budget}` (8192 / {s.scale:g}), the padded run uses the same planner "
        f"(micro-batches = the packed ones, padded); TRL: per-device batch {s.trl_micro}, gradient accumulation "
        f"{s.batch // s.trl_micro}, sequential sampler over the rows in simpo-ds' step order",
        f"- beta {s.beta}, gamma_beta_ratio {s.gamma_beta_ratio} (TRL `simpo_gamma={s.beta * s.gamma_beta_ratio:g}`, "
        f"`cpo_alpha=0`), lr {s.learning_rate} constant, AdamW (torch's fused kernel in both trainers: simpo-ds' "
        f"default client optimizer, TRL `optim=adamw_torch_fused`), clip 1.0",
        f"- {s.steps} optimizer steps per run, the first is warm-up; {s.repeats} repeats per system, interleaved; "
        f"each number is the **median over repeats** (tokens/s range in the last column); step time = wall-clock "
        f"interval between the ends of consecutive optimizer steps; tokens / CPU-s uses the process CPU time of "
        f"the same intervals (insensitive to other processes' load when runs use 1 thread)",
        "- attention: simpo-ds packed uses `sdpa_varlen` (its CPU default: one causal sdpa per sequence of the "
        "row), padded simpo-ds and TRL use sdpa with a padding mask; attention work ÷ needed: attention-score "
        "elements computed (`sdpa_varlen`: Σ s_i²; a packed row of T tokens through sdpa with a block-causal "
        "mask: T², nothing skipped; a padded row of width L: L²) over the block-diagonal need Σ s_i²; "
        "useful TFLOP/s counts what the pairs need (`simpo_ds.flops.training_flops`: 6·N_body per real token, no "
        "embedding; 6·H·V per answer-label row; 12·L·H_q per causal (q, k) pair); MFU = that ÷ "
        f"the measured fp32 sgemm rate of this CPU with the same threads ({extra['peak_tflops']:.3f} TFLOP/s, "
        "1024³ matmul, best of 20, at start and end)",
        "",
        "| system | real tokens/s | real tokens / CPU-s | optimizer steps/s | pack efficiency | attention work ÷ needed | "
        "useful TFLOP/s | MFU | peak RSS (GiB) | first-step loss | tokens/s min–max (n) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for system, a in agg.items():
        lines.append(
            f"| {LABELS[system]} | {a['tokens_per_s']:.0f} | {a['tokens_per_cpu_s']:.0f} | {a['steps_per_s']:.3f} | {a['pack_efficiency']:.1%} | "
            f"{a['attn_work_ratio']:.2f}× | {a['tflops']:.4f} | {a['tflops'] / extra['peak_tflops']:.1%} | "
            f"{a['peak_rss_gib']:.2f} | {a['first_loss']:.6f} | "
            f"{a['spread'][0]:.0f}–{a['spread'][1]:.0f} ({a['n']}) |")
    lines += ["", "Targets:", ""]
    if "packed" in agg:
        p = agg["packed"]
        lines.append(f"- pack efficiency ≥ 98% on the UltraFeedback-like set: {p['pack_efficiency']:.1%} — "
                     f"{_check(p['pack_efficiency'] >= 0.98)} (a packed row has no padding by construction)")
        for other in ("padded", "trl"):
            if other in agg:
                ratio = p["tokens_per_s"] / agg[other]["tokens_per_s"]
                cpu_ratio = p["tokens_per_cpu_s"] / agg[other]["tokens_per_cpu_s"]
                paired = ", ".join(f"{x:.2f}" for x in paired_ratios(runs, "packed", other))
                lines.append(f"- packed real tokens/s ≥ 1.5× {LABELS[other]}: {ratio:.2f}× — {_check(ratio >= 1.5)}"
                             f" (per CPU-second: {cpu_ratio:.2f}×; within each repeat: {paired}; its pack "
                             f"efficiency {agg[other]['pack_efficiency']:.1%})")
    lines.append(f"- first-step loss agrees across systems to 1e-4: max difference {loss_gap:.1e} — "
                 f"{_check(loss_gap <= 1e-4)}; same step-1 pairs in every run: {same_rows}")
    prof = extra.get("profile")
    if prof:
        lines += ["", f"### Where a packed step's time goes (`--profile`, mean of {max(s.steps - 1, 1)} steady steps,"
                  f" {prof['step_s']:.2f} s per step)", "", "| phase | s / step | share |", "|---|---|---|"]
        for name, value in sorted(prof["per_step_s"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {name} | {value:.3f} | {value / prof['step_s']:.0%} |")
        lines += ["", "Top ops of one packed step (torch.profiler, self CPU time):", "", "```",
                  prof["op_table"].strip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", choices=SYSTEMS + EXPERIMENTS + ("profile", "sgemm"), help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--systems", default=",".join(SYSTEMS + EXPERIMENTS),
                        help=f"comma-separated, from {', '.join(SYSTEMS + EXPERIMENTS)}")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--pairs", type=int, help="rows generated (default 1024)")
    parser.add_argument("--budget", type=int)
    parser.add_argument("--trl-micro", type=int, dest="trl_micro")
    parser.add_argument("--dataset", choices=("uf_like", "long_prompt"))
    parser.add_argument("--scale", type=float, help="divide UltraFeedback-like lengths by this (default 8; 1 = full)")
    parser.add_argument("--data-dir", dest="data_dir", help="bench.make_data output (default outputs/bench/data)")
    parser.add_argument("--run-dir", dest="run_dir", help="run outputs and logs (default outputs/bench/throughput)")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: every core)")
    parser.add_argument("--ds", help="simpo-ds DeepSpeed config (default ds_configs/zero2.json)")
    parser.add_argument("--profile", action="store_true", help="also time the phases of a packed step")
    parser.add_argument("--toy", action="store_true", help="toy sizes (seconds): for the smoke test")
    parser.add_argument("--inline", action="store_true", help="run the systems in this process (toy runs)")
    parser.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
    parser.add_argument("--section", default="throughput", help="RESULTS.md section to (re)write")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a real model's shape (random weights, its vocabulary)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"))
    parser.add_argument("--json", help="also write the aggregated results here (bench.gpu_check reads it)")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, Settings(**json.loads(args.settings)), Path(args.result))
        return
    s = Settings(**TOY) if args.toy else Settings()
    if args.shape:
        s.model_shape, s.vocab_size = SHAPES[args.shape]
    for key in ("repeats", "steps", "batch", "budget", "trl_micro", "dataset", "scale", "ds", "threads", "data_dir",
                "run_dir", "dtype", "pairs"):
        if getattr(args, key) is not None:
            setattr(s, key, getattr(args, key))
    if s.batch % s.trl_micro:
        parser.error("--batch must be a multiple of --trl-micro")
    systems = tuple(x for x in args.systems.split(",") if x)
    if args.inline:  # this process runs the workers: same environment as a spawned worker
        os.environ.update(worker_env(s))
    env = environment()
    runs, extra = run_all(s, systems, inline=args.inline, profile=args.profile)
    command = " ".join(["python -m bench.throughput", *(argv if argv is not None else sys.argv[1:])])
    text = report(s, runs, extra, env, environment()["load_avg"], systems, command)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": dataclasses.asdict(s), "peak_tflops": extra["peak_tflops"],
                                               "aggregate": aggregate(runs, systems), "runs": runs}, indent=1))
    if not (args.toy or args.no_write):
        write_section(args.section, text)


if __name__ == "__main__":
    main()
