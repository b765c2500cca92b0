"""Load preference pairs, check them, and tokenize them with ``datasets`` (no torch).

    tokenized, record, report = prepare_pairs("data/train.jsonl", "data/train.jsonl", tokenizer, cfg)
    # record == {"rows": 1000, "kept": 996, "format": "standard", "score_ties": 2, "ties_dropped": True,
    #            "dropped": {"empty chosen answer after truncation": 2, "score tie (drop_ties: true)": 2}}

``prepare_pairs`` is the trainer's whole path (one conversion per source, ``rows`` counted before any
drop, ``rows == kept + sum(dropped)``); its steps are public too::

    ds = load_pairs("data/train.jsonl")             # or a dir, a .parquet, or "org/name:split"
    report = validate_columns(ds, "data/train.jsonl")
    tokenized, stats = tokenize_dataset(ds, tokenizer, cfg)

Every problem is a ``DataError`` whose message names the spec/file, the column or the row.
"""

from __future__ import annotations

import logging
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Union

import datasets

from simpo_ds.data.formats import to_canonical
from simpo_ds.data.tokenize import DataError, split_conversation, tokenize_row, tokenize_settings

logger = logging.getLogger(__name__)

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
MAX_ROWS_SHOWN = 5  # row indices quoted per problem kind


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


def _files_in_dir(path: Path) -> tuple[str, list[str]]:
    """(builder, sorted files) of the data files directly in ``path``; one format only."""
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in BUILDERS)
    if not files:
        raise DataError(f"{path}: directory holds no {'/'.join(BUILDERS)} files")
    builders = {BUILDERS[p.suffix] for p in files}
    if len(builders) > 1:
        raise DataError(f"{path}: directory mixes json and parquet files; keep one format per directory")
    return builders.pop(), [str(p) for p in files]


def read_files(builder: str, files: list[str], source: str, cache_dir: Optional[str] = None) -> datasets.Dataset:
    """The rows of ``files`` (one ``datasets`` builder: json or parquet), in file order."""
    try:
        return datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir)
    except Exception as e:  # malformed json, unreadable parquet, ...
        raise DataError(f"{source}: could not read ({type(e).__name__}: {e})") from e


def _load_local(path: Path, cache_dir: Optional[str]) -> datasets.Dataset:
    if path.is_dir():
        builder, files = _files_in_dir(path)
    elif path.suffix in BUILDERS:
        builder, files = BUILDERS[path.suffix], [str(path)]
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (use {', '.join(BUILDERS)})")
    return read_files(builder, files, str(path), cache_dir)


def looks_local(spec: str) -> bool:
    """True when ``spec`` can only mean a local path (starts with ``.``, ``/``, ``~`` or has a
    data-file suffix), so it is never looked up on the hub."""
    return spec.startswith((".", "/", "~")) or Path(spec).suffix in BUILDERS


def _load_hub(spec: str, split_default: str, cache_dir: Optional[str]) -> datasets.Dataset:
    name, _, split = spec.partition(":")
    try:
        return datasets.load_dataset(name, split=split or split_default, cache_dir=cache_dir)
    except Exception as e:  # offline, unknown name, unknown split, ...
        raise DataError(
            f"{spec!r}: not a local path, and loading it from the hub failed ({type(e).__name__}: {e})"
        ) from e


def load_pairs(spec: str, split_default: str = "train", *, cache_dir: Optional[str] = None) -> datasets.Dataset:
    """Load preference rows from ``spec`` as a ``datasets.Dataset``.

    ``spec`` is a local ``.jsonl``/``.json``/``.parquet`` file, a local directory of such files
    (one format, not recursive), or a hub dataset ``name[:split]`` (``split_default`` when no split
    is given). The hub is only tried when ``spec`` does not exist locally and does not look like a
    path (starts with ``.``, ``/``, ``~`` or has a data-file suffix): such a spec gives
    ``DataError("... no such file or directory")`` naming it. ``cache_dir`` goes to
    ``datasets.load_dataset`` (default: the datasets cache).
    """
    path = Path(spec).expanduser()
    if path.exists():
        return _load_local(path, cache_dir)
    if looks_local(spec):
        raise DataError(f"{spec}: no such file or directory")
    return _load_hub(spec, split_default, cache_dir)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


def _is_conversational(ds: datasets.Dataset) -> bool:
    return "chosen" in ds.column_names and len(ds) > 0 and isinstance(ds[0]["chosen"], list)


def _check_columns(ds: datasets.Dataset, source: str, conversational: bool) -> None:
    required = ["chosen", "rejected"] + ([] if conversational else ["prompt"])
    for column in required:
        if column not in ds.column_names:
            raise DataError(f"{source}: missing column {column!r} (columns present: {ds.column_names})")


