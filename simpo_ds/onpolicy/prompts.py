"""The prompts to sample answers for: loaded from any dataset the trainer reads, deduplicated and
keyed by a stable id.

    prompts = load_prompts("HuggingFaceH4/ultrafeedback_binarized:train_prefs")
    prompts[0] == {"prompt_id": "a3f...", "prompt": "Write a haiku ...",
                   "messages": [{"role": "user", "content": "Write a haiku ..."}]}

A row's prompt is its ``prompt`` column (a string, or a list of ``{role, content}`` messages), else its
``messages`` column (without a final assistant turn), else a conversational ``chosen`` minus its last
message; a single user message is kept as its string. ``prompt_id`` is the sha256 of the prompt
string -- the id UltraFeedback's binarized sets carry, so ids line up with theirs -- or of the JSON of
a message list. Prompts are returned sorted by id:
the order, and so each rank's shard, does not depend on the order of the input rows.
"""

from __future__ import annotations

import hashlib
import json

from simpo_ds.data.load import load_pairs
from simpo_ds.data.tokenize import DataError, is_conversation


def prompt_id(prompt) -> str:
    """sha256 hex of a prompt string, or of the canonical JSON of a message list."""
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _single_turn(messages: list[dict]):
    """One user message -> its text (the id and ``prompt`` a string prompt has); else the list."""
    return messages[0]["content"] if len(messages) == 1 and messages[0]["role"] == "user" else messages


def _row_prompt(row: dict, index: int, source: str):
    """(prompt as stored, prompt messages) of one row."""
    where = f"{source}: row {index}"
    if "prompt" in row:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise DataError(f"{where}: empty 'prompt'")
            return prompt, [{"role": "user", "content": prompt}]
        if is_conversation(prompt) and prompt:
            return _single_turn(prompt), list(prompt)
        raise DataError(f"{where}: 'prompt' must be a string or a list of {{role, content}} messages")
    for key, drop_last in (("messages", None), ("chosen", True)):
        if key in row:
            messages = row[key]
            if not (is_conversation(messages) and messages):
                raise DataError(f"{where}: {key!r} must be a non-empty list of {{role, content}} messages")
            if drop_last or messages[-1]["role"] == "assistant":
                messages = messages[:-1]
            if not messages:
                raise DataError(f"{where}: {key!r} holds no prompt messages before the answer")
            return _single_turn(messages), list(messages)
    raise DataError(f"{source}: no 'prompt', 'messages' or 'chosen' column (columns: {sorted(row)})")


def load_prompts(spec: str, limit: int | None = None) -> list[dict]:
    """Unique prompts of ``spec`` (a file, a directory or ``hub/name:split``), sorted by ``prompt_id``;
    the first ``limit`` of them when given."""
    ds = load_pairs(spec)
    if len(ds) == 0:
        raise DataError(f"{spec}: no rows")
    unique = {}
    for index, row in enumerate(ds):
        prompt, messages = _row_prompt(row, index, spec)
        unique.setdefault(prompt_id(prompt), (prompt, messages))
    ids = sorted(unique)[:limit]
    return [{"prompt_id": i, "prompt": unique[i][0], "messages": unique[i][1]} for i in ids]
