"""The GPU check: ONE command a lent H200 runs inside 9 minutes; writes bench/RESULTS_gpu.md + .json.

    python -m bench.gpu_check                 # on the GPU machine (after installing the carried wheels)
    python -m bench.gpu_check --dry-run       # every phase on CPU at toy shapes (seconds; CI runs it)

On a bare lent machine (its image has torch 2.11, transformers, peft, accelerate; not deepspeed,
datasets, trl), ``bash bench/gpu_check.sh`` installs the wheels carried in ``.whl/`` and runs this.

Phases, each timed and recorded even when another fails (a failed phase is reported, not fatal):

1. ``exact``: on CUDA, a tiny Llama's packed varlen row (torch ``varlen_attn``; FlashAttention-2 too
   when flash-attn imports) against the padded sdpa reference — per-sequence log-probs and every
   gradient — in fp32 (TF32 off: 1e-4, kernels reorder sums) and bf16 (2e-2: 8 mantissa bits, ~4e-3 per
   rounding, a few dozen roundings deep); sequence parallelism's Ulysses wrapper around each real
   kernel (``varlen``, and ``flash_attention_2`` when flash-attn imports) at N = 1 on the one GPU
   against the kernel itself and the padded reference (bf16, 2e-2); prompt sharing through
   FlexAttention against standard packing (fp32, 1e-4); a 1-process ZeRO-3 training step
   (``launch/train.py``) against the reference loss (fp32, 1e-5). The dry run checks the wrapper around
   ``sdpa_varlen`` (fp32, 1e-5).
2. ``throughput``: ``bench.throughput`` on a Qwen2-0.5B-shaped random model, UltraFeedback-like
   lengths, bf16, 8192 tokens per micro-batch — packed vs padded vs TRL CPO-simpo; then the packed
   path alone on a Qwen2-1.5B shape for MFU (honest count, ``simpo_ds.flops``).
3. ``reducer``: peak GPU memory of the chunked reducer at vocab 151,936 x 16k tokens vs full logits.

Targets (issue 18): MFU >= 40% on the 1.5B shape; packed >= 1.8x padded and >= 2.5x TRL in real tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD, RESULTS_JSON = ROOT / "bench" / "RESULTS_gpu.md", ROOT / "bench" / "RESULTS_gpu.json"


# ---------------------------------------------------------------------------------------------
# phase 1: exactness
# ---------------------------------------------------------------------------------------------
def _pairs(seed: int, n: int, vocab: int, scale: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 12 * scale))]
        chosen = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 20 * scale))]
        rejected = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 20 * scale))]
        out.append({"chosen_input_ids": [1] + prompt + chosen + [2], "chosen_prompt_len": len(prompt) + 1,
                    "rejected_input_ids": [1] + prompt + rejected + [2], "rejected_prompt_len": len(prompt) + 1})
    return out


def _tiny(device: str, dtype, attn: str, vocab: int = 512):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def _logps_and_grads(model, batch, impl: str, sp=None):
    """Per-sequence average log-probs [2P] (chosen, rejected order) and parameter grads of their sum.

    ``sp``: a ``SequenceParallel`` (the model's attention then being the Ulysses wrapper of ``impl``): the
    row goes the trainer's way — padded to a multiple of N, on the device, the whole row's cu_seqlens
    kwargs, then this rank's slice."""
    import torch

    from simpo_ds import sequence_parallel as spm
    from simpo_ds.attention import attention_kwargs
    from simpo_ds.model import SimPOPolicy, batch_to_device

    model.zero_grad(set_to_none=True)
    policy = SimPOPolicy(model, attn_kwargs_fn=lambda b: attention_kwargs(b, impl), sequence_parallel=sp)
    batch = batch_to_device(batch if sp is None else spm.pad_row(batch, sp.size, 0), next(model.parameters()).device)
    if sp is not None:
        batch["attention_kwargs"] = attention_kwargs(batch, impl)
        batch = spm.slice_row(batch, sp)
    seq = policy(batch)
    avg = seq.average
    order = torch.cat([batch["chosen_seq"], batch["rejected_seq"]])
    avg[order].float().sum().backward()
    return avg[order].detach().float().cpu(), {n: p.grad.float().cpu() for n, p in model.named_parameters()}


def _max_rel(a, b) -> float:
    return float(((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item())


def compare_layouts(device: str, dtype_name: str, packed_impl: str, scale: int) -> dict:
    """Packed row through ``packed_impl`` vs the padded sdpa reference: worst relative error."""
    import torch

    from simpo_ds.attention import register_attention
    from simpo_ds.data.packing import collate_packed, collate_padded

    register_attention()
    dtype = getattr(torch, dtype_name)
    pairs = _pairs(0, 6, 512, scale)
    ref_logps, ref_grads = _logps_and_grads(_tiny(device, dtype, "sdpa"), collate_padded(pairs, 0), "sdpa")
    logps, grads = _logps_and_grads(_tiny(device, dtype, packed_impl), collate_packed(pairs), packed_impl)
    return {"logps": _max_rel(logps, ref_logps), "grads": max(_max_rel(grads[n], ref_grads[n]) for n in ref_grads)}


def compare_ulysses(device: str, dtype_name: str, kernel: str, scale: int) -> dict:
    """The Ulysses wrapper of ``kernel`` (what ``sequence_parallel_size > 1`` trains with) at N = 1 vs
    ``kernel`` itself and vs the padded sdpa reference: worst relative errors.

    N = 1 in this process (a world-1 group: one GPU cannot host two NCCL ranks), so the all-to-alls
    exchange nothing, but everything else is the sequence-parallel path on the real kernel: the model
    loaded under the wrapper's name, the kernel reached under its own name (flash_attention_2: transformers
    loads flash-attn by the config's name), the row padded/sliced with the whole row's cu_seqlens kwargs.
    The numbers across ranks are the CPU tests' (tests/test_sequence_parallel.py, N = 2 and 4)."""
    import torch
    import torch.distributed as dist

    from simpo_ds import sequence_parallel as spm
    from simpo_ds.attention import register_attention
    from simpo_ds.data.packing import collate_packed, collate_padded

    register_attention()
    dtype = getattr(torch, dtype_name)
    pairs = _pairs(2, 6, 512, scale)
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if device == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        sp = spm.make_groups(1, 0, 1)
        name = spm.register(kernel)
        ref_logps, ref_grads = _logps_and_grads(_tiny(device, dtype, "sdpa"), collate_padded(pairs, 0), "sdpa")
        plain_logps, plain_grads = _logps_and_grads(_tiny(device, dtype, kernel), collate_packed(pairs), kernel)
        logps, grads = _logps_and_grads(_tiny(device, dtype, name), collate_packed(pairs), kernel, sp=sp)
    finally:
        if own_group:
            dist.destroy_process_group()
    return {"wrapper": name,
            "logps": _max_rel(logps, ref_logps), "grads": max(_max_rel(grads[n], ref_grads[n]) for n in ref_grads),
            "vs_kernel_logps": _max_rel(logps, plain_logps),
            "vs_kernel_grads": max(_max_rel(grads[n], plain_grads[n]) for n in plain_grads)}


def compare_sharing(device: str, scale: int) -> dict:
    """Prompt sharing (FlexAttention on CUDA, dense sdpa mask on CPU) vs standard packing, fp32."""
    import torch

    from simpo_ds.attention import register_attention
    from simpo_ds.data.packing import collate_packed
    from simpo_ds.data.sharing import collate_shared
    from simpo_ds.shared_attention import choose_shared_attn_implementation

    register_attention()
    impl = choose_shared_attn_implementation("auto", device)
    packed_impl = "varlen" if device == "cuda" else "sdpa_varlen"
    pairs = _pairs(1, 6, 512, scale)
    ref_logps, ref_grads = _logps_and_grads(_tiny(device, torch.float32, packed_impl), collate_packed(pairs), packed_impl)
    logps, grads = _logps_and_grads(_tiny(device, torch.float32, impl), collate_shared(pairs), impl)
    return {"impl": impl, "logps": _max_rel(logps, ref_logps),
            "grads": max(_max_rel(grads[n], ref_grads[n]) for n in ref_grads)}


def zero3_step(out: Path, dry: bool) -> dict:
    """One ZeRO-3 step of ``launch/train.py`` (1 process) vs the padded reference loss, fp32."""
    import torch

    from bench.make_data import build
    from simpo_ds.config import SimPOConfig
    from simpo_ds.data.load import load_pairs, tokenize_dataset
    from simpo_ds.data.packing import collate_padded
    from simpo_ds.loss import get_batch_logps, simpo_loss
    from simpo_ds.trainer import PairData

    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "max_position_embeddings": 2048}
    summary = build(out / "data", pairs=16, scale=8, model_shape=shape)
    run = out / "zero3_run"
    shutil.rmtree(run, ignore_errors=True)  # a rerun in the same --out: one step, one train record
    cmd = [sys.executable, "launch/train.py", "--model_name_or_path", summary["paths"]["model"], "--train_data",
           summary["paths"]["uf_like"], "--output_dir", str(run), "--ds", "ds_configs/zero3.json", "--max_steps", "1",
           "--train_batch_size", "8", "--torch_dtype", "float32", "--max_length", "4096", "--max_prompt_length", "4000",
           "--save_final", "false", "--report_to", "none", "--seed", "42"]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"launch/train.py exit {done.returncode}:\n{done.stderr[-3000:]}")
    (record,) = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = SimPOConfig(max_length=4096, max_prompt_length=4000)
    tokenizer = AutoTokenizer.from_pretrained(summary["paths"]["model"])
    data = PairData(tokenize_dataset(load_pairs(summary["paths"]["uf_like"]), tokenizer, cfg)[0])
    import numpy as np

    ids = np.random.default_rng(42).permutation(len(data))[:8]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(summary["paths"]["model"], dtype=torch.float32,
                                                 attn_implementation="sdpa").to(device)
    batch = collate_padded(data.pairs(ids), tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    logps = get_batch_logps(logits.float().cpu(), batch["labels"])
    loss = simpo_loss(logps[:8], logps[8:])[0].mean().item()
    return {"loss": record["loss"], "reference_loss": loss, "rel_error": abs(record["loss"] - loss) / abs(loss)}


def phase_exact(out: Path, dry: bool) -> dict:
    import torch

    from simpo_ds.attention import _flash_attn_available

    device = "cpu" if dry else "cuda"
    if not dry:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    scale = 1 if dry else 8
    packed = "sdpa_varlen" if dry else "varlen"
    result = {"device": device, "fp32": {"tolerance": 1e-4, **compare_layouts(device, "float32", packed, scale)}}
    flash = not dry and _flash_attn_available()
    if not dry:
        result["bf16"] = {"tolerance": 2e-2, **compare_layouts(device, "bfloat16", packed, scale)}
        result["flash_attention_2_bf16"] = ({"tolerance": 2e-2,
                                             **compare_layouts(device, "bfloat16", "flash_attention_2", scale)}
                                            if flash else "flash-attn not installed")
    # sequence parallelism's wrapper around each real kernel (bf16: the CUDA kernels take no fp32)
    ulysses_dtype, ulysses_tol = ("float32", 1e-5) if dry else ("bfloat16", 2e-2)
    for kernel in [packed] + (["flash_attention_2"] if flash else []):
        result[f"ulysses_{kernel}_{ulysses_dtype}"] = {"tolerance": ulysses_tol,
                                                       **compare_ulysses(device, ulysses_dtype, kernel, scale)}
    if not dry and not flash:
        result["ulysses_flash_attention_2_bfloat16"] = "flash-attn not installed"
    result["prompt_sharing"] = {"tolerance": 1e-4, **compare_sharing(device, scale)}
    result["zero3_step"] = {"tolerance": 1e-5, **zero3_step(out, dry)}
    ulysses = [c for key, c in result.items() if key.startswith("ulysses_") and isinstance(c, dict)]
    checks = [result["fp32"], result.get("bf16"), result["prompt_sharing"], *ulysses]
    if isinstance(result.get("flash_attention_2_bf16"), dict):
        checks.append(result["flash_attention_2_bf16"])
    result["pass"] = all(c["logps"] <= c["tolerance"] and c["grads"] <= c["tolerance"] for c in checks if c)
    result["pass"] = result["pass"] and all(max(c["vs_kernel_logps"], c["vs_kernel_grads"]) <= c["tolerance"]
                                            for c in ulysses)
    result["pass"] = result["pass"] and result["zero3_step"]["rel_error"] <= 1e-5
    return result


# ---------------------------------------------------------------------------------------------
# phase 2: throughput and MFU; phase 3: reducer memory
# ---------------------------------------------------------------------------------------------
def _throughput(out: Path, tag: str, args: list[str]) -> dict:
    result = out / f"{tag}.json"
    cmd = [sys.executable, "-m", "bench.throughput", *args, "--no-write", "--json", str(result),
           "--data-dir", str(out / f"data_{tag}"), "--run-dir", str(out / f"runs_{tag}")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    if done.returncode != 0:
        raise RuntimeError(f"bench.throughput {tag} exit {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return json.loads(result.read_text())


def phase_throughput(out: Path, dry: bool) -> dict:
    import importlib.util

    systems = "packed,padded" + (",trl" if importlib.util.find_spec("trl") else "")  # trl: carried to the GPU
    if dry:
        common = ["--toy", "--inline", "--steps", "2", "--repeats", "1"]
        big, mfu = ["--systems", systems, *common], ["--systems", "packed", *common]
    else:
        common = ["--scale", "1", "--budget", "8192", "--batch", "16", "--trl-micro", "2", "--dtype", "bfloat16",
                  "--pairs", "64", "--repeats", "1"]
        big = ["--shape", "qwen2-0.5b", "--systems", systems, "--steps", "4", *common]
        mfu = ["--shape", "qwen2-1.5b", "--systems", "packed", "--steps", "4", *common]
    small, large = _throughput(out, "qwen2_0.5b", big), _throughput(out, "qwen2_1.5b", mfu)
    agg = small["aggregate"]
    ratios = {"packed_vs_padded": agg["packed"]["tokens_per_s"] / agg["padded"]["tokens_per_s"],
              "packed_vs_trl": agg["packed"]["tokens_per_s"] / agg["trl"]["tokens_per_s"] if "trl" in agg else None}
    mfu_value = large["aggregate"]["packed"]["tflops"] / (989.0 if not dry else large["peak_tflops"])
    return {"qwen2_0.5b": agg, "ratios": ratios, "qwen2_1.5b_packed": large["aggregate"]["packed"],
            "mfu_1.5b": mfu_value, "mfu_peak_tflops": 989.0 if not dry else large["peak_tflops"],
            "targets": {"mfu_1.5b>=0.40": mfu_value >= 0.40, "packed/padded>=1.8": ratios["packed_vs_padded"] >= 1.8,
                        "packed/trl>=2.5": ratios["packed_vs_trl"] is not None and ratios["packed_vs_trl"] >= 2.5}}


def phase_reducer(out: Path, dry: bool) -> dict:
    """Peak memory of forward+backward of summed answer log-probs: chunked reducer vs full logits."""
    import torch

    from simpo_ds.loss import auto_chunk_size, get_batch_logps, reduce_sequence_logps

    device = "cpu" if dry else "cuda"
    vocab, tokens, hidden = (1000, 512, 32) if dry else (151936, 16384, 896)
    dtype = torch.float32 if dry else torch.bfloat16
    rows = {}
    for method in ("reducer", "full"):
        torch.manual_seed(0)
        h = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
        head = torch.nn.Linear(hidden, vocab, bias=False, device=device, dtype=dtype)
        ids = torch.randint(0, vocab, (tokens,), device=device)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        if method == "full":
            labels = ids.clone()
            labels[0] = -100
            get_batch_logps(head(h)[None].float(), labels[None]).sum().backward()
        else:
            positions = torch.arange(tokens - 1, device=device)
            seq = torch.zeros(tokens - 1, dtype=torch.long, device=device)
            reduce_sequence_logps(h[None], head, positions, ids[1:], seq, torch.tensor([tokens - 1], device=device),
                                  chunk_size=auto_chunk_size(vocab)).average.sum().backward()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if device == "cuda" else float("nan")
        rows[method] = {"peak_gib": peak, "time_s": time.perf_counter() - start}
        del h, head
    rows["reducer_share_of_full"] = rows["reducer"]["peak_gib"] / rows["full"]["peak_gib"] if device == "cuda" else None
    return {"vocab": vocab, "tokens": tokens, "hidden": hidden, **rows}


PHASES = (("exact", phase_exact), ("throughput", phase_throughput), ("reducer", phase_reducer))


# ---------------------------------------------------------------------------------------------
def environment() -> dict:
    import torch

    env = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    for name in ("transformers", "deepspeed", "trl", "flash_attn", "datasets"):
        try:
            env[name] = __import__(name).__version__
        except Exception as err:  # not installed, or fails to import: say so
            env[name] = f"unavailable ({type(err).__name__})"
    env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                   text=True).stdout.strip() or "unknown"
    return env


def report(results: dict) -> str:
    lines = ["# simpo-ds on a GPU (`python -m bench.gpu_check`)", "",
             "```json", json.dumps(results["environment"], indent=1), "```", ""]
    for name, phase in results["phases"].items():
        lines += [f"## {name} ({phase['seconds']:.0f} s)", "", "```json", json.dumps(phase.get("result", phase), indent=1,
                                                                                     default=str), "```", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="every phase on CPU at toy shapes")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "gpu_check"), help="scratch directory")
    parser.add_argument("--phases", default=",".join(p for p, _ in PHASES))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"dry_run": args.dry_run, "environment": environment(), "phases": {}}
    wanted = args.phases.split(",")
    for name, fn in PHASES:
        if name not in wanted:
            continue
        start = time.perf_counter()
        try:
            results["phases"][name] = {"result": fn(out, args.dry_run)}
        except Exception:  # record and go on: one lease should return every phase it can
            results["phases"][name] = {"error": traceback.format_exc()[-4000:]}
        results["phases"][name]["seconds"] = time.perf_counter() - start
        print(f"[gpu_check] {name}: {results['phases'][name]['seconds']:.0f} s"
              + (" FAILED" if "error" in results["phases"][name] else ""), flush=True)
    md, js = (out / "RESULTS_gpu.md", out / "RESULTS_gpu.json") if args.dry_run else (RESULTS_MD, RESULTS_JSON)
    js.write_text(json.dumps(results, indent=1, default=str))
    md.write_text(report(results))
    print(report(results))
    return 1 if any("error" in p for p in results["phases"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
