"""Ulysses sequence parallelism (issue 17): a packed row split over N = 2 ranks equals the whole row.

Pure tests of the slicing; a 2-process gloo test of the policy (per-sequence log-probs and every
gradient of a sliced row == the unsliced row, with slices that cut through a prompt, through an answer,
at a sequence boundary, and one slice holding no answer token); and the real trainer under the
deepspeed launcher (N = 2 on 2 ranks == the padded reference on ZeRO-1, 2 and 3, with gradient
checkpointing and with LoRA), plus the refusals.
"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from test_distributed import COMMON, ROOT, check_against_reference, free_port, launch, read_metrics
from test_distributed import assets, reference  # noqa: F401  (module fixtures)

from simpo_ds import sequence_parallel as spm
from simpo_ds.attention import SDPA_VARLEN
from simpo_ds.data.packing import collate_packed

SP2 = ["--sequence_parallel_size", "2"]


def pair(prompt: list[int], chosen: list[int], rejected: list[int]) -> dict:
    return {"chosen_input_ids": prompt + chosen, "chosen_prompt_len": len(prompt),
            "rejected_input_ids": prompt + rejected, "rejected_prompt_len": len(prompt)}


def ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 100) for _ in range(n)]


def cases() -> dict[str, list[dict]]:
    """Rows whose slices (N = 2 or 4) cut a prompt, an answer, a sequence boundary; one of odd length
    (a padding token); and a long-prompt pair whose first slice (N = 4) holds prompt tokens only."""
    rng = random.Random(0)
    return {
        "cut-in-answer": [pair(ids(rng, 3), ids(rng, 9), ids(rng, 2)), pair(ids(rng, 2), ids(rng, 3), ids(rng, 4))],
        "cut-in-prompt": [pair(ids(rng, 2), ids(rng, 2), ids(rng, 3)), pair(ids(rng, 12), ids(rng, 2), ids(rng, 2))],
        "cut-at-boundary": [pair(ids(rng, 3), ids(rng, 3), ids(rng, 2)), pair(ids(rng, 3), ids(rng, 3), ids(rng, 2))],
        "odd-length": [pair(ids(rng, 2), ids(rng, 3), ids(rng, 1)), pair(ids(rng, 1), ids(rng, 1), ids(rng, 2))],
        "prompt-only-slice": [pair(ids(rng, 40), ids(rng, 1), ids(rng, 1))],
    }


def test_slices_partition_the_labels_and_padding_carries_none():
    for name, pairs in cases().items():
        row = spm.pad_row(collate_packed(pairs), 2, 0)
        tokens = row["input_ids"].shape[1]
        assert tokens % 2 == 0 and int(row["cu_seqlens"][-1]) == tokens
        slices = [spm.slice_row(row, spm.SequenceParallel(2, r, 0, 1)) for r in (0, 1)]
        # every label predicted exactly once, by the rank holding the predicting position
        got = torch.cat([s["pred_positions"] + r * tokens // 2 for r, s in enumerate(slices)])
        assert torch.equal(got, row["pred_positions"]), name
        assert all(s["input_ids"].shape[1] == tokens // 2 for s in slices)
    full = collate_packed(cases()["cut-at-boundary"])
    assert full["input_ids"].shape[1] % 2 == 0 and int(full["cu_seqlens"][2]) == full["input_ids"].shape[1] // 2
    odd = collate_packed(cases()["odd-length"])
    padded = spm.pad_row(odd, 2, 0)
    assert odd["input_ids"].shape[1] % 2 == 1 and len(padded["cu_seqlens"]) == len(odd["cu_seqlens"]) + 1
    assert torch.equal(padded["pred_positions"], odd["pred_positions"])  # the padding segment has no labels
    long_prompt = spm.pad_row(collate_packed(cases()["prompt-only-slice"]), 4, 0)
    first = spm.slice_row(long_prompt, spm.SequenceParallel(4, 0, 0, 1))
    assert len(first["pred_positions"]) == 0 and long_prompt["input_ids"].shape[1] == 84


FA2 = "flash_attention_2"


def _worker(rank: int, port: int, world: int, kv_heads: int, kernels: tuple, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    import flash_attn_standin
    from tiny_models import tiny_model

    from simpo_ds.attention import attention_kwargs, register_attention
    from simpo_ds.model import SimPOPolicy

    calls = flash_attn_standin.install_in_process()  # transformers' own flash_attention_2 path, on CPU
    register_attention()
    torch.set_num_threads(1)
    sp = spm.make_groups(world, rank, world)
    errors = {}
    for kernel in kernels:
        name = spm.register(kernel)
        for case, pairs in cases().items():
            results = []
            for sliced in (False, True):
                model = tiny_model()
                if kv_heads != model.config.num_key_value_heads:  # MQA: 1 kv head (repeated for every rank)
                    cfg = model.config
                    cfg.num_key_value_heads = kv_heads
                    torch.manual_seed(0)
                    model = type(model)(cfg).float()
                model.config._attn_implementation = name if sliced else kernel
                batch = collate_packed(pairs)
                if sliced:
                    batch = spm.pad_row(batch, world, 0)
                    batch["attention_kwargs"] = attention_kwargs(batch, kernel)
                    row_cu, row_tokens = batch["cu_seqlens"], batch["input_ids"].shape[1]
                    batch = spm.slice_row(batch, sp)
                policy = SimPOPolicy(model, chunk_size=4, attn_kwargs_fn=lambda b: attention_kwargs(b, kernel),
                                     sequence_parallel=sp if sliced else None)
                if sliced:  # the lock-step chunk count both ranks run (as the trainer agrees it)
                    local = torch.tensor([len(batch["pred_positions"])])
                    dist.all_reduce(local, op=dist.ReduceOp.MAX)
                    batch["num_chunks"] = -(-int(local) // 4)
                calls.clear()
                seq = policy(batch)
                if sliced and kernel == FA2:  # the kernel ran on the gathered whole row, with its varlen kwargs
                    heads = model.config.num_attention_heads // world
                    ok = len(calls) == model.config.num_hidden_layers and all(
                        c["fn"] == "flash_attn_varlen_func" and c["q_shape"][:2] == (row_tokens, heads)
                        and torch.equal(c["cu_seqlens_q"], row_cu) and torch.equal(c["cu_seqlens_k"], row_cu)
                        and c["max_seqlen_q"] == int((row_cu[1:] - row_cu[:-1]).max()) and c["causal"]
                        for c in calls)
                    errors[f"{kernel}/{case}/varlen-kwargs"] = 0.0 if ok else float("inf")
                (seq.average * torch.arange(1.0, len(seq.average) + 1)).sum().backward()
                grads = {n: p.grad.clone() for n, p in model.named_parameters()}
                if sliced:  # a group's gradient is the sum of its ranks' gradients
                    for g in grads.values():
                        dist.all_reduce(g)
                results.append((seq.average.detach(), grads))
            (ref, ref_grads), (got, got_grads) = results
            errors[f"{kernel}/{case}"] = max([float((got - ref).abs().max())] + [
                float((got_grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-6)) for n, g in ref_grads.items()])
    queue.put((rank, errors))
    dist.destroy_process_group()


@pytest.mark.parametrize("world,kv_heads,kernels", [(2, 2, (SDPA_VARLEN, FA2)), (2, 1, (SDPA_VARLEN,)),
                                                    (4, 2, (SDPA_VARLEN,))],
                         ids=["N2-kv-heads-split-sdpa_varlen-and-flash_attention_2", "N2-mqa-kv-repeated",
                              "N4-kv-repeated"])
def test_sliced_row_equals_whole_row_logps_and_grads(world, kv_heads, kernels):
    """Per-sequence log-probs and every parameter gradient (summed over the group) of the sliced row
    == the whole row in one process (1e-5), through the Ulysses wrapper of each kernel; N = 4 puts a
    slice on prompt tokens only. ``flash_attention_2`` is transformers' own flash path over the CPU
    stand-in of flash-attn (tests/flash_attn_standin.py): under the wrapper it must get the gathered
    whole row and the row's cu_seqlens / max_seqlen (the wrapper's name once made transformers look
    for a flash kernel called 'ulysses_flash_attention_2')."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_worker, args=(free_port(), world, kv_heads, kernels, queue), nprocs=world,
                       start_method="spawn")
    for _ in range(world):
        rank, errors = queue.get(timeout=60)
        assert len(errors) == len(kernels) * len(cases()) + (len(cases()) if FA2 in kernels else 0)
        assert all(e <= 1e-5 for e in errors.values()), (rank, errors)


