"""Peak memory of the chunked reducer vs full-logits log_softmax, forward + backward (CPU, fp32).

    python -m bench.reducer_memory              # vocab 32k/128k/152k x T = 2k/8k/16k, writes bench/RESULTS.md
    python -m bench.reducer_memory --toy        # one tiny case per method (the smoke test)

For each (vocab V, tokens T) and method, a FRESH process builds hidden states h [T, H=64] (requiring
grad) and an lm_head ``nn.Linear(H, V)``, then runs forward + backward of the summed answer log-probs:

- ``full``: the reference path, logits = lm_head(h) [1, T, V] then ``simpo_ds.loss.get_batch_logps``
  (log_softmax over the whole [T, V], gather, average) — what padded SimPO/TRL trainers do;
- ``chunked C``: ``simpo_ds.loss.reduce_sequence_logps`` with ``chunk_size=C``, every position
  labelled, 16 sequences; C = auto is simpo-ds' default (``logits_chunk_size: 0``:
  ``simpo_ds.loss.auto_chunk_size``, 2048 / 512 / 256 rows at 32k / 128k / 152k vocab), and 2048.
  A chunk's logits are recomputed in backward and overwritten by their own gradient, so a chunk
  holds two [C, V] fp32 buffers at its peak (logits + logsumexp's temporary).

Peak memory = the process's peak RSS (``ru_maxrss``) after the pass minus its RSS just before it
(inputs and weights already allocated), i.e. the extra memory the reduction needs. Full-logits cases
are run smallest first; a case whose estimate k·T·V·4 bytes exceeds ``--limit-gib`` (16) or 80% of
the memory available now is skipped and reported with that estimate, k being the largest measured ratio peak ÷ (T·V·4 B) of the full
cases that did run (the number of live [T, V] fp32 tensors at the peak).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

from bench import ROOT, current_rss_bytes, environment, environment_markdown, write_section

VOCABS = (32_000, 128_256, 151_936)  # Llama-2/Mistral, Llama-3, Qwen2
TOKENS = (2048, 8192, 16384)
CHUNKS = (0, 2048)  # 0 = auto (simpo-ds' default logits_chunk_size)
COLUMNS = tuple(("chunked", c) for c in CHUNKS)  # (method, chunk) after "full"


def title(method: str, chunk: int) -> str:
    return f"{method} {chunk or 'auto (default)'}"
HIDDEN = 64
GIB = 2**30


def measure(method: str, vocab: int, tokens: int, chunk: int = 2048, hidden: int = HIDDEN) -> dict:
    """One forward+backward in THIS process; returns peak RSS growth (bytes) and time (s)."""
    import resource

    import torch

    from simpo_ds.loss import auto_chunk_size, get_batch_logps, reduce_sequence_logps

    if tokens > 64:  # warm-up: first-call allocations (autograd, checkpoint) do not count as the pass's
        measure(method, 100, 64, 16, hidden)
    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, requires_grad=True)
    lm_head = torch.nn.Linear(hidden, vocab, bias=False)
    ids = torch.randint(0, vocab, (tokens,))
    num_seqs = 16
    seq_len = tokens // num_seqs
    seq_of = torch.arange(tokens) // seq_len
    gc.collect()
    before = current_rss_bytes()
    start = time.perf_counter()
    if method == "full":
        labels = ids.clone()
        labels[::seq_len] = -100  # a sequence's first token has no label (no cross-sequence label)
        logits = lm_head(h)[None]  # [1, T, V]
        loss = get_batch_logps(logits, labels[None]).sum()
    else:
        valid = torch.ones(tokens, dtype=torch.bool)
        valid[::seq_len] = False  # positions whose NEXT token is a label: all but each sequence's last
        valid = valid.roll(-1)
        pred_positions = valid.nonzero().squeeze(1)
        pred_seq = seq_of[pred_positions]
        seq_num_tokens = torch.bincount(pred_seq, minlength=num_seqs)
        args = (h[None], lm_head, pred_positions, ids[pred_positions + 1], pred_seq, seq_num_tokens)
        loss = reduce_sequence_logps(*args, chunk_size=chunk or auto_chunk_size(vocab)).average.sum()
    loss.backward()
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"method": method, "vocab": vocab, "tokens": tokens, "chunk": 0 if method == "full" else chunk, "peak_bytes": max(peak - before, 0),
            "time_s": elapsed, "grad_ok": bool(torch.isfinite(h.grad).all())}


def _spawn(method: str, vocab: int, tokens: int, chunk: int) -> dict:
    cmd = [sys.executable, "-m", "bench.reducer_memory", "--case", method, str(vocab), str(tokens), str(chunk)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} V={vocab} T={tokens} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run_all(vocabs, tokens, columns, limit_gib: float) -> list[dict]:
    rows = []
    k = None  # live [T, V] fp32 tensors at the full path's peak (measured)
    for t, v in sorted(((t, v) for v in vocabs for t in tokens), key=lambda c: c[0] * c[1]):
        base = t * v * 4
        if k is not None and k * base > min(limit_gib * GIB, 0.8 * _available_bytes()):
            rows.append({"method": "full", "vocab": v, "tokens": t, "chunk": 0, "skipped_need_bytes": k * base,
                         "available_bytes": _available_bytes()})
        else:
            row = _spawn("full", v, t, 0)
            k = max(k or 0.0, row["peak_bytes"] / base)
            rows.append(row)
        for method, c in columns:
            rows.append(_spawn(method, v, t, c))
        print(json.dumps(rows[-1 - len(columns):]), flush=True)
    for row in rows:
        row["k"] = k
    return rows


def report(rows: list[dict], columns, limit_gib: float, env: dict) -> str:
    k = rows[0]["k"]
    header = "| vocab | T | full logits (GiB) | " + " | ".join(
        title(m, c) + " (GiB, % of full)" for m, c in columns)
    lines = [
        "## Reducer peak memory: chunked vs full-logits log_softmax (CPU, fp32, forward + backward)",
        "",
        "`python -m bench.reducer_memory`",
        "",
        environment_markdown(env).rstrip(),
        f"- hidden {HIDDEN}, one process per case, 1 thread; peak = peak RSS growth over the pass (inputs and the "
        f"lm_head already allocated); T tokens in 16 sequences, every answer position labelled",
        "- full = logits [1, T, V] + `simpo_ds.loss.get_batch_logps` (the reference); chunked C = "
        "`simpo_ds.loss.reduce_sequence_logps(chunk_size=C)`; auto = simpo-ds' default `logits_chunk_size: 0`: "
        "2048 / 512 / 256 rows at 32k / 128k / 152k vocab",
        f"- skipped full cases: estimate k·T·V·4 B with k = {k:.2f} (the largest measured peak ÷ T·V·4 B), over the "
        f"{limit_gib:g} GiB limit",
        "",
        header + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    by_case: dict[tuple, dict] = {}
    for row in rows:
        by_case.setdefault((row["vocab"], row["tokens"]), {})[(row["method"], row["chunk"])] = row
    for (v, t), case in sorted(by_case.items()):
        full = case[("full", 0)]
        if "skipped_need_bytes" in full:
            full_gib = full["skipped_need_bytes"] / GIB
            full_txt = f"skipped (would need {full_gib:.1f} GiB)"
            if full_gib <= limit_gib:
                full_txt = f"skipped (would need {full_gib:.1f} GiB; {full['available_bytes'] / GIB:.1f} GiB available)"
        else:
            full_gib, full_txt = full["peak_bytes"] / GIB, f"{full['peak_bytes'] / GIB:.2f} ({full['time_s']:.1f} s)"
        cells = []
        for col in columns:
            g = case[col]["peak_bytes"] / GIB
            est = " est." if "skipped_need_bytes" in full else ""
            share = f"{g / full_gib:.0%}{est}" if full_gib > 0 else "n/a"
            cells.append(f"{g:.2f} ({share}; {case[col]['time_s']:.1f} s)")
        lines.append(f"| {v:,} | {t:,} | {full_txt} | " + " | ".join(cells) + " |")
    target = by_case.get((128_256, 8192))
    if target and ("full", 0) in target:
        full = target[("full", 0)]
        full_b = full.get("peak_bytes") or full["skipped_need_bytes"]
        kind = "measured" if "peak_bytes" in full else f"estimated {full_b / GIB:.1f} GiB"
        lines += ["", f"Target: reducer peak ≤ 10% of full-logits at 128k vocab, 8k tokens (full: {kind}):"]
        for col in columns:
            ratio = target[col]["peak_bytes"] / max(full_b, 1)
            lines.append(f"- {title(*col)}: {ratio:.1%} — "
                         f"{'**met**' if ratio <= 0.10 else '**not met**'}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", nargs=4, metavar=("METHOD", "VOCAB", "TOKENS", "CHUNK"), help=argparse.SUPPRESS)
    parser.add_argument("--limit-gib", type=float, default=16.0, help="skip full-logits cases estimated above this")
    parser.add_argument("--toy", action="store_true", help="one tiny case per method, no RESULTS.md")
    args = parser.parse_args(argv)
    if args.case:
        method, vocab, tokens, chunk = args.case
        print(json.dumps(measure(method, int(vocab), int(tokens), int(chunk))))
        return
    env = environment()
    if args.toy:
        toy = (("chunked", 64),)
        rows = run_all((1000,), (256,), toy, args.limit_gib)
        print(report(rows, toy, args.limit_gib, env))
        return
    rows = run_all(VOCABS, TOKENS, COLUMNS, args.limit_gib)
    text = report(rows, COLUMNS, args.limit_gib, env)
    print(text)
    write_section("reducer_memory", text)


if __name__ == "__main__":
    main()
