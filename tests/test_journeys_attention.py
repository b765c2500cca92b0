"""Journeys (issue 23, items 5 and 15): the attention a user asks for either runs or stops the run with
one line naming ``attn_implementation``.

- 15: an attention kernel that cannot run here (``varlen`` or ``flash_attention_2`` on CPU,
  ``flash_attention_2`` without flash-attn, a flash kernel in fp32, a block-diagonal kernel with prompt
  sharing, an unknown name) ends ``launch/train.py`` with exit 2 and one line ``simpo-ds: error: config
  key 'attn_implementation': ...`` — not a ValueError traceback. In process: the entry script's
  ``__main__`` with argv, one rank (no DeepSpeed launch; the run stops while choosing the model's
  attention, before loading the model).
- 5: the Ulysses wrapper of every cu_seqlens kernel loads like any attention (``from_pretrained``); its
  name carries no "flash", which transformers reads as "look a flash kernel up by this name". The
  numbers under sequence parallelism: tests/test_sequence_parallel.py (sliced row == whole row with
  transformers' own flash_attention_2 path over a CPU stand-in of flash-attn).
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from run_assets import make_assets
from transformers import AutoModelForCausalLM

from simpo_ds import attention, engine
from simpo_ds import sequence_parallel as spm
from simpo_ds.attention import CU_SEQLENS_IMPLEMENTATIONS, register_attention

ROOT = Path(__file__).resolve().parents[1]
KEY = "simpo-ds: error: config key 'attn_implementation': "


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("journeys_attention"), pairs=8)


@pytest.fixture
def one_rank():
    """The environment and process group a plain ``python launch/train.py`` creates, undone afterwards
    (the run ends with an error, so the CLI leaves its group alive)."""
    saved = dict(os.environ)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def train_script(argv: list[str], monkeypatch) -> int:
    """``python launch/train.py ARGV`` in this process -> its exit code."""
    monkeypatch.setattr(sys, "argv", ["launch/train.py", *argv])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / "launch" / "train.py"), run_name="__main__")
    return stop.value.code


@pytest.mark.parametrize(
    "args,device,why",
    [
        (["--attn_implementation", "varlen"], "cpu",
         "'varlen' runs torch's CUDA flash kernel and cannot run on 'cpu'; use 'sdpa_varlen'"),
        (["--attn_implementation", "flash_attention_2"], "cpu",
         "'flash_attention_2' needs CUDA (device is 'cpu'); use 'sdpa_varlen', 'sdpa' or 'eager' here"),
        (["--use_flash_attention_2", "true"], "cuda",  # the alignment-handbook key, flash-attn not installed
         "'flash_attention_2' needs flash-attn, which is not installed (or does not import): `pip install"),
        (["--prompt_sharing", "true", "--attn_implementation", "varlen"], "cpu",
         "'varlen' only does block-diagonal causal attention: prompt_sharing needs an attention that takes"),
        (["--attn_implementation", "varlen", "--torch_dtype", "float32"], "cuda",
         "'varlen' runs a flash kernel, which takes float16/bfloat16 only, and the model is torch.float32 "
         "(torch_dtype)"),
        (["--attn_implementation", "flex_attention"], "cpu", "must be one of auto, flash_attention_2, varlen"),
    ],
    ids=["varlen-on-cpu", "flash-on-cpu", "flash-without-flash-attn", "varlen-with-prompt-sharing",
         "varlen-in-fp32-on-cuda", "unknown-name"],
)
def test_15_impossible_attention_exits_2_with_one_line(assets, tmp_path, monkeypatch, capsys, one_rank, args, device,
                                                       why):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(engine, "device_type", lambda: device)  # "cuda": the choice is made as on a GPU node
    monkeypatch.setattr(attention, "_varlen_available", lambda: True)  # a GPU node's torch (>= 2.10)
    out = tmp_path / "run"
    code = train_script(["--model_name_or_path", assets["model"], "--train_data", assets["train"], "--output_dir",
                         str(out), "--max_steps", "1", "--train_batch_size", "4", "--report_to", "none", *args],
                        monkeypatch)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    (line,) = [x for x in err.splitlines() if x.startswith("simpo-ds: error:")]
    assert line.startswith(KEY) and why in line, line
    assert "Traceback" not in err
    assert not (out / "checkpoints").exists()  # stopped before any training


def test_5_ulysses_wrapper_of_every_kernel_loads(assets):
    """Under sequence parallelism the trainer loads the model with the wrapper's name: it must pass
    transformers' checks for every kernel. Before: ``ulysses_flash_attention_2`` failed to load with
    "Could not find the currently requested flash attention implementation"."""
    register_attention()
    for kernel in CU_SEQLENS_IMPLEMENTATIONS:
        name = spm.register(kernel)
        model = AutoModelForCausalLM.from_pretrained(assets["model"], attn_implementation=name)
        assert model.config._attn_implementation == name
        assert name.startswith("ulysses_") and "flash" not in name, name
    assert spm.wrapper_name("flash_attention_2") == "ulysses_fa_attention_2"
    assert spm.wrapper_name("sdpa_varlen") == "ulysses_sdpa_varlen"