def _row_problems(row: dict, conversational: bool) -> list[tuple[str, bool]]:
    """(kind, fatal) for every problem of one row."""
    if conversational:
        try:
            split_conversation(row)
        except DataError as e:
            return [(str(e), True)]
        chosen, rejected = row["chosen"][-1]["content"], row["rejected"][-1]["content"]
        fields = {"chosen": chosen, "rejected": rejected}
    else:
        fields = {k: row[k] for k in ("prompt", "chosen", "rejected")}
    problems = [(f"non-string {k!r}", True) for k, v in fields.items() if not isinstance(v, str)]
    if problems:
        return problems
    problems += [(f"empty {k!r}", False) for k, v in fields.items() if not v.strip()]
    if fields["chosen"] == fields["rejected"]:
        problems.append(("chosen == rejected", False))
    return problems


def _iter_rows(ds: datasets.Dataset, batch_size: int = 1000):
    """Rows as dicts (``prompt`` None when absent), read in batches (fast on large sets)."""
    for batch in ds.iter(batch_size=batch_size):
        n = len(batch["chosen"])
        for i in range(n):
            yield {k: (batch[k][i] if k in batch else None) for k in ("prompt", "chosen", "rejected")}


def validate_columns(ds: datasets.Dataset, source: str) -> dict:
    """Check the columns and every row; raise ``DataError`` on fatal problems, else report.

    Required columns: ``chosen``, ``rejected`` and (unless conversational, i.e. ``chosen`` holds
    message lists) ``prompt``; the error names the missing column and lists those present.
    Fatal row problems (non-string fields, malformed messages, a conversational prompt mismatch or a
    conversation without prompt messages) raise one ``DataError`` listing each kind with its count
    and first row indices. Warnings (an empty standard ``prompt`` string, empty chosen/rejected,
    chosen == rejected) are logged and reported::

        {"source": "train.jsonl", "rows": 1000, "format": "standard",
         "warnings": {"chosen == rejected": {"count": 3, "rows": [17, 250, 911]}}}
    """
    conversational = _is_conversational(ds)
    _check_columns(ds, source, conversational)
    fatal, warnings = {}, {}
    columns = ["chosen", "rejected"] + (["prompt"] if "prompt" in ds.column_names else [])
    for index, row in enumerate(_iter_rows(ds.select_columns(columns))):
        for kind, is_fatal in _row_problems(row, conversational):
            entry = (fatal if is_fatal else warnings).setdefault(kind, {"count": 0, "rows": []})
            entry["count"] += 1
            if len(entry["rows"]) < MAX_ROWS_SHOWN:
                entry["rows"].append(index)
    if fatal:
        raise DataError(f"{source}: bad rows: " + "; ".join(_describe(k, v) for k, v in fatal.items()))
    for kind, entry in warnings.items():
        logger.warning("%s: %s", source, _describe(kind, entry))
    kind = "conversational" if conversational else "standard"
    return {"source": source, "rows": len(ds), "format": kind, "warnings": warnings}


def _describe(kind: str, entry: dict) -> str:
    return f"{kind} in {entry['count']} row(s), e.g. row(s) {entry['rows']}"


# ---------------------------------------------------------------------------------------------
# tokenization
# ---------------------------------------------------------------------------------------------


def _tokenize_example(row: dict, index: int, *, tokenizer, settings) -> dict:
    try:
        out = tokenize_row(row, tokenizer, settings)
    except DataError as e:
        raise DataError(f"row {index}: {e}") from e
    out["index"] = index
    return out


def tokenize_dataset(ds: datasets.Dataset, tokenizer, cfg_like, num_proc: Optional[int] = None):
    """Tokenize every row (``datasets.map``, cached) and drop the rows that cannot be trained on.

    Returns ``(tokenized, stats)``: ``tokenized`` has the columns ``chosen_input_ids``,
    ``chosen_prompt_len``, ``rejected_input_ids``, ``rejected_prompt_len`` (see
    ``tokenize_pair``) and ``index`` (the row's index in ``ds``); ``stats`` is
    ``{"rows": n, "kept": k, "dropped": {reason: count}}``. With ``cfg_like.strict`` any dropped
    row raises ``DataError`` naming the first dropped row index and its reason. Only the
    tokenization fields of ``cfg_like`` enter the cache key.
    """
    mapped = ds.map(
        partial(_tokenize_example, tokenizer=tokenizer, settings=tokenize_settings(cfg_like)),
        with_indices=True,
        remove_columns=ds.column_names,
        num_proc=num_proc,
        desc="Tokenizing pairs",
    )
    reasons = mapped["drop_reason"]
    dropped = Counter(r for r in reasons if r)
    if dropped and getattr(cfg_like, "strict", False):
        first = next(i for i, r in enumerate(reasons) if r)
        raise DataError(f"row {first}: {reasons[first]} (strict=true; {sum(dropped.values())} row(s) affected)")
    kept = [i for i, r in enumerate(reasons) if not r]
    if dropped:
        mapped = mapped.select(kept)
    stats = {"rows": len(ds), "kept": len(kept), "dropped": dict(dropped)}
    return mapped.remove_columns("drop_reason"), stats


