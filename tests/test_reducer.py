"""The chunked segment reducer (docs/design.md §4): exact against full logits, and never T x V in memory.

``reduce_sequence_logps(hidden [B, L, H], lm_head, pred_positions [N], pred_labels [N], pred_seq [N],
seq_num_tokens [S], chunk_size)`` must equal the naive computation -- full logits [B*L, V],
log_softmax, gather at the labelled positions, sum per sequence -- in value and in gradient (w.r.t.
the hidden states and the lm_head weight), for any chunk size; only the N labelled rows may reach
lm_head; and no tensor of more than chunk x V elements may be saved for backward or stay alive,
which a process-RSS measurement confirms on real memory.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch

from simpo_ds.loss import reduce_sequence_logps

H, V = 8, 37


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def padded_case(seed: int = 0):
    """Two rows of 9 positions, 4 sequences (2 per row) with prompt and padding rows in between.

    Returns hidden [2, 9, H] (leaf), lm_head, pred_positions [N], pred_labels, pred_seq, seq_num_tokens.
    """
    torch.manual_seed(seed)
    hidden = torch.randn(2, 9, H, requires_grad=True)
    lm_head = torch.nn.Linear(H, V, bias=False)
    # (sequence, flat positions whose next token is labelled): row 0 = seq 0 @ 0..4, seq 1 @ 5..8;
    # row 1 = seq 2 @ 9..13 (one long answer), seq 3 @ 14..17 (1-token answer), position 17 padding.
    layout = {0: [2, 3], 1: [6, 7], 2: [10, 11, 12, 13], 3: [15]}
    pred_positions = torch.tensor([p for ps in layout.values() for p in ps])
    pred_seq = torch.tensor([s for s, ps in layout.items() for _ in ps])
    pred_labels = torch.randint(0, V, (len(pred_positions),))
    seq_num_tokens = torch.tensor([len(ps) for ps in layout.values()])
    return hidden, lm_head, pred_positions, pred_labels, pred_seq, seq_num_tokens


def naive(hidden, weight, pred_positions, pred_labels, pred_seq, num_seqs):
    """Full [B*L, V] logits -> (logp_sum [S], logit_sum [S]) -- the computation the reducer replaces."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.T
    token_logp = logits.log_softmax(-1)[pred_positions, pred_labels]
    zeros = torch.zeros(num_seqs)
    mean_logit = logits.detach().mean(-1)[pred_positions]
    return zeros.index_add(0, pred_seq, token_logp), zeros.index_add(0, pred_seq, mean_logit)


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("chunk_size", [1, 3, 9, 100], ids=["chunk1", "chunk3", "chunkN", "chunk>N"])
def test_reducer_equals_full_logits_values_and_gradients(chunk_size):
    hidden, lm_head, pos, labels, seq, n = padded_case()
    assert len(pos) == 9  # N: chunk 9 is exactly one chunk
    g = torch.randn(len(n))  # a random linear function of the per-sequence sums
    out = reduce_sequence_logps(hidden, lm_head, pos, labels, seq, n, chunk_size=chunk_size)
    (out.logp_sum * g).sum().backward()
    grad_h, grad_w = hidden.grad.clone(), lm_head.weight.grad.clone()
    hidden.grad = lm_head.weight.grad = None
    ref_logp, ref_logit = naive(hidden, lm_head.weight, pos, labels, seq, len(n))
    (ref_logp * g).sum().backward()

    assert out.logp_sum.dtype == torch.float32 and torch.equal(out.num_tokens, n)
    assert rel_err(out.logp_sum, ref_logp) <= 1e-6
    assert rel_err(out.logit_sum, ref_logit) <= 1e-5
    assert torch.allclose(out.average, ref_logp / n, rtol=1e-6)
    assert rel_err(grad_h, hidden.grad) <= 1e-5
    assert rel_err(grad_w, lm_head.weight.grad) <= 1e-5


