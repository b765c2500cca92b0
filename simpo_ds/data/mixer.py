"""``dataset_mixer``: the alignment-handbook way to name training data in a recipe.

    dataset_mixer:                     # dataset -> fraction of its train split(s)
      princeton-nlp/llama3-ultrafeedback-armorm: 1.0
      data/extra_pairs: 0.5            # a directory of train.jsonl / test.jsonl files
    dataset_splits: [train, test]      # "train" in the name: training; "test": evaluation
    dataset_configs: null              # one hub config name per entry

    parts = mixture_parts(cfg, "train")      # [("data/extra_pairs:train", rows as written), ...]
    tokenized, record, report = prepare_pairs(partial(mixture_parts, cfg, "train"), "dataset_mixer", tok, cfg)

Each entry is

- a local directory: split ``s`` is the file ``s.jsonl`` / ``s.json`` / ``s.parquet``, or its shards
  ``s-00000-of-00002.parquet`` ..., in the directory or its ``data/`` folder (a hub snapshot's
  layout). Exactly that name: ``train`` never reads ``train_prefs.jsonl`` or ``train_sft.jsonl``;
- a ``save_to_disk`` directory (``dir/<split>/`` or one DatasetDict);
- a local data file: training rows only (read once, whatever the train split names), never
  evaluation rows;
- else a hub dataset id (a spec that looks like a local path and does not exist is an error, not a
  hub lookup).

A fraction f < 1 keeps the FIRST ⌊f·n⌋ rows of each of that entry's train splits
(alignment-handbook's rule); evaluation splits are used whole. The parts come back as written (not
adapted): ``simpo_ds.data.load.prepare_pairs`` adapts, validates and tokenizes each once, so the data
record has each part's format, row count and score ties. ``load_split_kind`` concatenates the adapted
parts instead (one shape).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import datasets

from simpo_ds.data.formats import to_canonical
from simpo_ds.data.load import BUILDERS, looks_local, read_files
from simpo_ds.data.tokenize import DataError

logger = logging.getLogger(__name__)


def split_files(directory: Path, split: str) -> tuple[str, list[str]]:
    """(builder, files) of ``split`` in a directory of data files: ``<split>.<ext>`` or the shards
    ``<split>-*.<ext>``, in ``directory`` and ``directory/data``; DataError listing the files there
    when there is none, or when json and parquet are mixed."""
    found, seen = [], []
    for folder in (directory, directory / "data"):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix in BUILDERS:
                seen.append(str(path.relative_to(directory)))
                if path.stem == split or path.stem.startswith(f"{split}-"):
                    found.append(path)
    if not found:
        raise DataError(f"dataset_mixer entry {str(directory)!r}, split {split!r}: no file {split}.jsonl/.json/.parquet "
                        f"(or shards {split}-*) in it or its data/ folder; data files there: {seen}")
    builders = {BUILDERS[p.suffix] for p in found}
    if len(builders) > 1:
        raise DataError(f"dataset_mixer entry {str(directory)!r}, split {split!r}: mixes json and parquet files "
                        f"{[str(p) for p in found]}")
    return builders.pop(), [str(p) for p in found]


def _load_split(name: str, split: str, config: Optional[str]) -> datasets.Dataset:
    path = Path(name).expanduser()
    source = f"dataset_mixer entry {name!r}, split {split!r}"
    if (path / split / "dataset_info.json").is_file():  # save_to_disk of a DatasetDict, one dir per split
        return _guarded(source, lambda: datasets.load_from_disk(str(path / split)))
    if (path / "dataset_dict.json").is_file():
        return _guarded(source, lambda: datasets.load_from_disk(str(path))[split])
    if path.is_dir():
        return read_files(*split_files(path, split), f"{name}:{split}")
    if looks_local(name):
        raise DataError(f"dataset_mixer entry {name!r}: no such file or directory")
    return _guarded(source, lambda: datasets.load_dataset(name, config, split=split))


def _guarded(source: str, load) -> datasets.Dataset:
    try:
        return load()
    except Exception as err:  # unknown split, offline hub, unreadable files ...
        raise DataError(f"{source}: could not load ({type(err).__name__}: {err})") from err


def _entry_parts(name: str, fraction: float, config: Optional[str], splits: list[str], kind: str):
    """[(part name, rows)] of one entry for ``kind``."""
    path = Path(name).expanduser()
    if path.is_file():  # one file: training rows, once
        if kind != "train":
            logger.info("dataset_mixer entry %r is a file: used for training only, not for %s", name, kind)
            return []
        if path.suffix not in BUILDERS:
            raise DataError(f"dataset_mixer entry {name!r}: unsupported file type {path.suffix!r} (use {', '.join(BUILDERS)})")
        return [(name, _fraction(read_files(BUILDERS[path.suffix], [str(path)], name), fraction))]
    parts = []
    for split in splits:
        ds = _load_split(name, split, config)
        parts.append((f"{name}:{split}", _fraction(ds, fraction) if kind == "train" else ds))
    return parts


def _fraction(ds: datasets.Dataset, fraction: float) -> datasets.Dataset:
    """The first ⌊fraction·n⌋ rows (alignment-handbook's rule)."""
    return ds if fraction >= 1 else ds.select(range(int(fraction * len(ds))))


def mixture_parts(cfg, kind: str) -> list[tuple[str, datasets.Dataset]]:
    """The ``kind`` ("train" or "test") parts of every mixer entry, in mixer order, as
    ``[(part name, rows as written)]``: ``"<entry>:<split>"`` (or the file of a file entry). A
    DataError when ``dataset_splits`` names no split of that kind or no entry has one."""
    splits = [s for s in cfg.dataset_splits if kind in s]
    if not splits:
        raise DataError(f"dataset_mixer: dataset_splits {cfg.dataset_splits} name no {kind} split (a name with {kind!r})")
    configs = cfg.dataset_configs or [None] * len(cfg.dataset_mixer)
    parts = []
    for (name, fraction), config in zip(cfg.dataset_mixer.items(), configs):
        parts += _entry_parts(name, fraction, config, splits, kind)
    if not parts:
        raise DataError(f"dataset_mixer: no entry has a {kind} split {splits} (file entries are training data only): "
                        f"give a directory holding {splits[0]}.jsonl, or drop {splits} from dataset_splits")
    return parts


def load_split_kind(cfg, kind: str) -> Optional[datasets.Dataset]:
    """The ``kind`` parts adapted (``to_canonical``) and concatenated; None when ``dataset_splits``
    names no split of that kind. The parts must adapt to one shape. (The trainer uses
    ``mixture_parts`` through ``prepare_pairs`` instead.)"""
    if not any(kind in s for s in cfg.dataset_splits):
        return None
    adapted, shape = [], None
    for part, raw in mixture_parts(cfg, kind):
        ds, info = to_canonical(raw, part, cfg.drop_ties)
        if shape is not None and sorted(ds.column_names) != shape[1]:
            raise DataError(f"dataset_mixer: {part} is {info['format']} (columns {ds.column_names}), "
                            f"{shape[0]} has columns {shape[1]}: mix datasets of one shape")
        shape = shape or (part, sorted(ds.column_names))
        ds = ds.select_columns(shape[1])
        adapted.append(ds if not adapted or ds.features == adapted[0].features else ds.cast(adapted[0].features))
    return datasets.concatenate_datasets(adapted)
