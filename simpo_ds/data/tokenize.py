"""Render a preference row to text and tokenize it with the reference ``tokenize_row`` rules.

Pure Python: this module uses a Hugging Face tokenizer object and the standard library only (no
torch), so it runs inside ``datasets.map`` worker processes.

Two steps (docs/design.md §2):

1. ``render_pair(row, tokenizer)`` -> ``(prompt_text, chosen_text, rejected_text)``: standard rows
   pass through; conversational rows (message lists) go through the chat template.
2. ``tokenize_pair(prompt, chosen, rejected, tokenizer, max_length=..., max_prompt_length=...)``
   -> ``{"chosen_input_ids", "chosen_prompt_len", "rejected_input_ids", "rejected_prompt_len",
   "drop_reason"}`` with BOS/EOS handling, the seam rule and truncation.

``tokenize_row(row, tokenizer, cfg)`` chains both.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

CHAT_TEMPLATE_MODES = ("reference", "generation_prompt")
TRUNCATION_MODES = ("keep_end", "keep_start")


class DataError(ValueError):
    """A problem with the training data; the message names the file, row and key when known."""


# ---------------------------------------------------------------------------------------------
# 1. rendering
# ---------------------------------------------------------------------------------------------


def is_conversation(value: Any) -> bool:
    """True for a non-empty list of ``{"role": str, "content": str}`` messages (OpenAI format)."""
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in value)
    )


def split_conversation(row: dict) -> tuple[list, dict, dict]:
    """Split a conversational row into ``(prompt_messages, chosen_message, rejected_message)``.

    The answers are the last message of ``chosen`` / ``rejected`` (role must be ``assistant``).
    The prompt is, in this order:

    - the row's ``prompt`` when that is itself a message list; every message before the answer, in
      ``chosen`` and in ``rejected``, must then be none or equal that list;
    - else ``chosen[:-1]`` (``rejected[:-1]`` must equal it), and when the row has a string
      ``prompt`` (H4 ``ultrafeedback_binarized``) and those messages hold no user turn, the string
      is appended as ``{"role": "user", "content": prompt}`` (TRL's rule for a string prompt with
      conversational answers). When they do hold one, the string is their copy and is not added.

    Raises ``DataError`` naming the mismatching key, or when the prompt has no message (the row
    holds only the answers and no non-empty prompt). The returned prompt list is a fresh copy.
    """
    chosen, rejected = row.get("chosen"), row.get("rejected")
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if not is_conversation(value):
            raise DataError(f"'{key}' must be a non-empty list of {{role, content}} messages")
        if value[-1]["role"] != "assistant":
            raise DataError(f"last message of '{key}' has role {value[-1]['role']!r}, expected 'assistant'")
    explicit = is_conversation(row.get("prompt"))
    prompt = list(row["prompt"]) if explicit else list(chosen[:-1])
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        before = list(value[:-1])
        if (explicit and before and before != prompt) or (not explicit and before != prompt):
            source = "'prompt'" if explicit else "'chosen'[:-1]"
            raise DataError(
                f"conversational prompt mismatch: '{key}'[:-1] ({len(before)} messages) differs from "
                f"{source} ({len(prompt)} messages)"
            )
    text = row.get("prompt")
    if not explicit and isinstance(text, str) and text.strip() and not any(m["role"] == "user" for m in prompt):
        prompt.append({"role": "user", "content": text})
    if not prompt:
        raise DataError("empty prompt: 'chosen'/'rejected' hold only the answer and there is no non-empty "
                        "'prompt' (a string or a message list)")
    return prompt, chosen[-1], rejected[-1]


def _template_text(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: search all of them
        template = " ".join(str(t) for t in template.values())
    if not template:
        raise DataError("conversational rows need a tokenizer with a chat_template (none is set)")
    return template


def maybe_insert_system_message(messages: list, tokenizer) -> list:
    """Prepend ``{"role": "system", "content": ""}`` when the chat template mentions "system" or
    "<|im_start|>" and the conversation does not start with a system message (the reference's
    alignment-handbook rule). Returns a new list."""
    if messages and messages[0]["role"] == "system":
        return list(messages)
    template = _template_text(tokenizer)
    if "system" in template or "<|im_start|>" in template:
        return [{"role": "system", "content": ""}] + list(messages)
    return list(messages)


def _render(tokenizer, messages: list, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _strip_bos(text: str, tokenizer) -> str:
    bos = tokenizer.bos_token
    return text[len(bos):] if bos and text.startswith(bos) else text


def _render_reference(tokenizer, prompt: list, chosen: dict, rejected: dict) -> tuple[str, str, str]:
    prompt_text = _render(tokenizer, prompt)
    chosen_text = _strip_bos(_render(tokenizer, [chosen]), tokenizer)
    rejected_text = _strip_bos(_render(tokenizer, [rejected]), tokenizer)
    return prompt_text, chosen_text, rejected_text


def render_generation_prompt(tokenizer, messages: list, auto_insert_empty_system_msg: bool = True) -> str:
    """The text a model answers after: ``messages`` (with the empty system message of
    ``maybe_insert_system_message`` when ``auto_insert_empty_system_msg``) rendered with the
    generation prompt -- exactly the prompt text of training with ``chat_template_mode:
    generation_prompt``, and what ``simpo-ds generate`` and the demo sample from."""
    if auto_insert_empty_system_msg:
        messages = maybe_insert_system_message(messages, tokenizer)
    return _render(tokenizer, messages, add_generation_prompt=True)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered prompt as training encodes it (no special tokens added, BOS first
    when the tokenizer has one)."""
    return _with_bos(_encode(tokenizer, text), tokenizer.bos_token_id)


