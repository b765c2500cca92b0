"""``simpo-ds score``: a reward per generated answer.

    simpo-ds score --data DIR --reward_model RLHFlow/ArmoRM-Llama3-8B-v0.1 --trust_remote_code true
    simpo-ds score --data DIR --scorer my_rules:score          # or path/to/file.py:score
    torchrun --nproc_per_node 8 launch/score.py --data DIR --reward_model RM ...   # 8 shards

reads ``DIR/generations.jsonl`` (``simpo-ds generate``) and writes ``DIR/scored.jsonl``: the same rows
with ``all_rm_scores`` (one float per answer). Sharded and resumable like ``generate`` (``DIR/score/``).

Reward model: any ``AutoModelForSequenceClassification``. Each conversation (the prompt messages +
the answer as an assistant turn) is rendered by the REWARD MODEL's own chat template and encoded as
``apply_chat_template(tokenize=True)`` encodes it. A score is what the model gives the conversation
alone: batches of similar length are right-padded with ``config.pad_token_id``, the id its head
looks for to find the last token (not the tokenizer's pad, which may differ), and conversations are
scored one at a time when the config has no usable pad id (see ``head_pad_id``). The score is
``output.score`` when the model returns one (ArmoRM's custom head, ``trust_remote_code``, as its card
reads it), else ``output.logits[:, 0]`` of a one-label head. A scorer ``fn(prompt, response) -> float``
gets the row's ``prompt`` (a string, or the message list) and one answer.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import math
import time
from pathlib import Path

from simpo_ds.data.tokenize import DataError, is_conversation
from simpo_ds.onpolicy.generate import OUTPUT as GENERATIONS
from simpo_ds.onpolicy.jobs import (DTYPES, Job, command, device_and_dtype, length_batches, parse_bool, pin_gpu,
                                   rank_and_world, read_jsonl, resolve_dtype, write_jsonl)

OUTPUT = "scored.jsonl"


def read_generations(path: Path) -> list[dict]:
    """Rows of a generations file, checked: each names its problem by file, row and key."""
    rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    for i, row in enumerate(rows):
        where = f"{path}: row {i}"
        if not isinstance(row.get("prompt_id"), str):
            raise DataError(f"{where}: missing or non-string 'prompt_id'")
        if not is_conversation(row.get("messages")):
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}} messages")
        answers = row.get("all_generated_responses")
        if not (isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
            raise DataError(f"{where}: 'all_generated_responses' must be a non-empty list of strings")
    return rows


def head_pad_id(config) -> int | None:
    """The id to right-pad a batch with so that every score is the one the conversation gets alone;
    None: score one at a time.

    transformers' sequence-classification heads read the score at the last token that is not
    ``config.pad_token_id`` (transformers 5; remote-code heads such as ArmoRM's: the token before the
    first pad id). Right-padding with that id moves neither position, even where the id also occurs in
    the text, and a causal model's states before the padding do not see it: batched == alone, exactly.
    Any other pad id (the tokenizer's, when it differs) is read as a real token: the score of a shorter
    answer would come from a padding position. A config without a pad id, or with one outside the
    vocabulary (e.g. -1), leaves no id to pad with."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    pad, vocab = getattr(text, "pad_token_id", None), getattr(text, "vocab_size", None)
    if isinstance(pad, int) and pad >= 0 and (vocab is None or pad < vocab):
        return pad
    return None


class RewardModel:
    """A sequence-classification reward model on this rank's device. ``pad``: the id batches are
    right-padded with (``head_pad_id``), None when conversations are scored one at a time."""

    def __init__(self, path: str, dtype: str, local_rank: int, trust_remote_code: bool):
        import torch
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.device, torch_dtype = device_and_dtype(local_rank, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if not getattr(self.tokenizer, "chat_template", None):
            raise DataError(f"reward model {path}: its tokenizer has no chat_template to render conversations with")
        self.path, self.model = path, None
        self.load = lambda: AutoModelForSequenceClassification.from_pretrained(
            path, dtype=torch_dtype, trust_remote_code=trust_remote_code).to(self.device).eval()
        self.pad = head_pad_id(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))

    def _ready(self) -> None:
        """Load the weights at the first batch (a rerun with nothing left to score never does)."""
        if self.model is None:
            self.model = self.load()

    def encode(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def scores(self, batch: list[list[int]]) -> list[float]:
        """One reward per token-id list: right-padded together with ``self.pad``, or one by one
        (unpadded) without one. input_ids, attention_mask: [len(batch), longest]."""
        self._ready()
        if self.pad is None and len(batch) > 1:
            return [s for ids in batch for s in self.scores([ids])]
        torch = self.torch
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([ids + [self.pad] * (width - len(ids)) for ids in batch], device=self.device)
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch], device=self.device)
        with torch.no_grad():
            out = self.model(input_ids=input_ids, attention_mask=mask)
        value = getattr(out, "score", None)
        if value is None:
            value = out.logits
            if value.shape[-1] != 1:
                raise DataError(f"reward model {self.path}: its head has {value.shape[-1]} labels and no 'score' "
                                f"output; score with a one-label reward model or --scorer")
        return value.float().reshape(len(batch), -1)[:, 0].tolist()


