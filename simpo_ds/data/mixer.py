"""``dataset_mixer``: the alignment-handbook way to name training data in a recipe.

    dataset_mixer:                     # dataset -> fraction of its train split(s)
      princeton-nlp/llama3-ultrafeedback-armorm: 1.0
      data/extra_pairs: 0.5            # a directory of train.jsonl / test.jsonl files
    dataset_splits: [train, test]      # "train" in the name: training; "test": evaluation
    dataset_configs: null              # one hub config name per entry

    train, evaluation = load_split_kind(cfg, "train"), load_split_kind(cfg, "test")

Each entry is a hub dataset id, a local directory of data files (read as ``datasets.load_dataset(dir,
split=...)`` reads it: ``train.jsonl``, ``test.parquet``, ...) or a ``save_to_disk`` directory
(``dir/<split>/`` or one DatasetDict). A fraction f < 1 keeps the FIRST ⌊f·n⌋ rows of each of that
entry's train splits (alignment-handbook's rule); evaluation splits are used whole. Every split is
adapted to one shape (``simpo_ds.data.formats``) before the entries are concatenated in mixer order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import datasets

from simpo_ds.data.formats import to_canonical
from simpo_ds.data.tokenize import DataError


def _load_split(name: str, split: str, config: Optional[str]) -> datasets.Dataset:
    path = Path(name).expanduser()
    try:
        if (path / split / "dataset_info.json").is_file():  # save_to_disk of a DatasetDict, one dir per split
            return datasets.load_from_disk(str(path / split))
        if (path / "dataset_dict.json").is_file():
            return datasets.load_from_disk(str(path))[split]
        if path.is_dir():
            return datasets.load_dataset(str(path), split=split)
        return datasets.load_dataset(name, config, split=split)
    except Exception as err:  # unknown split, offline hub, unreadable files ...
        raise DataError(f"dataset_mixer entry {name!r}, split {split!r}: could not load ({type(err).__name__}: {err})") from err


def load_split_kind(cfg, kind: str) -> Optional[datasets.Dataset]:
    """The concatenated ``kind`` ("train" or "test") splits of every mixer entry; None when
    ``dataset_splits`` names no split of that kind."""
    splits = [s for s in cfg.dataset_splits if kind in s]
    if not splits:
        return None
    configs = cfg.dataset_configs or [None] * len(cfg.dataset_mixer)
    parts, shape = [], None
    for (name, fraction), config in zip(cfg.dataset_mixer.items(), configs):
        for split in splits:
            ds = _load_split(name, split, config)
            if kind == "train" and fraction < 1:
                ds = ds.select(range(int(fraction * len(ds))))
            ds, info = to_canonical(ds, f"{name}:{split}", cfg.drop_ties)
            if shape is not None and sorted(ds.column_names) != shape[1]:
                raise DataError(f"dataset_mixer: {name}:{split} is {info['format']} (columns {ds.column_names}), "
                                f"{shape[0]} has columns {shape[1]}: mix datasets of one shape")
            shape = shape or (f"{name}:{split}", sorted(ds.column_names))
            ds = ds.select_columns(shape[1])
            parts.append(ds if not parts or ds.features == parts[0].features else ds.cast(parts[0].features))
    return datasets.concatenate_datasets(parts)