def _render_generation_prompt(tokenizer, prompt: list, chosen: dict, rejected: dict) -> tuple[str, str, str]:
    prompt_text = render_generation_prompt(tokenizer, prompt, auto_insert_empty_system_msg=False)
    answers = []
    for key, message in (("chosen", chosen), ("rejected", rejected)):
        full = _render(tokenizer, prompt + [message])
        if not full.startswith(prompt_text):
            raise DataError(
                f"chat template: the rendered prompt (with generation prompt) is not a prefix of the "
                f"rendered prompt+'{key}' conversation; use chat_template_mode=reference"
            )
        answers.append(full[len(prompt_text):])
    return prompt_text, answers[0], answers[1]


def render_pair(
    row: dict, tokenizer, mode: str = "reference", auto_insert_empty_system_msg: bool = True
) -> tuple[str, str, str]:
    """Return ``(prompt_text, chosen_text, rejected_text)`` for one preference row.

    Standard rows (``prompt``/``chosen``/``rejected`` strings) are returned unchanged. For
    conversational rows (see ``split_conversation``), with an empty system message first inserted
    into the prompt messages when ``auto_insert_empty_system_msg`` (``maybe_insert_system_message``):

    - ``mode="reference"`` (princeton-nlp/SimPO run_simpo.py, task "simpo"): prompt =
      template(prompt messages) without generation prompt; each answer = template([answer message])
      rendered ALONE, with a leading ``bos_token`` string stripped (answers only, as the reference).
      E.g. with a ChatML template and prompt [user "Hi"], answer "Yo"::

          ("<|im_start|>system\\n<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n",
           "<|im_start|>assistant\\nYo<|im_end|>\\n", ...)

    - ``mode="generation_prompt"``: prompt = template(prompt, add_generation_prompt=True); answer =
      template(prompt + [answer]) minus that prompt prefix (``DataError`` when it is not a prefix)::

          ("<|im_start|>system\\n<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n",
           "Yo<|im_end|>\\n", ...)
    """
    if mode not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"chat_template_mode must be one of {CHAT_TEMPLATE_MODES}, got {mode!r}")
    if isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str):
        if not isinstance(row.get("prompt"), str):
            raise DataError(f"standard rows need a string 'prompt', got {type(row.get('prompt')).__name__}")
        return row["prompt"], row["chosen"], row["rejected"]
    prompt, chosen, rejected = split_conversation(row)
    if auto_insert_empty_system_msg:
        prompt = maybe_insert_system_message(prompt, tokenizer)
    if mode == "reference":
        return _render_reference(tokenizer, prompt, chosen, rejected)
    return _render_generation_prompt(tokenizer, prompt, chosen, rejected)


# ---------------------------------------------------------------------------------------------
# 2. tokenizing
# ---------------------------------------------------------------------------------------------


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _with_bos(ids: list[int], bos_id: int | None) -> list[int]:
    """Prepend BOS when the tokenizer has one and it is not already first."""
    if bos_id is None or (ids and ids[0] == bos_id):
        return ids
    return [bos_id] + ids


def _with_eos(ids: list[int], eos_id: int) -> list[int]:
    """Append EOS unless it is already last."""
    return ids if ids and ids[-1] == eos_id else ids + [eos_id]


def split_at_seam(prompt_ids: list[int], full_ids: list[int]) -> int:
    """Index where the answer starts in ``full_ids = enc(prompt + answer)``.

    ``len(prompt_ids)``, minus one when ``full_ids`` does not start with ``prompt_ids`` (the last
    prompt token merged with the first answer token(s): that token belongs to the answer).
    """
    start = len(prompt_ids)
    if full_ids[:start] != prompt_ids:
        start -= 1
    return max(start, 0)


def _truncate_prompt(ids: list[int], max_prompt_length: int, truncation_mode: str) -> list[int]:
    if truncation_mode == "keep_start":
        return ids[:max_prompt_length]
    return ids[-max_prompt_length:] if max_prompt_length > 0 else []


def _drop(reason: str) -> dict:
    return {
        "chosen_input_ids": [],
        "chosen_prompt_len": 0,
        "rejected_input_ids": [],
        "rejected_prompt_len": 0,
        "drop_reason": reason,
    }


def _prompts_differ_beyond_seam(chosen_prompt: list[int], rejected_prompt: list[int]) -> bool:
    """The reference accepts chosen/rejected prompts differing in at most one token / one length."""
    n_diff = sum(a != b for a, b in zip(chosen_prompt, rejected_prompt))
    return n_diff > 1 or abs(len(chosen_prompt) - len(rejected_prompt)) > 1


