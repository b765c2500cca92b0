"""``simpo-ds binarize``: best vs worst answer per prompt, as a train/test preference set.

    simpo-ds binarize --data DIR --out OUT [--test_size 0.02 --seed 42]

reads ``DIR/scored.jsonl`` (``simpo-ds score``) and writes, in the princeton-nlp
``*-ultrafeedback-armorm`` format, ``OUT/train.jsonl`` and ``OUT/test.jsonl``::

    {"prompt_id": "...", "prompt": "...", "all_generated_responses": [...], "all_rm_scores": [...],
     "chosen": [{"role": "user", ...}, {"role": "assistant", "content": BEST}],
     "rejected": [..., {"role": "assistant", "content": WORST}], "score_chosen": 0.9, "score_rejected": 0.1}

plus ``OUT/report.md`` (rows kept and dropped, score spread, margins, length of chosen vs rejected),
``OUT/margins.png`` and ``OUT/stats.json``. The trainer reads OUT as it is: ``train_data:
OUT/train.jsonl`` + ``eval_data: OUT/test.jsonl``, or ``dataset_mixer: {OUT: 1.0}`` with
``dataset_splits: [train, test]`` as the reference's recipes name their on-policy sets.

Chosen is the first answer with the highest score, rejected the first with the lowest. Dropped and
counted, never written as a pair: prompts whose answers are all identical, whose scores all tie
(chosen would equal rejected), whose best and worst answers have the same text, or whose best or
worst answer is empty. The split is a seeded permutation of the kept rows in ``prompt_id`` order:
the same input and seed give the same split.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import Counter
from pathlib import Path

import numpy as np

from simpo_ds.data.tokenize import DataError, is_conversation
from simpo_ds.onpolicy.jobs import command, read_jsonl, write_atomic, write_jsonl
from simpo_ds.onpolicy.score import OUTPUT as SCORED

OUTPUTS = ("train.jsonl", "test.jsonl", "report.md", "margins.png", "stats.json")
IDENTICAL, TIED, SAME_TEXT, EMPTY = ("all answers identical", "all scores tied", "best and worst answers identical",
                                     "empty best or worst answer")


def _check_row(row: dict, where: str) -> None:
    if not isinstance(row.get("prompt_id"), str):
        raise DataError(f"{where}: missing or non-string 'prompt_id'")
    if not (isinstance(row.get("prompt"), str) or is_conversation(row.get("prompt"))):
        raise DataError(f"{where}: 'prompt' must be a string or a list of messages")
    if not is_conversation(row.get("messages")):
        raise DataError(f"{where}: 'messages' must be a list of {{role, content}} messages")
    answers, scores = row.get("all_generated_responses"), row.get("all_rm_scores")
    if not (isinstance(answers, list) and len(answers) >= 2 and all(isinstance(a, str) for a in answers)):
        raise DataError(f"{where}: 'all_generated_responses' must be a list of at least 2 strings")
    if not (isinstance(scores, list) and len(scores) == len(answers)):
        raise DataError(f"{where}: 'all_rm_scores' must be a list of {len(answers)} numbers (one per answer)")
    for k, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise DataError(f"{where}: 'all_rm_scores'[{k}] = {s!r} is not a finite number")


def binarize_row(row: dict) -> tuple[dict | None, str | None]:
    """(pair, None) or (None, why it was dropped) for one checked scored row."""
    answers, scores = row["all_generated_responses"], row["all_rm_scores"]
    if len(set(answers)) == 1:
        return None, IDENTICAL
    best, worst = int(np.argmax(scores)), int(np.argmin(scores))
    if scores[best] == scores[worst]:
        return None, TIED
    if answers[best] == answers[worst]:
        return None, SAME_TEXT
    if not answers[best].strip() or not answers[worst].strip():
        return None, EMPTY
    pair = {key: row[key] for key in ("prompt_id", "prompt", "all_generated_responses", "all_rm_scores")}
    for name, k in (("chosen", best), ("rejected", worst)):
        pair[name] = row["messages"] + [{"role": "assistant", "content": answers[k]}]
        pair[f"score_{name}"] = float(scores[k])
    if "all_finished" in row:
        pair["finished_chosen"], pair["finished_rejected"] = bool(row["all_finished"][best]), \
            bool(row["all_finished"][worst])
    return pair, None


def split(pairs: list[dict], test_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test), both in prompt_id order; ``test_size`` < 1 is a fraction, >= 1 a row count."""
    pairs = sorted(pairs, key=lambda p: p["prompt_id"])
    n_test = int(test_size) if test_size >= 1 else int(round(test_size * len(pairs)))
    n_test = min(n_test, len(pairs) - 1)
    test = set(np.random.default_rng(seed).permutation(len(pairs))[:n_test].tolist())
    return [p for i, p in enumerate(pairs) if i not in test], [p for i, p in enumerate(pairs) if i in test]