def load_scorer(spec: str):
    """``module:function`` or ``path/to/file.py:function`` -> the function."""
    module_name, _, name = spec.rpartition(":")
    if not module_name or not name:
        raise DataError(f"--scorer {spec!r}: expected module:function or file.py:function")
    if module_name.endswith(".py"):
        loaded = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
        if loaded is None or not Path(module_name).is_file():
            raise DataError(f"--scorer {spec!r}: no such file {module_name}")
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise DataError(f"--scorer {spec!r}: cannot import {module_name} ({err})") from err
    fn = getattr(module, name, None)
    if not callable(fn):
        raise DataError(f"--scorer {spec!r}: {module_name} has no function {name!r}")
    return fn


def _checked(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: the score {value!r} is not a finite number")
    return float(value)


def _source_sha256(fn) -> str | None:
    """sha256 of the file a scorer function is defined in (a rerun with edited rules is another run)."""
    path = getattr(getattr(fn, "__code__", None), "co_filename", None)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path and Path(path).is_file() else None


def _warn_pad_in_text(model: RewardModel, encoded: list[list[int]]) -> None:
    """Say so when the head's pad id is a token of the conversations: its head then reads the score
    before that token (batched or alone alike), not at the conversation's last token."""
    hits = sum(model.pad in ids for ids in encoded)
    if hits:
        token = model.tokenizer.convert_ids_to_tokens(model.pad)
        print(f"score: warning: the reward model's config.pad_token_id {model.pad} ({token!r}) occurs inside "
              f"{hits} of {len(encoded)} conversations: its head reads those scores before a pad id (transformers: "
              f"at the last token that is not one), not at the last token, as it does for each conversation "
              f"alone", flush=True)


def _input_path(data: str) -> Path:
    path = Path(data)
    path = path / GENERATIONS if path.is_dir() else path
    if not path.is_file():
        raise DataError(f"--data {data}: no {GENERATIONS} there (run simpo-ds generate first)")
    return path


def run(args) -> Path:
    """Score this rank's share; merge when every unit is on disk. Returns the output path."""
    if bool(args.reward_model) == bool(args.scorer):
        raise DataError("pass exactly one of --reward_model or --scorer")
    source = _input_path(args.data)
    out = Path(args.out) if args.out else source.with_name(OUTPUT)
    if out.resolve() == source.resolve():
        raise DataError(f"--out {out} is the input file: choose another path")
    rows = read_generations(source)
    rank, world, local_rank = rank_and_world()
    local_rank = pin_gpu(local_rank, world)
    items = [(r, k) for r in range(len(rows)) for k in range(len(rows[r]["all_generated_responses"]))]
    scorer = load_scorer(args.scorer) if args.scorer else None
    model = None if scorer else RewardModel(args.reward_model, args.dtype, local_rank, args.trust_remote_code)
    settings = {"reward_model": args.reward_model, "scorer": args.scorer, "batch_size": args.batch_size,
                "input_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
                **({"scorer_sha256": _source_sha256(scorer)} if scorer else
                   {"dtype": resolve_dtype(args.dtype), "pad_token_id": model.pad,
                    "trust_remote_code": args.trust_remote_code})}
    job = Job(out.with_name(out.stem + ".parts"), settings, out, "score")

    def conversation(item):
        row, k = rows[item[0]], item[1]
        return row["messages"] + [{"role": "assistant", "content": row["all_generated_responses"][k]}]

    encoded = [model.encode(conversation(it)) for it in items] if model else None
    if model and model.pad is not None:
        _warn_pad_in_text(model, encoded)
    lengths = [len(e) for e in encoded] if model else [len(rows[r]["all_generated_responses"][k]) for r, k in items]
    batches = length_batches(lengths, [f"{rows[r]['prompt_id']}:{k:04d}" for r, k in items], args.batch_size)
    todo = job.todo(len(batches), rank, world)
    print(f"score: rank {rank}/{world}: {len(items)} answers in {len(batches)} batches, {len(todo)} to do here",
          flush=True)
    for unit in todo:
        start, members = time.perf_counter(), batches[unit]
        if model:
            values = model.scores([encoded[i] for i in members])
        else:
            values = [scorer(rows[items[i][0]]["prompt"], rows[items[i][0]]["all_generated_responses"][items[i][1]])
                      for i in members]
        where = [f"{source}: prompt_id {rows[items[i][0]]['prompt_id']}, answer {items[i][1]}" for i in members]
        job.write_unit(unit, [{"item": i, "score": _checked(v, w)} for i, v, w in zip(members, values, where)])
        print(f"score: rank {rank}: batch {unit} ({len(members)} answers) in {time.perf_counter() - start:.1f} s",
              flush=True)
    if not job.complete(len(batches)):
        print(f"score: rank {rank} done; the last rank to finish writes {out}", flush=True)
        return out
    scores = {r["item"]: r["score"] for r in job.read_units(len(batches))}
    scored = [dict(row, all_rm_scores=[]) for row in rows]
    for i, (r, _) in enumerate(items):
        scored[r]["all_rm_scores"].append(scores[i])
    write_jsonl(out, scored)
    print(f"score: wrote {len(items)} scores to {out}", flush=True)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="simpo-ds score", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help=f"the generate output directory (or its {GENERATIONS})")
    p.add_argument("--reward_model", default=None, help="an AutoModelForSequenceClassification directory or id")
    p.add_argument("--scorer", default=None, help="module:function or file.py:function, fn(prompt, response) -> float")
    p.add_argument("--out", default=None, help=f"output file (default: {OUTPUT} beside the input)")
    p.add_argument("--batch_size", type=int, default=8, help="conversations per forward")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--trust_remote_code", type=parse_bool, default=False, help="needed for ArmoRM's custom head")
    return p


def main(argv: list[str] | None = None) -> int:
    return command("score", parser, run, argv)