def test_tiled_mlp_equals_plain_mlp():
    """tile_mlps: the per-sequence log-probs and every gradient of a packed row == the untiled model;
    the projections really run tile by tile (forward, and again in backward)."""
    from tiny_models import tiny_model

    from simpo_ds.attention import SDPA_VARLEN, attention_kwargs, register_attention
    from simpo_ds.model import SimPOPolicy

    register_attention()
    batch = collate_packed(cases()["cut-in-answer"] + cases()["odd-length"])
    results, calls = [], []
    for tiled in (False, True):
        model = tiny_model()
        model.config._attn_implementation = SDPA_VARLEN
        if tiled:
            assert spm.tile_mlps(model, tokens_per_tile=8) == model.config.num_hidden_layers
        down = model.model.layers[0].mlp.down_proj
        handle = down.register_forward_hook(lambda *_: calls.append(tiled))
        policy = SimPOPolicy(model, chunk_size=4, attn_kwargs_fn=lambda b: attention_kwargs(b, SDPA_VARLEN))
        seq = policy(batch)
        (seq.average * torch.arange(1.0, len(seq.average) + 1)).sum().backward()
        handle.remove()
        results.append((seq.average.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref, ref_grads), (got, got_grads) = results
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for name, grad in ref_grads.items():  # relative to the gradient's largest entry, as everywhere
        assert float((got_grads[name] - grad).abs().max() / grad.abs().max()) <= 1e-5, name
    tiles = -(-batch["input_ids"].shape[1] // 8)
    assert calls.count(False) == 1 and calls.count(True) == 2 * tiles and tiles > 2


def test_heads_are_checked():
    from tiny_models import tiny_config

    cfg = tiny_config()  # 4 heads, 2 kv heads
    spm.check_heads(cfg, 2)
    spm.check_heads(cfg, 4)
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible"):
        spm.check_heads(cfg, 3)
    cfg.num_attention_heads, cfg.num_key_value_heads = 6, 3
    with pytest.raises(ValueError, match="num_key_value_heads=3 neither divides nor is divided by it"):
        spm.check_heads(cfg, 2)


# ---------------------------------------------------------------------------------------------
# the real trainer, 2 gloo ranks, N = 2 (one data-parallel group)
# ---------------------------------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.parametrize(
    "ds_config,extra",
    [("ds_configs/zero3.json", []), ("ds_configs/zero2.json", []), ("ds_configs/zero1.json", []),
     ("ds_configs/zero3_offload.json", ["--gradient_checkpointing", "true", "--tiled_mlp_tokens", "8"])],
    ids=["zero3", "zero2", "zero1", "zero3-offload-gradient-checkpointing-tiled-mlp"],
)
def test_two_ranks_one_group_equal_reference(assets, reference, tmp_path, ds_config, extra):  # noqa: F811
    """Step-1 loss, every metric and every gradient == the single-process padded reference; tokens
    counted once per group; the step-0 evaluation (ZeRO-3) == the reference on the eval pairs. The
    budget (per rank) makes rows of several pairs; a pair longer than it still trains."""
    out, dump = tmp_path / "run", tmp_path / "grads.pt"
    evaluate = ["--eval_data", assets["eval"], "--eval_on_start", "true"] if not extra and "zero3" in ds_config else []
    args = ["--dump", str(dump), "--model_name_or_path", assets["model"], "--train_data", assets["train"],
            "--output_dir", str(out), "--ds", ds_config, "--max_steps", "1", "--save_final", "false",
            "--max_tokens_per_microbatch", "40", *COMMON, *SP2, *extra, *evaluate]
    _, log = launch("tests/dist_worker.py", args, ranks=2)
    assert ("tiled MLP: 2 MLPs run in tiles of 8 tokens" in log) == ("--tiled_mlp_tokens" in extra)
    metrics, saved = read_metrics(out)[0], torch.load(dump)
    check_against_reference(metrics, saved, reference)
    data = _data(assets["train"])
    assert metrics["tokens/real"] == sum(data.pair_tokens[i] for i in saved["pair_ids"])  # once per group
    if evaluate:
        from reference import assert_metrics_close, reference_step
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32, attn_implementation="sdpa")
        evals = _data(assets["eval"])
        with torch.no_grad():
            _, _, expected = reference_step(model, evals.pairs(range(len(evals))))
        assert_metrics_close(read_metrics(out, "eval")[0], expected)