def summarize(rows: list[dict], pairs: list[dict], dropped: Counter, train: list, test: list) -> dict:
    """Counts, score spread, margins and the length of chosen vs rejected (in words and characters)."""
    spread = [max(r["all_rm_scores"]) - min(r["all_rm_scores"]) for r in rows]
    margins = [p["score_chosen"] - p["score_rejected"] for p in pairs]
    words = {k: [len(p[k][-1]["content"].split()) for p in pairs] for k in ("chosen", "rejected")}
    chars = {k: [len(p[k][-1]["content"]) for p in pairs] for k in ("chosen", "rejected")}
    stats = {"prompts": len(rows), "pairs": len(pairs), "train": len(train), "test": len(test),
             "dropped": dict(dropped), "score_spread_mean": statistics.fmean(spread),
             "score_spread_median": statistics.median(spread)}
    if pairs:
        stats.update({
            "margin_mean": statistics.fmean(margins), "margin_median": statistics.median(margins),
            "margin_min": min(margins), "margin_max": max(margins),
            "chosen_score_mean": statistics.fmean(p["score_chosen"] for p in pairs),
            "rejected_score_mean": statistics.fmean(p["score_rejected"] for p in pairs),
            "chosen_words_mean": statistics.fmean(words["chosen"]),
            "rejected_words_mean": statistics.fmean(words["rejected"]),
            "chosen_chars_mean": statistics.fmean(chars["chosen"]),
            "rejected_chars_mean": statistics.fmean(chars["rejected"]),
            "chosen_longer_fraction": statistics.fmean(c > r for c, r in zip(chars["chosen"], chars["rejected"])),
        })
        if "finished_chosen" in pairs[0]:
            stats["unfinished_chosen"] = sum(not p["finished_chosen"] for p in pairs)
            stats["unfinished_rejected"] = sum(not p["finished_rejected"] for p in pairs)
    return stats


def report_markdown(stats: dict, source: Path) -> str:
    lines = [f"# Binarized preference data from `{source}`", "",
             f"- prompts: {stats['prompts']}; pairs kept: {stats['pairs']} (train {stats['train']}, "
             f"test {stats['test']})"]
    for reason, count in sorted(stats["dropped"].items()):
        lines.append(f"- dropped, {reason}: {count}")
    lines.append(f"- score spread (best - worst) per prompt: mean {stats['score_spread_mean']:.4g}, "
                 f"median {stats['score_spread_median']:.4g}")
    if stats["pairs"]:
        lines += [
            f"- margin (score chosen - rejected): mean {stats['margin_mean']:.4g}, median "
            f"{stats['margin_median']:.4g}, range [{stats['margin_min']:.4g}, {stats['margin_max']:.4g}] "
            f"(histogram: margins.png)",
            f"- mean score: chosen {stats['chosen_score_mean']:.4g}, rejected {stats['rejected_score_mean']:.4g}",
            f"- length bias: chosen {stats['chosen_words_mean']:.1f} words / {stats['chosen_chars_mean']:.0f} "
            f"chars, rejected {stats['rejected_words_mean']:.1f} words / {stats['rejected_chars_mean']:.0f} chars; "
            f"chosen is the longer answer in {100 * stats['chosen_longer_fraction']:.0f}% of pairs",
        ]
        if "unfinished_chosen" in stats:
            lines.append(f"- answers cut at max_new_tokens: chosen {stats['unfinished_chosen']}, "
                         f"rejected {stats['unfinished_rejected']}")
    return "\n".join(lines) + "\n"


def plot_margins(margins: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(margins, bins=min(40, max(5, len(margins) // 5)), color="#4c72b0")
    ax.set_xlabel("score(chosen) - score(rejected)")
    ax.set_ylabel("pairs")
    ax.set_title("reward margin of the binarized pairs")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def _check_out(out: Path, source: Path) -> None:
    """OUT may hold binarize's files only when binarize wrote them (its ``stats.json`` is there):
    never the input, never a ``train.jsonl`` (or any other of ``OUTPUTS``) of the user's own."""
    outputs = [out / name for name in OUTPUTS]
    if any(p.resolve() == source.resolve() for p in outputs):
        raise DataError(f"--out {out} would overwrite the input {source}: choose another directory")
    try:
        ours = {"prompts", "pairs", "dropped"} <= set(json.loads((out / "stats.json").read_text()))
    except (OSError, ValueError, TypeError):
        ours = False
    theirs = [p for p in outputs if p.exists()] if not ours else []
    if theirs:
        raise DataError(f"{theirs[0]} exists and was not written by simpo-ds binarize (no binarize stats.json "
                        f"beside it): choose another --out directory")


def run(args) -> dict:
    source = Path(args.data)
    source = source / SCORED if source.is_dir() else source
    if not source.is_file():
        raise DataError(f"--data {args.data}: no {SCORED} there (run simpo-ds score first)")
    out = Path(args.out)
    _check_out(out, source)
    if not 0 <= args.test_size:
        raise DataError(f"--test_size {args.test_size}: must be >= 0 (a fraction, or a row count when >= 1)")
    rows = read_jsonl(source)
    if not rows:
        raise DataError(f"{source}: no rows")
    pairs, dropped = [], Counter()
    for i, row in enumerate(rows):
        _check_row(row, f"{source}: row {i}")
        pair, reason = binarize_row(row)
        if pair:
            pairs.append(pair)
        else:
            dropped[reason] += 1
    if not pairs:
        raise DataError(f"{source}: no prompt has two different answers with different scores ({dict(dropped)})")
    train, test = split(pairs, args.test_size, args.seed)
    stats = summarize(rows, pairs, dropped, train, test)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
    plot_margins([p["score_chosen"] - p["score_rejected"] for p in pairs], out / "margins.png")
    write_atomic(out / "stats.json", json.dumps(stats, indent=1))
    write_atomic(out / "report.md", report_markdown(stats, source))
    print(report_markdown(stats, source), end="", flush=True)
    return stats


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="simpo-ds binarize", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help=f"the score output directory (or its {SCORED})")
    p.add_argument("--out", required=True, help="output directory: train.jsonl, test.jsonl, report.md, ...")
    p.add_argument("--test_size", type=float, default=0.02, help="fraction of the pairs (or a count when >= 1)")
    p.add_argument("--seed", type=int, default=42)
    return p


def main(argv: list[str] | None = None) -> int:
    return command("binarize", parser, run, argv)
