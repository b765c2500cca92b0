"""``push_to_hub``: upload the exported model (``output_dir/final/``) to ``hub_model_id``.

Checked before training (:func:`check_push`) so a run that cannot push fails in seconds, not after
hours: ``huggingface_hub`` must be importable and a token present (``HF_TOKEN`` or ``huggingface-cli
login``). The upload itself runs on rank 0 after the export (:func:`push`).
"""

from __future__ import annotations

from pathlib import Path

from simpo_ds.config import ConfigError


def check_push(cfg) -> None:
    """Raise ConfigError naming ``push_to_hub`` when the final push cannot work."""
    try:
        from huggingface_hub import get_token
    except ImportError:
        raise ConfigError("config key 'push_to_hub' is true but huggingface_hub is not installed") from None
    if not cfg.save_final:
        raise ConfigError("config key 'push_to_hub' is true but save_final is false: there is no final/ to push")
    if not get_token():
        raise ConfigError(
            f"config key 'push_to_hub' is true but no Hugging Face token is set (HF_TOKEN or `huggingface-cli "
            f"login`): the export could not be pushed to {cfg.hub_model_id!r}. Set a token or push_to_hub: false"
        )


def push(folder: Path, repo_id: str) -> str:
    """Create ``repo_id`` (if needed) and upload ``folder``; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    return str(api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="simpo-ds final export"))
