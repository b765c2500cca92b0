"""Preference-data formats: detect the shape of a dataset and adapt it to one the tokenizer reads.

The tokenizer (``simpo_ds.data.tokenize``) reads two shapes: **standard** (``prompt``, ``chosen``,
``rejected`` strings) and **conversational** (``chosen``/``rejected`` message lists of ``{role,
content}``, with an optional ``prompt``: a message list, or a string that becomes the user turn when
the lists hold only the answers -- ``split_conversation``). Every other shape is adapted here, row by
row, before validation::

    ds, info = to_canonical(ds, "train.jsonl")
    info == {"format": "H4 ultrafeedback_binarized", "rows": 1000, "scores": "H4 score_chosen/score_rejected",
             "ties": 3, "tie_rows": [17, 250, 911], "ties_dropped": False}

| format | detected by | adapted to |
|---|---|---|
| standard | string chosen/rejected + string prompt | as is |
| standard, implicit prompt (Anthropic hh-rlhf) | string chosen/rejected, no prompt | prompt = their common prefix, cut back to the end of the last turn marker in it (``\\n\\nAssistant:``, ``<|im_start|>assistant\\n``, ``[/INST]``, ...) or else to the last whitespace, so no answer word moves into the prompt |
| conversational (explicit or implicit prompt) | chosen holds ``{role, content}`` messages | as is |
| H4 ultrafeedback_binarized | string prompt + ``{role, content}`` message lists | as is: the prompt is the messages before the answer; when they hold no user turn (the lists hold only the answers), the string is that user turn, else it is their copy |
| ShareGPT | chosen holds ``{from, value}`` messages | ``{role, content}``: human/user -> user, gpt/assistant -> assistant, system; a string prompt is kept (as H4) |

Scores (any format): argilla ``chosen-rating``/``rejected-rating`` or H4 ``score_chosen``/
``score_rejected``. Equal scores (ties) are counted (``ties``, ``tie_rows``) and warned about;
``drop_ties`` drops them here (``simpo_ds.data.load.prepare_pairs`` drops them after validation
instead, so errors name file rows). The score columns themselves are NOT kept: only the pair columns
are, since nothing after this step reads a score (the tie count is taken here, from the input rows).

TRL's ``extract_prompt`` cuts at the first differing character (stepping back over one space), so
when both answers start with the same word ("Yes, ..." / "Yes. ...") that word moves into the prompt
and out of both answers' rewards; the marker/whitespace rule here keeps it in the answers.
"""

from __future__ import annotations

import logging
from typing import Optional

import datasets

from simpo_ds.data.tokenize import DataError

logger = logging.getLogger(__name__)

# Assistant-turn markers after which an answer starts, as chat formats write them (implicit prompts).
TURN_MARKERS = (
    "\n\nAssistant:", "\n\nassistant:", "\nAssistant:", "<|im_start|>assistant\n", "<|assistant|>\n", "<|assistant|>",
    "[/INST]", "### Assistant:", "### Response:", "<start_of_turn>model\n",
    "<|start_header_id|>assistant<|end_header_id|>\n\n", "ASSISTANT:",
)
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
SCORE_COLUMNS = (("chosen-rating", "rejected-rating", "argilla chosen-rating/rejected-rating"),
                 ("score_chosen", "score_rejected", "H4 score_chosen/score_rejected"))

STANDARD, IMPLICIT = "standard", "standard, implicit prompt"
CONVERSATIONAL, H4_BINARIZED, SHAREGPT = "conversational", "H4 ultrafeedback_binarized", "ShareGPT"


def detect_format(ds: datasets.Dataset, source: str) -> str:
    """The format name of ``ds`` from its columns and first row; DataError naming what is missing."""
    for column in ("chosen", "rejected"):
        if column not in ds.column_names:
            raise DataError(f"{source}: missing column {column!r} (columns present: {ds.column_names}); "
                            "expected chosen/rejected strings or message lists")
    if len(ds) == 0:
        raise DataError(f"{source}: no rows")
    first = ds[0]["chosen"]
    if isinstance(first, str):
        return STANDARD if "prompt" in ds.column_names else IMPLICIT
    if isinstance(first, list) and first and isinstance(first[0], dict):
        if "from" in first[0] and "value" in first[0]:
            return SHAREGPT
        return H4_BINARIZED if "prompt" in ds.column_names and isinstance(ds[0]["prompt"], str) else CONVERSATIONAL
    raise DataError(f"{source}: row 0: 'chosen' must be a string or a non-empty list of messages, "
                    f"got {type(first).__name__}")


