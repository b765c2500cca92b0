"""Files written so that a crash never leaves a half-written one where a good one was.

Imports nothing heavy (no torch, no DeepSpeed): the on-policy tools and the trainer share it.

- :func:`write_atomic`: a small text file (a marker, ``latest``) via a temp file + fsync + rename.
- :func:`staging_dir` / :func:`install_model_files`: a model export is written into a fresh hidden
  sibling directory, then moved into place. A target that does not exist yet is created by one
  rename; an existing one keeps everything that is not a model file (``trainer.save_model(output_dir)``
  keeps ``checkpoints/`` and ``metrics.jsonl``): the new files replace theirs one by one, and only
  weight files of an earlier export that this one did not write are removed (stale shards, or an
  adapter next to merged weights, would be loaded instead of the new model).
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from pathlib import Path

# Weight files (and their indexes) of save_pretrained / peft exports: removed from the target when
# the new export did not write them. Everything else there is the user's and stays.
WEIGHT_FILE_PATTERNS = (
    "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
    "pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json",
    "adapter_model.safetensors", "adapter_model.bin", "adapter_config.json",
)


def write_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text``: written to ``path.tmp``, fsynced, renamed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def staging_dir(out_dir: str | Path) -> Path:
    """A new, empty hidden directory on ``out_dir``'s filesystem (so renames are atomic): inside an
    existing ``out_dir`` (a mount point or a volume works), else beside it."""
    out_dir = Path(out_dir).resolve()
    if out_dir.is_dir():
        return Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))


def is_weight_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in WEIGHT_FILE_PATTERNS)


def install_model_files(staged: Path, out_dir: str | Path) -> list[str]:
    """Move the export in ``staged`` (from :func:`staging_dir`) to ``out_dir`` -> the stale weight
    files removed. ``staged`` is gone afterwards; nothing in ``out_dir`` but model files is touched."""
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        shutil.rmtree(staged, ignore_errors=True)
        raise NotADirectoryError(f"cannot export the model to {out_dir}: it is a file, not a directory")
    if not out_dir.exists():
        os.replace(staged, out_dir)
        return []
    written = {p.name for p in staged.iterdir()}
    for name in sorted(written):  # every conflict before anything moves
        if (out_dir / name).is_dir() and not (staged / name).is_dir():
            shutil.rmtree(staged, ignore_errors=True)
            raise IsADirectoryError(f"cannot export the model to {out_dir}: {out_dir / name} is a directory")
    for name in sorted(written):
        target = out_dir / name
        if (staged / name).is_dir():  # rare (a sub-folder of a custom save_pretrained): swapped whole
            shutil.rmtree(target, ignore_errors=True)
        os.replace(staged / name, target)
    staged.rmdir()
    stale = [p.name for p in out_dir.iterdir() if p.is_file() and p.name not in written and is_weight_file(p.name)]
    for name in stale:
        (out_dir / name).unlink()
    return sorted(stale)