# ---------------------------------------------------------------------------------------------
# the trainer's path: load -> adapt -> validate -> tokenize, with the data record
# ---------------------------------------------------------------------------------------------

TIE_REASON = "score tie (drop_ties: true)"
Parts = Callable[[], list[tuple[str, datasets.Dataset]]]


def prepare_pairs(source: Union[str, datasets.Dataset, Parts], name: str, tokenizer, cfg_like,
                  num_proc: Optional[int] = None) -> tuple[datasets.Dataset, dict, dict]:
    """Everything between a data source and the pairs the trainer trains on -> (tokenized, record, report).

    ``source``: a spec for ``load_pairs``, a ``datasets.Dataset`` of rows as the user wrote them, or
    a callable returning parts ``[(part name, rows)]`` (``simpo_ds.data.mixer.mixture_parts``). Each
    part is adapted exactly once (``to_canonical``), validated and tokenized on its own, so an error
    names the part (file) and its row; ``cfg_like.drop_ties`` drops score ties after that, so row
    numbers stay the file's. ``name`` names the whole source in errors.

    ``record`` (the trainer's ``data`` record): ``{"rows": rows read, before any drop, "kept": pairs
    left, "dropped": {reason: count}, "format": detected format, "score_ties": count, "ties_dropped":
    bool}``, with ``rows == kept + sum(dropped.values())``; several parts add ``"sources"`` (one such
    record per part, with its ``"source"``) and join distinct formats with " + ". ``report``:
    ``{"warnings": {kind: ...}}`` (``validate_columns``' warnings plus ``"score ties"``; kinds are
    prefixed with the part name when there are several parts).
    """
    parts = source() if callable(source) else [(name, load_pairs(source) if isinstance(source, str) else source)]
    prepared = [_prepare_part(part, raw, tokenizer, cfg_like, num_proc) for part, raw in parts]
    record = _merge_records([p[1] for p in prepared])
    warnings = {}
    for _, part_record, part_warnings in prepared:
        prefix = f"{part_record['source']}: " if len(prepared) > 1 else ""
        warnings.update({prefix + kind: value for kind, value in part_warnings.items()})
    tokenized = [p[0] for p in prepared]
    tokenized = tokenized[0] if len(tokenized) == 1 else datasets.concatenate_datasets(tokenized)
    if len(tokenized) == 0:
        raise DataError(f"{name}: no trainable pairs left after tokenization ({record})")
    return tokenized, record, {"warnings": warnings}


def _prepare_part(source: str, raw: datasets.Dataset, tokenizer, cfg_like, num_proc: Optional[int]):
    """(tokenized, record with "source", warnings) of one part; see ``prepare_pairs``."""
    canonical, info = to_canonical(raw, source)
    warnings = validate_columns(canonical, source)["warnings"]
    if info["ties"]:
        warnings["score ties"] = info["ties"]
    try:
        tokenized, stats = tokenize_dataset(canonical, tokenizer, cfg_like, num_proc=num_proc)
    except DataError as e:
        raise DataError(f"{source}: {e}") from e
    drop_ties = bool(getattr(cfg_like, "drop_ties", False) and info["ties"])
    if drop_ties:
        tokenized, stats = _drop_rows(tokenized, stats, info["tie_rows"], TIE_REASON)
    record = {"source": source, "rows": info["rows"], "kept": stats["kept"], "dropped": stats["dropped"],
              "format": info["format"], "score_ties": info["ties"], "ties_dropped": drop_ties}
    return tokenized, record, warnings


def _drop_rows(tokenized: datasets.Dataset, stats: dict, rows: list[int], reason: str) -> tuple[datasets.Dataset, dict]:
    """``tokenized`` without the input rows ``rows`` (its ``index`` column) still in it; counted under ``reason``."""
    drop = set(rows)
    keep = [k for k, index in enumerate(tokenized["index"]) if index not in drop]
    removed = len(tokenized) - len(keep)
    if not removed:
        return tokenized, stats
    return tokenized.select(keep), {**stats, "kept": len(keep), "dropped": {**stats["dropped"], reason: removed}}


def _merge_records(records: list[dict]) -> dict:
    """One record for all parts (``prepare_pairs``)."""
    if len(records) == 1:
        return {k: v for k, v in records[0].items() if k != "source"}
    dropped = Counter()
    for r in records:
        dropped.update(r["dropped"])
    return {"rows": sum(r["rows"] for r in records), "kept": sum(r["kept"] for r in records), "dropped": dict(dropped),
            "format": " + ".join(dict.fromkeys(r["format"] for r in records)),
            "score_ties": sum(r["score_ties"] for r in records), "ties_dropped": any(r["ties_dropped"] for r in records),
            "sources": records}