def extract_prompt(chosen: str, rejected: str) -> Optional[str]:
    """The shared prompt of two full texts: their common prefix cut back to the end of the last turn
    marker it contains, else to its last whitespace (kept in the prompt), so the cut never splits a
    word. Without a marker, answer words shared by both texts cannot be told from the prompt's. None
    when nothing is shared."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    prefix = chosen[:n]
    ends = [prefix.rfind(m) + len(m) for m in TURN_MARKERS if m in prefix]
    if ends:
        return prefix[: max(ends)]
    cut = max(prefix.rfind(" "), prefix.rfind("\n"), prefix.rfind("\t"))
    return prefix[: cut + 1] if cut >= 0 else None


def _implicit_to_standard(row: dict, index: int, source: str) -> dict:
    chosen, rejected = row["chosen"], row["rejected"]
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            raise DataError(f"{source}: row {index}: {key!r} must be a string, got {type(value).__name__}")
    prompt = extract_prompt(chosen, rejected)
    if not prompt:
        raise DataError(f"{source}: row {index}: 'chosen' and 'rejected' share no prompt prefix; "
                        "add a 'prompt' column (standard format)")
    return {"prompt": prompt, "chosen": chosen[len(prompt):], "rejected": rejected[len(prompt):]}


def _sharegpt_messages(messages, key: str, index: int, source: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{source}: row {index}: {key!r} must be a non-empty list of {{from, value}} messages")
    out = []
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or "from" not in message or "value" not in message:
            raise DataError(f"{source}: row {index}: {key}[{j}] must have 'from' and 'value' (ShareGPT)")
        role = SHAREGPT_ROLES.get(message["from"])
        if role is None:
            raise DataError(f"{source}: row {index}: {key}[{j}]['from'] is {message['from']!r}; expected one of "
                            f"{sorted(SHAREGPT_ROLES)}")
        if not isinstance(message["value"], str):
            raise DataError(f"{source}: row {index}: {key}[{j}]['value'] must be a string")
        out.append({"role": role, "content": message["value"]})
    return out


def _sharegpt_to_conversational(row: dict, index: int, source: str) -> dict:
    """Messages to ``{role, content}``; a ``prompt`` column is converted when it is a message list and
    kept as it is otherwise (a string prompt is the user turn when the lists hold only the answers)."""
    out = {k: _sharegpt_messages(row[k], k, index, source) for k in ("chosen", "rejected")}
    if "prompt" in row:
        prompt = row["prompt"]
        out["prompt"] = _sharegpt_messages(prompt, "prompt", index, source) if isinstance(prompt, list) else prompt
    return out


def _score_columns(ds: datasets.Dataset) -> Optional[tuple[str, str, str]]:
    return next((c for c in SCORE_COLUMNS if c[0] in ds.column_names and c[1] in ds.column_names), None)


def _ties(ds: datasets.Dataset, chosen_col: str, rejected_col: str, source: str) -> list[bool]:
    ties = []
    for index, (c, r) in enumerate(zip(ds[chosen_col], ds[rejected_col])):
        for key, value in ((chosen_col, c), (rejected_col, r)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DataError(f"{source}: row {index}: {key!r} must be a number, got {value!r}")
        ties.append(c == r)
    return ties


def to_canonical(ds: datasets.Dataset, source: str, drop_ties: bool = False) -> tuple[datasets.Dataset, dict]:
    """Adapt ``ds`` to the standard or conversational shape -> (dataset, info).

    ``info``: ``{"format": name, "rows": rows of ds (before any drop), "scores": name or None,
    "ties": count, "tie_rows": [row indices in ds], "ties_dropped": bool}``. Only the pair columns
    (``prompt``, ``chosen``, ``rejected``) are kept: score columns are read for the tie count and
    dropped. With ``drop_ties`` the tie rows are dropped here. A row that fits no format raises
    DataError naming ``source``, the row and the key.
    """
    fmt = detect_format(ds, source)
    info = {"format": fmt, "rows": len(ds), "scores": None, "ties": 0, "tie_rows": [], "ties_dropped": False}
    scores = _score_columns(ds)
    if scores is not None:
        tie_rows = [i for i, tie in enumerate(_ties(ds, scores[0], scores[1], source)) if tie]
        info.update(scores=scores[2], ties=len(tie_rows), tie_rows=tie_rows)
        if tie_rows:
            logger.warning("%s: %d pair(s) with equal chosen and rejected scores (%s); drop_ties: true drops them",
                           source, len(tie_rows), scores[2])
    keep = [c for c in ("prompt", "chosen", "rejected") if c in ds.column_names]
    ds = ds.select_columns(keep)
    if fmt == IMPLICIT:
        ds = ds.map(_implicit_to_standard, with_indices=True, fn_kwargs={"source": source}, desc="Extracting prompts")
    elif fmt == SHAREGPT:
        ds = ds.map(_sharegpt_to_conversational, with_indices=True, fn_kwargs={"source": source},
                    remove_columns=keep, desc="ShareGPT -> messages")
    if drop_ties and info["tie_rows"]:
        ds = without_rows(ds, info["tie_rows"])
        info["ties_dropped"] = True
    return ds, info


def without_rows(ds: datasets.Dataset, rows: list[int]) -> datasets.Dataset:
    """``ds`` without the rows at the indices ``rows``."""
    drop = set(rows)
    return ds.select([i for i in range(len(ds)) if i not in drop])
