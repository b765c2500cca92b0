"""ZeRO-3 lock-step with a real-sized vocabulary (issue 15).

Under ZeRO-3 every call of the partitioned lm_head all-gathers its weight, so every rank must run the
same number of reducer chunks per micro-batch. With a 33k vocabulary the auto chunk is 1024 rows, and
the fixture's ranks need different counts: one holds a long prompt with short answers (1 chunk), the
other a short prompt with long answers (3 chunks), plus a short pair that makes one rank run a
zero-weight filler. Before the fix each rank ran its own count and the job crashed or hung (in eval
too); now the counts are agreed from the pack plan. Every run here equals the single-process padded
reference: loss, every metric, every gradient, the eval metrics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from reference import assert_grads_close, assert_metrics_close, lora_model, reference_step
from run_assets import make_assets, make_rows, make_tokenizer, skewed_rows, write_jsonl
from test_distributed import launch, read_metrics

from simpo_ds.config import SimPOConfig
from simpo_ds.data.load import load_pairs, tokenize_dataset
from simpo_ds.data.packing import collate_packed, collate_padded, plan_step
from simpo_ds.data.sharing import collate_shared
from simpo_ds.lockstep import CallCounter, LockstepError, check_equal
from simpo_ds.loss import auto_chunk_size, lockstep_chunk_counts, num_chunks, reduce_sequence_logps
from simpo_ds.trainer import PairData

NUM_WORDS = 33_000  # vocabulary 33,009: auto chunk 1024 rows
MAX_LENGTH, MAX_PROMPT = 2048, 1800


# ---------------------------------------------------------------------------------------------
# pure: chunk agreement and the reducer with empty chunks
# ---------------------------------------------------------------------------------------------
def test_lockstep_chunk_counts_is_the_max_over_ranks():
    # rows[rank][micro-batch]; chunk of 1024 rows
    rows = [[80, 10, 0], [3000, 1025, 1]]
    assert [[num_chunks(r, 1024) for r in rank] for rank in rows] == [[1, 1, 0], [3, 2, 1]]
    assert lockstep_chunk_counts(rows, 1024) == [3, 2, 1]


def test_reducer_with_extra_empty_chunks_is_bit_identical():
    """Chunks past a rank's rows are empty lm_head calls: same values, same gradients, bit for bit."""
    torch.manual_seed(0)
    hidden = torch.randn(1, 23, 8, requires_grad=True)
    head = torch.nn.Linear(8, 50, bias=False)
    positions = torch.randperm(23)[:17]
    labels, seq = torch.randint(0, 50, (17,)), torch.randint(0, 3, (17,)).sort().values
    counts = torch.bincount(seq, minlength=3)
    results = []
    for chunks in (None, 3, 5):  # local count = ceil(17 / 7) = 3
        hidden.grad, head.weight.grad = None, None
        calls = []
        handle = head.register_forward_pre_hook(lambda *_: calls.append(1))
        out = reduce_sequence_logps(hidden, head, positions, labels, seq, counts, chunk_size=7, chunks=chunks)
        out.logp_sum.sum().backward()
        handle.remove()
        results.append((out.logp_sum.detach(), out.logit_sum, hidden.grad.clone(), head.weight.grad.clone(), len(calls)))
    for got in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got[:4], results[0][:4]))
    # forward calls + the recomputation of every checkpointed chunk (all but the last)
    assert [r[4] for r in results] == [3 + 2, 3 + 2, 5 + 4]


def test_reducer_refuses_fewer_chunks_than_its_rows_need():
    hidden = torch.randn(1, 10, 4)
    with pytest.raises(RuntimeError, match="do not fit 1 chunk"):
        reduce_sequence_logps(hidden, torch.nn.Linear(4, 9), torch.arange(9), torch.zeros(9, dtype=torch.long),
                              torch.zeros(9, dtype=torch.long), torch.tensor([9]), chunk_size=4, chunks=1)


# ---------------------------------------------------------------------------------------------
# the debug check, on two plain gloo processes
# ---------------------------------------------------------------------------------------------
def _counter_worker(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    counter = CallCounter(model)
    x = torch.randn(3, 4)
    model(x)
    counter.check("first forward")  # equal: passes
    model(x)
    if rank == 1:
        model[2](model[0](x))  # rank 1 calls both Linears once more
    try:
        counter.check("second forward")
        queue.put((rank, "no error"))
    except LockstepError as err:
        queue.put((rank, str(err)))
    try:
        check_equal({"planned lm_head chunks": 1 + 2 * rank}, "micro-batch 1")
    except LockstepError as err:
        queue.put((rank, str(err)))
    dist.destroy_process_group()


def test_call_counter_names_the_module_and_the_counts():
    from test_distributed import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_counter_worker, args=(free_port(), queue), nprocs=2, start_method="spawn")
    messages = [queue.get(timeout=30) for _ in range(4)]
    for rank in (0, 1):
        call, plan = sorted((m for r, m in messages if r == rank), key=lambda m: "planned" in m)
        assert "second forward: calls of module 0 differs (rank 0: 1, rank 1: 2)" in call, call
        assert "micro-batch 1: planned lm_head chunks differs (rank 0: 1, rank 1: 3)" in plan, plan