def test_only_labelled_rows_reach_lm_head():
    """Prompt and padding rows are poisoned with NaN: nothing downstream may see them. lm_head gets
    exactly N rows in forward and, in the backward recomputation, those of every chunk but the last
    (whose logits are kept) -- no other rows."""
    hidden, lm_head, pos, labels, seq, n = padded_case()
    unused = torch.ones(hidden.shape[0] * hidden.shape[1], dtype=torch.bool)
    unused[pos] = False
    with torch.no_grad():
        hidden.view(-1, H)[unused] = float("nan")
    rows = []
    lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))

    with torch.no_grad():
        reduce_sequence_logps(hidden, lm_head, pos, labels, seq, n, chunk_size=4)
    assert sum(rows) == len(pos) == 9 and rows == [4, 4, 1]
    rows.clear()
    out = reduce_sequence_logps(hidden, lm_head, pos, labels, seq, n, chunk_size=4)
    assert sum(rows) == len(pos)
    out.logp_sum.sum().backward()
    assert rows == [4, 4, 1, 4, 4]  # + the checkpoint recomputation, again labelled rows only
    assert torch.isfinite(out.logp_sum).all() and torch.isfinite(lm_head.weight.grad).all()
    assert torch.equal(hidden.grad.view(-1, H)[unused], torch.zeros(int(unused.sum()), H))


def test_no_labels_gives_zeros_and_a_zero_gradient():
    hidden, lm_head, _, _, _, _ = padded_case()
    empty = torch.zeros(0, dtype=torch.long)
    out = reduce_sequence_logps(hidden, lm_head, empty, empty, empty, torch.zeros(2, dtype=torch.long))
    assert torch.equal(out.logp_sum, torch.zeros(2))
    out.logp_sum.sum().backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_frozen_body_trainable_lm_head_gradient():
    """Hidden states without grad (frozen body) but a trainable lm_head: the weight gradient is exact."""
    hidden, lm_head, pos, labels, seq, n = padded_case()
    hidden = hidden.detach()
    reduce_sequence_logps(hidden, lm_head, pos, labels, seq, n, chunk_size=2).logp_sum.sum().backward()
    got, lm_head.weight.grad = lm_head.weight.grad.clone(), None
    naive(hidden, lm_head.weight, pos, labels, seq, len(n))[0].sum().backward()
    assert rel_err(got, lm_head.weight.grad) <= 1e-5


def test_bf16_lm_head_gradients_equal_autograd_log_softmax():
    """A bf16 lm_head: the fp32 copy of the logits is what the in-place backward overwrites; the
    gradients equal autograd through ``.float().log_softmax`` (same fp32 maths, same bf16 casts; one
    chunk, as bf16 weight-gradient partial sums per chunk round differently)."""
    hidden, lm_head, pos, labels, seq, n = padded_case()
    lm_head = lm_head.to(torch.bfloat16)
    hidden = hidden.detach().to(torch.bfloat16).requires_grad_()
    reduce_sequence_logps(hidden, lm_head, pos, labels, seq, n, chunk_size=100).logp_sum.sum().backward()
    got = hidden.grad.clone(), lm_head.weight.grad.clone()
    hidden.grad = lm_head.weight.grad = None
    logits = lm_head(hidden.reshape(-1, H)[pos]).float()
    logits.log_softmax(-1).gather(1, labels[:, None]).sum().backward()
    assert torch.equal(got[0], hidden.grad) and torch.equal(got[1], lm_head.weight.grad)


def test_in_place_gradient_cannot_corrupt_another_reader_of_the_logits():
    """The reducer's backward overwrites the logits with their gradient. Were the logits also saved
    by another op that runs later in backward, autograd's version counter raises instead of letting
    it read the overwritten values."""
    from simpo_ds.loss import _LabelLogp

    logits = torch.randn(4, V, requires_grad=True)
    scaled = logits * 1.0  # a non-leaf, like lm_head's output
    other = (scaled**2).sum()  # saves `scaled`; created first, so it runs after _LabelLogp in backward
    total = other + _LabelLogp.apply(scaled, torch.tensor([0, 1, 2, 3])).sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        total.backward()