def _data(path: str):
    from run_assets import make_tokenizer

    from simpo_ds.config import SimPOConfig
    from simpo_ds.data.load import load_pairs, tokenize_dataset
    from simpo_ds.trainer import PairData

    return PairData(tokenize_dataset(load_pairs(path), make_tokenizer(), SimPOConfig(max_length=128,
                                                                                  max_prompt_length=64))[0])


@pytest.mark.distributed
def test_four_ranks_two_groups_equal_reference(assets, reference, tmp_path):  # noqa: F811
    """N = 2 x 2 data-parallel groups (4 CPU ranks, ZeRO-3): the planner balances pairs over the two
    groups, each group slices its rows; step 1 == the padded reference."""
    out, dump = tmp_path / "run", tmp_path / "grads.pt"
    args = ["--dump", str(dump), "--model_name_or_path", assets["model"], "--train_data", assets["train"],
            "--output_dir", str(out), "--ds", "ds_configs/zero3.json", "--max_steps", "1", "--save_final", "false",
            "--max_tokens_per_microbatch", "40", *COMMON, *SP2]
    launch("tests/dist_worker.py", args, ranks=4)
    check_against_reference(read_metrics(out)[0], torch.load(dump), reference)


@pytest.mark.distributed
def test_lora_two_ranks_one_group_equals_reference(assets, tmp_path):  # noqa: F811
    """LoRA under N = 2 (ZeRO-3): the reference gets the run's initial adapters."""
    import numpy as np
    from reference import assert_grads_close, assert_metrics_close, lora_model, reference_step
    from transformers import AutoModelForCausalLM

    out, dump = tmp_path / "run", tmp_path / "grads.pt"
    args = ["--dump", str(dump), "--model_name_or_path", assets["model"], "--train_data", assets["train"],
            "--output_dir", str(out), "--ds", "ds_configs/zero3.json", "--max_steps", "1", "--save_final", "false",
            "--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj,v_proj",
            *COMMON, *SP2]
    launch("tests/dist_worker.py", args, ranks=2)
    saved = torch.load(dump)
    data = _data(assets["train"])
    assert saved["pair_ids"] == [int(i) for i in np.random.default_rng(42).permutation(len(data))[:8]]
    model = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32, attn_implementation="sdpa")
    model = lora_model(model, saved["params"], 4, 8, ["q_proj", "v_proj"])
    loss, _, metrics = reference_step(model, data.pairs(saved["pair_ids"]))
    loss.backward()
    assert_metrics_close(read_metrics(out)[0], metrics)
    assert_grads_close(saved["grads"], {n: p.grad for n, p in model.named_parameters() if p.requires_grad})


@pytest.mark.distributed
def test_refusals_name_the_key(assets, tmp_path, capsys):  # noqa: F811
    base = ["--model_name_or_path", assets["model"], "--train_data", assets["train"], "--output_dir",
            str(tmp_path / "x"), "--max_steps", "1", *COMMON]
    one = subprocess.run([sys.executable, "launch/train.py", *base, *SP2], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 2 and "config key 'sequence_parallel_size': 2 does not divide the world size 1" in one.stderr
    code, out = launch("launch/train.py", [*base, "--ds", "ds_configs/zero3.json", *SP2, "--attn_implementation", "sdpa"],
                       ranks=2, check=False)
    assert code != 0 and "config key 'sequence_parallel_size': 2 needs a cu_seqlens attention" in out, out[-3000:]
    from simpo_ds.cli import train_main  # refused while reading the config: in process

    assert train_main([*base, *SP2, "--prompt_sharing", "true"]) == 2
    assert "config key 'sequence_parallel_size'" in capsys.readouterr().err
