"""simpo-ds: DeepSpeed-native SimPO (Meng, Xia & Chen 2024) with exact multi-pair sequence packing.

Pure components (``simpo_ds.data``, ``simpo_ds.loss``) import torch and tokenizers only; DeepSpeed is
imported by ``simpo_ds.engine`` alone.
"""

from simpo_ds.config import ConfigError, SimPOConfig

__all__ = ["ConfigError", "SimPOConfig", "SimPOTrainer", "TrainingPreempted"]


def __getattr__(name):  # SimPOTrainer imports DeepSpeed: only when asked for
    if name in ("SimPOTrainer", "TrainingPreempted"):
        from simpo_ds import api

        return getattr(api, name)
    raise AttributeError(f"module 'simpo_ds' has no attribute {name!r}")
__version__ = "0.1.2"  # the one place (setup.py reads it)