# ---------------------------------------------------------------------------------------------
# memory: structure (saved tensors, live logits) at full size on the meta device
# ---------------------------------------------------------------------------------------------
def big_case(device: str, vocab: int, labelled: int, hidden_size: int = 8, prompt_rows: int = 100,
             hidden_grad: bool = True):
    """``labelled`` labelled rows after ``prompt_rows`` unlabelled ones, one lm_head of ``vocab`` rows.
    On ``meta`` nothing is computed or allocated, yet autograd saves exactly what it would on CPU."""
    with torch.device(device):
        torch.manual_seed(0)
        lm_head = torch.nn.Linear(hidden_size, vocab, bias=False)
        hidden = torch.randn(1, prompt_rows + labelled, hidden_size, requires_grad=hidden_grad)
        pos = torch.arange(prompt_rows, prompt_rows + labelled)
        labels = torch.randint(0, vocab, (labelled,)) if device != "meta" else torch.zeros(labelled, dtype=torch.long)
        seq = torch.arange(labelled) // 64
        n = torch.full((labelled // 64,), 64)
    return hidden, lm_head, pos, labels, seq, n


class MemorySpy:
    """Records every tensor saved for backward (numel) and every lm_head output (numel, weakref)."""

    def __init__(self, lm_head):
        self.saved: list[int] = []
        self.outputs: list[int] = []
        self.refs: list[weakref.ref] = []
        lm_head.register_forward_hook(self._on_forward)

    def _on_forward(self, module, args, out):
        self.outputs.append(out.numel())
        self.refs.append(weakref.ref(out))

    def _pack(self, tensor):
        self.saved.append(tensor.numel())
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)


@pytest.mark.parametrize(
    "device, vocab, labelled, chunk",
    [("meta", 32000, 4096, 256), ("cpu", 2000, 512, 32)],
    ids=["meta-V32000-T4096", "cpu-V2000-T512"],
)
def test_reducer_never_saves_or_keeps_t_by_v_logits(device, vocab, labelled, chunk):
    """Chunked: no saved tensor and no lm_head output above chunk x V elements; one saved tensor of
    chunk x V (the last chunk's logits, which backward needs first), all the others together below
    chunk x V; every other chunk's logits dead once the forward returns and recomputed in backward.
    The naive path saves (at least) T x V."""
    hidden, lm_head, pos, labels, seq, n = big_case(device, vocab, labelled)
    spy = MemorySpy(lm_head)
    with spy.hooks():
        out = reduce_sequence_logps(hidden, lm_head, pos, labels, seq, n, chunk_size=chunk)
    gc.collect()
    assert len(spy.outputs) == labelled // chunk and max(spy.outputs) == chunk * vocab
    assert all(ref() is None for ref in spy.refs[:-1]), "a checkpointed chunk's logits outlived the forward"
    big = [n for n in spy.saved if n >= chunk * vocab]
    assert big == [chunk * vocab] and sum(spy.saved) - big[0] < chunk * vocab
    out.logp_sum.sum().backward()
    assert len(spy.outputs) == 2 * labelled // chunk - 1 and max(spy.outputs) == chunk * vocab
    assert hidden.grad.shape == hidden.shape and lm_head.weight.grad.shape == lm_head.weight.shape

    naive_spy = MemorySpy(lm_head)
    with naive_spy.hooks():
        logits = lm_head(hidden.reshape(-1, hidden.shape[-1])[pos])
        logits.log_softmax(-1).gather(1, labels[:, None]).sum()
    assert max(naive_spy.saved) >= labelled * vocab  # the test can see a T x V tensor


def test_frozen_body_trainable_lm_head_saves_no_t_by_v_logits():
    """Regression: a chunk is recomputed in backward whenever grad is enabled and the rows OR the
    lm_head parameters need grad (non-reentrant checkpoint handles inputs without grad), as in
    reduce_sequence_logps::

        params = lm_head.parameters() if isinstance(lm_head, torch.nn.Module) else ()
        needs_grad = torch.is_grad_enabled() and (flat.requires_grad or any(p.requires_grad for p in params))
    """
    hidden, lm_head, pos, labels, seq, n = big_case("meta", 32000, 4096, hidden_grad=False)
    spy = MemorySpy(lm_head)
    with spy.hooks():
        reduce_sequence_logps(hidden, lm_head, pos, labels, seq, n, chunk_size=256)
    assert sum(spy.saved) < 2 * 256 * 32000  # the last chunk's logits + small; 16 chunks were saved


# ---------------------------------------------------------------------------------------------
# memory: peak process RSS on real tensors
# ---------------------------------------------------------------------------------------------
RSS_VOCAB, RSS_ROWS, RSS_HIDDEN, RSS_CHUNK = 16384, 2048, 16, 32  # naive T x V fp32 = 128 MiB

RSS_CHILD = textwrap.dedent(
    """
    import json, sys, psutil, torch
    from simpo_ds.loss import reduce_sequence_logps

    V, T, H, CHUNK = map(int, sys.argv[1:5])

    def case(t, v):
        torch.manual_seed(0)
        lm_head = torch.nn.Linear(H, v, bias=False)
        hidden = torch.randn(1, t, H, requires_grad=True)
        seq = torch.arange(t) // 64
        return hidden, lm_head, torch.arange(t), torch.randint(0, v, (t,)), seq, torch.bincount(seq)

    def chunked(hidden, lm_head, pos, labels, seq, n, chunk=CHUNK):
        reduce_sequence_logps(hidden, lm_head, pos, labels, seq, n, chunk_size=chunk).logp_sum.sum().backward()

    def full(hidden, lm_head, pos, labels, seq, n):  # forward only: already 2 x T x V
        logp = lm_head(hidden[0]).float().log_softmax(-1).gather(1, labels[:, None]).squeeze(1)
        torch.zeros(len(n)).index_add(0, seq, logp)

    def peak_increase(fn, args):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS
        before = psutil.Process().memory_info().rss
        fn(*args)
        hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
        return hwm - before

    chunked(*case(128, 64), chunk=32)  # warm-up (several chunks: checkpointed and kept): lazy imports,
    full(*case(128, 64))  # first-call allocations
    args = case(T, V)
    out = {"chunked": peak_increase(chunked, args)}  # chunked FIRST, in a fresh process
    out["full"] = peak_increase(full, args)
    print(json.dumps(out))
    """
)


def measure_peaks(vocab: int, rows: int, hidden: int, chunk: int) -> dict:
    """{"chunked": bytes, "full": bytes}: peak RSS growth of RSS_CHILD's two passes."""
    pytest.importorskip("psutil")  # the child measures RSS with it
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    args = [str(x) for x in (vocab, rows, hidden, chunk)]
    proc = subprocess.run([sys.executable, "-c", RSS_CHILD, *args], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_one_chunk_peak_is_two_chunk_buffers():
    """With chunks of 256 x 16384: the reducer's peak is ~2 chunk x V fp32 buffers (the recomputed
    logits, overwritten in place by their gradient, and logsumexp's temporary) — measured 2.1; it was
    4.1 when autograd's logsumexp/gather backward allocated their own [chunk, V] gradients."""
    chunk_bytes = 256 * RSS_VOCAB * 4
    peaks = measure_peaks(RSS_VOCAB, 1024, RSS_HIDDEN, 256)
    assert peaks["chunked"] < 2.5 * chunk_bytes, f"{peaks['chunked'] / chunk_bytes:.2f} chunk buffers"


def test_peak_rss_is_chunk_sized_not_t_by_v():
    """Forward + backward of the chunked reducer raises the process's peak RSS by a small fraction of
    the T x V x 4 bytes the full-logits path needs (whose forward alone this measurement sees at
    >= 2 x T x V x 4: logits and log_softmax).

    Measured in a fresh subprocess: peak RSS (VmHWM, reset through /proc/self/clear_refs) minus RSS
    before. glibc's dynamic mmap threshold would serve the freed chunk-sized blocks from its heap and
    keep them, so the child pins ``MALLOC_MMAP_THRESHOLD_`` and every large tensor is an mmap
    returned on free: RSS then tracks live tensors. Backward keeps 2 chunk x V tensors alive at once
    (recomputed logits, logsumexp's temporary), so the bound needs chunk << T; sizes are kept small for a 2-core machine (the ratio is what matters), and the child
    runs one thread (OpenMP barriers crawl on an oversubscribed machine)."""
    peaks = measure_peaks(RSS_VOCAB, RSS_ROWS, RSS_HIDDEN, RSS_CHUNK)
    full_bytes = RSS_ROWS * RSS_VOCAB * 4
    # the measurement sees the full path's T x V tensors (logits + log_softmax = 2 x full_bytes); the
    # margin keeps page accounting out of it (a clean clone once read 20 pages short of exactly 2x)
    assert peaks["full"] >= 1.5 * full_bytes, f"full-logits peak {peaks['full'] / full_bytes:.2f} x T x V x 4"
    assert peaks["chunked"] < 0.25 * full_bytes, f"chunked peak {peaks['chunked'] / 2**20:.0f} MiB"
    assert peaks["chunked"] < 10 * RSS_CHUNK * RSS_VOCAB * 4  # O(chunk x V), not O(T x V)


def test_auto_chunk_size_bounds_the_chunk_logits():
    """logits_chunk_size 0 (auto): a power of two with rows x vocab <= 2^26 (256 MiB of fp32 logits)."""
    from simpo_ds.loss import auto_chunk_size

    assert [auto_chunk_size(v) for v in (32_000, 128_256, 151_936)] == [2048, 512, 256]
    assert auto_chunk_size(101) == 8192 and auto_chunk_size(10**9) == 64  # clamped
    for vocab in (32_000, 49_152, 128_256, 151_936, 256_000):
        rows = auto_chunk_size(vocab)
        assert rows & (rows - 1) == 0 and rows * vocab <= 2**26 < 2 * rows * vocab