# ---------------------------------------------------------------------------------------------
# the fixture: ranks that need different chunk counts
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny Llama with a 33k vocabulary; train = eval = two skewed pairs + one short pair."""
    assets = make_assets(tmp_path_factory.mktemp("lockstep"), pairs=4, num_words=NUM_WORDS)
    rows = skewed_rows() + make_rows(1, seed=5)
    write_jsonl(Path(assets["train"]), rows)
    write_jsonl(Path(assets["eval"]), rows)
    return assets


@pytest.fixture(scope="module")
def data(assets):
    cfg = SimPOConfig(max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT)
    return PairData(tokenize_dataset(load_pairs(assets["train"]), make_tokenizer(NUM_WORDS), cfg)[0])


def budget(data) -> int:
    """Token budget that fits the longest pair alone: the short pair then needs a second micro-batch."""
    return int(data.pair_tokens.max())


def test_fixture_ranks_need_different_chunk_counts(data):
    """What the ranks ran before the fix (each its own ceil(rows / 1024)) differs; a filler is planned."""
    chunk = auto_chunk_size(NUM_WORDS + 9)
    assert chunk == 1024
    ids = np.arange(len(data))
    plan = plan_step(data.pair_tokens[ids].tolist(), 2, budget(data))
    rows = [[int(data.label_tokens[list(m.pairs)].sum()) for m in rank] for rank in plan]
    local = [[num_chunks(r, chunk) for r in rank] for rank in rows]
    assert local[0] != local[1], local
    assert sorted(local[0] + local[1])[-1] == 3 and min(min(local)) == 1, local
    assert any(m.weight == 0 for rank in plan for m in rank), "no filler micro-batch in the fixture"
    assert lockstep_chunk_counts(rows, chunk) == [max(a, b) for a, b in zip(*local)]


def test_label_tokens_match_every_collator(data):
    """The plan-derived row count is exactly what each layout's reducer sees (else the agreed count
    could be too small)."""
    pairs = data.pairs(range(len(data)))
    for i, pair in enumerate(pairs):
        for batch in (collate_packed([pair]), collate_padded([pair], 0), collate_shared([pair])):
            assert len(batch["pred_positions"]) == data.label_tokens[i]


# ---------------------------------------------------------------------------------------------
# 2 ranks, ZeRO-3, against the padded reference
# ---------------------------------------------------------------------------------------------
LORA = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj,v_proj"]


def run(assets, data, out: Path, *extra: str, ranks: int = 2, check: bool = True):
    args = ["--dump", str(out / "dump.pt"), "--model_name_or_path", assets["model"], "--train_data", assets["train"],
            "--eval_data", assets["eval"], "--output_dir", str(out), "--ds", "ds_configs/zero3.json",
            "--max_steps", "1", "--train_batch_size", "3", "--max_length", str(MAX_LENGTH),
            "--max_prompt_length", str(MAX_PROMPT), "--max_tokens_per_microbatch", str(budget(data)),
            "--eval_on_start", "true", "--learning_rate", "1e-3", "--report_to", "none", "--save_final", "false",
            "--collective_timeout_s", "60", *extra]
    return launch("tests/dist_worker.py", args, ranks, check=check)


def reference(assets, data, pair_ids, lora_params=None):
    """(metrics, grads) of the padded reference step on ``pair_ids``; LoRA: the run's adapters loaded."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32, attn_implementation="sdpa")
    if lora_params is not None:
        model = lora_model(model, lora_params, 4, 8, ["q_proj", "v_proj"])
    loss, _, metrics = reference_step(model, data.pairs(pair_ids))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return metrics, grads


@pytest.mark.distributed
@pytest.mark.parametrize(
    "extra",
    [["--debug_lockstep", "true"], [*LORA, "--gradient_checkpointing", "true"], ["--prompt_sharing", "true"]],
    ids=["plain+debug_lockstep", "lora+gradient_checkpointing", "prompt_sharing"],  # one run for two (CI time)
)
def test_zero3_two_ranks_different_chunk_counts_equal_reference(assets, data, tmp_path, extra):
    """Train step, eval before and after: finish (no hang) and equal the reference."""
    run(assets, data, tmp_path, *extra)
    dump = torch.load(tmp_path / "dump.pt")
    assert sorted(dump["pair_ids"]) == [0, 1, 2]
    metrics, grads = reference(assets, data, dump["pair_ids"], dump["params"] if "--use_peft" in extra else None)
    (train,) = read_metrics(tmp_path)
    assert_metrics_close(train, metrics)
    assert_grads_close(dump["grads"], grads)
    evals = read_metrics(tmp_path, "eval")
    assert [r["step"] for r in evals] == [0, 1]
    with torch.no_grad():  # eval at step 0 = the untrained model (LoRA B = 0: the base model)
        _, _, eval_metrics = reference_step(_base_model(assets), data.pairs(range(len(data))))
    assert_metrics_close(evals[0], eval_metrics)


def _base_model(assets):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32, attn_implementation="sdpa")


@pytest.mark.distributed
def test_local_chunk_counts_are_caught_before_they_hang(assets, data, tmp_path):
    """The pre-fix behaviour (each rank its own chunk count) with debug_lockstep: every rank stops at
    the first eval micro-batch naming the planned lm_head chunks per rank — under ZeRO-3, before the
    mismatched all-gathers could hang."""
    import os

    os.environ["SIMPO_TEST_LOCAL_CHUNKS"] = "1"
    try:
        code, out = run(assets, data, tmp_path, "--debug_lockstep", "true", check=False)
    finally:
        del os.environ["SIMPO_TEST_LOCAL_CHUNKS"]
    assert code != 0
    assert "LockstepError" in out, out[-3000:]
    assert "out of lock-step at eval at step 0, pairs 0-2, micro-batch 1/2, before forward: planned lm_head chunks" in out
    assert "(rank 0: 1, rank 1: 3)" in out or "(rank 0: 3, rank 1: 1)" in out, out[-3000:]