def tokenize_pair(
    prompt: str,
    chosen: str,
    rejected: str,
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int,
    truncation_mode: str = "keep_end",
) -> dict:
    """Tokenize one (prompt, chosen, rejected) text triple (reference ``SimPOTrainer.tokenize_row``).

    Per answer: ``full = enc(prompt + answer)``; its prompt is ``full[:start]`` and its answer
    ``full[start:]`` (``split_at_seam``: a token merged across the seam belongs to the answer, so
    the chosen and rejected prompts may differ in their last token). All encodings use
    ``add_special_tokens=False``. BOS is prepended to each prompt when the tokenizer has one and it
    is not already first (no BOS for tokenizers without one); EOS is appended to each answer unless
    already last.

    Truncation, decided per sequence with THAT sequence's own prompt length (after BOS) exactly as
    the reference's loop does (``len(seq_prompt) + longer_answer > max_length``, where
    ``longer_answer = max(len(chosen_answer), len(rejected_answer))`` after EOS):
    first the prompt is cut to ``max_prompt_length`` tokens (keep_end keeps its last tokens -- which
    drops a leading BOS, as in the reference -- keep_start its first); if the sequence is still too
    long, its answer is cut to its first ``max_length - max_prompt_length`` tokens (may cut EOS).
    The two prompts only differ when the seam merges on one side, so the two sequences only get
    different decisions when the longer prompt is exactly one token over the limit.

    Never raises for a bad row: it returns empty lists and a ``drop_reason`` instead, when an
    answer is empty after truncation or when the two prompts differ by more than the seam token.

    Example (BOS=1, EOS=2; prompt "a b" -> [5, 6], chosen " c" -> [7], rejected " d e" -> [8, 9])::

        {"chosen_input_ids": [1, 5, 6, 7, 2], "chosen_prompt_len": 3,
         "rejected_input_ids": [1, 5, 6, 8, 9, 2], "rejected_prompt_len": 3,
         "drop_reason": ""}
    """
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError("the tokenizer has no eos_token; set one (answers must end with EOS)")
    bos_id = tokenizer.bos_token_id
    prompt_ids = _encode(tokenizer, prompt)
    seqs = {}
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        full = _encode(tokenizer, prompt + answer)
        start = split_at_seam(prompt_ids, full)
        seqs[name] = [full[:start], full[start:]]
    if _prompts_differ_beyond_seam(seqs["chosen"][0], seqs["rejected"][0]):
        return _drop("chosen/rejected prompts differ beyond the seam token")
    for seq in seqs.values():
        seq[0] = _with_bos(seq[0], bos_id)
        seq[1] = _with_eos(seq[1], eos_id)
    longer = max(len(seqs["chosen"][1]), len(seqs["rejected"][1]))
    for seq in seqs.values():
        if len(seq[0]) + longer > max_length:
            seq[0] = _truncate_prompt(seq[0], max_prompt_length, truncation_mode)
    for seq in seqs.values():
        if len(seq[0]) + longer > max_length:
            seq[1] = seq[1][: max(max_length - max_prompt_length, 0)]
    for name, (_, answer) in seqs.items():
        if not answer:
            return _drop(f"empty {name} answer after truncation")
    out = {}
    for name, (p, a) in seqs.items():
        out[f"{name}_input_ids"] = p + a
        out[f"{name}_prompt_len"] = len(p)
    out["drop_reason"] = ""
    return out


# ---------------------------------------------------------------------------------------------
# 3. both
# ---------------------------------------------------------------------------------------------


def tokenize_row(row: dict, tokenizer, cfg_like) -> dict:
    """``render_pair`` then ``tokenize_pair`` with the settings of ``cfg_like`` (duck-typed: the
    attributes max_length, max_prompt_length, truncation_mode, chat_template_mode,
    auto_insert_empty_system_msg, e.g. a ``simpo_ds.config.SimPOConfig``). Returns the
    ``tokenize_pair`` dict."""
    prompt, chosen, rejected = render_pair(
        row,
        tokenizer,
        mode=cfg_like.chat_template_mode,
        auto_insert_empty_system_msg=cfg_like.auto_insert_empty_system_msg,
    )
    return tokenize_pair(
        prompt,
        chosen,
        rejected,
        tokenizer,
        max_length=cfg_like.max_length,
        max_prompt_length=cfg_like.max_prompt_length,
        truncation_mode=cfg_like.truncation_mode,
    )


TOKENIZE_SETTINGS = (
    "max_length",
    "max_prompt_length",
    "truncation_mode",
    "chat_template_mode",
    "auto_insert_empty_system_msg",
)


def tokenize_settings(cfg_like) -> SimpleNamespace:
    """Only the fields that change tokenization (so a ``datasets`` cache key ignores the rest)."""
    return SimpleNamespace(**{k: getattr(cfg_like, k) for k in TOKENIZE_SETTINGS})
