"""``push_to_hub``: upload the exported model (``output_dir/final/``, or what the Python API's
``save_model`` / ``push_to_hub()`` wrote) to ``hub_model_id``.

Checked before training (:func:`check_push`) so a run that cannot push fails in seconds, not after
hours: ``huggingface_hub`` must be importable and a token present (``HF_TOKEN`` or ``huggingface-cli
login``). The upload itself runs on rank 0 after the export (:func:`push`).
"""

from __future__ import annotations

from pathlib import Path

from simpo_ds.config import ConfigError


def check_push(cfg, final_export: bool = True) -> None:
    """Raise ConfigError naming ``push_to_hub`` when the final push cannot work. ``final_export``:
    the run pushes its ``final/`` export (the CLI), so save_final must be on; the Python API pushes
    what ``save_model`` / ``push_to_hub()`` write."""
    try:
        from huggingface_hub import get_token
    except ImportError:
        raise ConfigError("config key 'push_to_hub' is true but huggingface_hub is not installed") from None
    if final_export and not cfg.save_final:
        raise ConfigError("config key 'push_to_hub' is true but save_final is false: there is no final/ to push")
    if not get_token():
        raise ConfigError(
            f"config key 'push_to_hub' is true but no Hugging Face token is set (HF_TOKEN or `huggingface-cli "
            f"login`): the export could not be pushed to {cfg.hub_model_id!r}. Set a token or push_to_hub: false"
        )


# Never uploaded from an output_dir: resumable DeepSpeed states (huge), the CLI's own export (pushed by
# itself), wandb's files, hidden staging folders.
PUSH_IGNORE = ["checkpoints/**", "final/**", "wandb/**", ".*", ".*/**"]


def push(folder: Path, repo_id: str, commit_message: str = "simpo-ds final export", revision: str | None = None,
         token: str | None = None) -> str:
    """Create ``repo_id`` (if needed) and upload ``folder`` but ``PUSH_IGNORE``; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True)
    return str(api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                 revision=revision, ignore_patterns=PUSH_IGNORE))
