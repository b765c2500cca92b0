"""``simpo-ds generate``: K sampled answers per prompt from the policy itself.

    simpo-ds generate --model M --prompts P --out DIR --num_samples 5 [--temperature 0.8 --top_p 0.95
                      --max_new_tokens 2048 --seed 42 --batch_size 16 --backend auto]
    torchrun --nproc_per_node 8 launch/generate.py --model M --prompts P --out DIR ...   # 8 shards

writes ``DIR/generations.jsonl``, one row per prompt in ``prompt_id`` order::

    {"prompt_id": "...", "prompt": "...", "messages": [{"role": "user", ...}],
     "all_generated_responses": [K strings], "all_finished": [K bools: ended with EOS]}

Prompts are rendered with the model's chat template exactly as training renders a prompt
(``render_generation_prompt``: the empty system message when ``--auto_insert_empty_system_msg``, the
generation prompt, BOS as training encodes it). Each batch of prompts (a job unit, see ``jobs``;
``DIR/generations.parts/``) is sampled with a seed derived from ``--seed`` and its prompt ids, and
batches are the same for any number of ranks: 1 rank, 8 ranks and a resumed run give the same
answers. Backend: vLLM when it is installed and a GPU is present (``--backend auto``), else
transformers batched generation (left padding, KV cache, batches by prompt length). Sampling is
plain temperature + top-p on both backends (no top-k, no penalty, no minimum length, whatever the
model's generation_config says; only its eos ids are kept), as the reference's vLLM decoding. The
backend and the dtype ``auto`` resolve to are part of the settings a resume must match.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import signal
import time
from pathlib import Path

from simpo_ds.data.tokenize import DataError, encode_prompt, render_generation_prompt
from simpo_ds.onpolicy.jobs import (DTYPES, Job, command, device_and_dtype, length_batches, parse_bool, pin_gpu,
                                   rank_and_world, resolve_dtype, write_jsonl)
from simpo_ds.onpolicy.prompts import load_prompts

OUTPUT = "generations.jsonl"
EXIT_AFTER_UNITS = "SIMPO_DS_TEST_KILL_AFTER_UNITS"  # tests: SIGKILL this process after N units


def unit_seed(seed: int, prompt_ids: list[str]) -> int:
    """The sampling seed of one batch: a function of --seed and the batch's prompts only."""
    digest = hashlib.sha256(f"{seed}:{','.join(prompt_ids)}".encode()).hexdigest()
    return int(digest[:15], 16)


def pick_backend(name: str) -> str:
    """The backend ``--backend`` means on this machine: ``auto`` = vllm when it is installed and a GPU
    is present, else transformers. Looked up without importing vLLM."""
    import torch

    has_vllm = importlib.util.find_spec("vllm") is not None
    if name == "vllm" and not has_vllm:
        raise DataError("--backend vllm: vllm is not installed (pip install vllm, or --backend transformers)")
    if name != "auto":
        return name
    return "vllm" if has_vllm and torch.cuda.is_available() else "transformers"


class TransformersSampler:
    """Batched ``model.generate`` with left padding and the KV cache."""

    def __init__(self, args, tokenizer, local_rank: int):
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.device, dtype = device_and_dtype(local_rank, args.dtype)
        self.model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(self.device).eval()
        self.tokenizer, self.torch = tokenizer, torch
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos = sorted(set(eos + [tokenizer.eos_token_id]) - {None})
        if not self.eos:
            raise DataError(f"--model {args.model}: neither its tokenizer nor its generation_config has an eos "
                            f"token, so an answer could never end")
        vocab = self.model.get_input_embeddings().num_embeddings
        # left padding is masked out, so any id the embedding has will do: the tokenizer's pad, else an eos
        usable = [i for i in [tokenizer.pad_token_id, *self.eos] if i is not None and 0 <= i < vocab]
        self.pad = usable[0] if usable else self.eos[0]
        self.config = GenerationConfig(
            do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0,
            max_new_tokens=args.max_new_tokens, num_return_sequences=args.num_samples,
            pad_token_id=self.pad, eos_token_id=self.eos,
        )
        # generate() fills every field left unset here from the model's own generation_config
        # (repetition_penalty, no_repeat_ngram_size, min_new_tokens, bad_words_ids, ...): replace it, so
        # the unset fields take transformers' neutral defaults and the sampling is exactly the above.
        self.model.generation_config = self.config

    def sample(self, prompt_ids: list[list[int]], seed: int) -> list[list[tuple[str, bool]]]:
        """K (text, finished) per prompt."""
        torch = self.torch
        width = max(len(ids) for ids in prompt_ids)
        input_ids = torch.tensor([[self.pad] * (width - len(ids)) + ids for ids in prompt_ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=self.device)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=self.config)
        answers = [self._decode(row[width:].tolist()) for row in out]
        k = self.config.num_return_sequences
        return [answers[i * k : (i + 1) * k] for i in range(len(prompt_ids))]

    def _decode(self, tokens: list[int]) -> tuple[str, bool]:
        stop = next((i for i, t in enumerate(tokens) if t in self.eos), None)
        text = self.tokenizer.decode(tokens[:stop], skip_special_tokens=True)
        return text.strip(), stop is not None


class VllmSampler:
    """vLLM on this rank's GPU; one seed per prompt (so batching cannot change an answer)."""

    def __init__(self, args, tokenizer, local_rank: int):
        from vllm import LLM, SamplingParams

        # on the one GPU pin_gpu left visible; the dtype resolved as for transformers (vLLM's own "auto"
        # would take the checkpoint's); explicit SamplingParams: vLLM adds the model's eos ids, nothing else
        self.llm = LLM(model=args.model, seed=args.seed, dtype=resolve_dtype(args.dtype))
        self.params, self.args = SamplingParams, args

    def sample(self, prompt_ids: list[list[int]], seed: int) -> list[list[tuple[str, bool]]]:
        a = self.args
        params = [self.params(n=a.num_samples, temperature=a.temperature, top_p=a.top_p, max_tokens=a.max_new_tokens,
                              seed=(seed + i) % 2**31) for i in range(len(prompt_ids))]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        return [[(o.text.strip(), o.finish_reason == "stop") for o in out.outputs] for out in outputs]


def _settings(args, prompts: list[dict], template) -> dict:
    """What the answers depend on: a resume must match every entry. ``backend`` and ``dtype`` as
    resolved on this machine; the chat template by its text (a template file may change)."""
    ids = hashlib.sha256("".join(p["prompt_id"] for p in prompts).encode()).hexdigest()
    keys = ("model", "num_samples", "temperature", "top_p", "max_new_tokens", "seed", "batch_size",
            "auto_insert_empty_system_msg")
    return {**{k: getattr(args, k) for k in keys}, "backend": pick_backend(args.backend),
            "dtype": resolve_dtype(args.dtype), "prompts": len(prompts), "prompt_ids_sha256": ids,
            "chat_template_sha256": hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()}


def _check(args) -> None:
    if args.num_samples < 2:
        raise DataError(f"--num_samples {args.num_samples}: preference pairs need at least 2 answers per prompt")
    if args.temperature <= 0:
        raise DataError(f"--temperature {args.temperature}: sampling needs a temperature > 0 "
                        f"(greedy decoding gives {args.num_samples} identical answers)")
    if not 0 < args.top_p <= 1:
        raise DataError(f"--top_p {args.top_p}: must be in (0, 1]")


def run(args) -> Path:
    """Generate this rank's share; merge when every unit is on disk. Returns the output path."""
    from transformers import AutoTokenizer

    _check(args)
    rank, world, local_rank = rank_and_world()
    local_rank = pin_gpu(local_rank, world)
    prompts = load_prompts(args.prompts, args.limit)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.chat_template:
        tokenizer.chat_template = Path(args.chat_template).read_text() if os.path.isfile(args.chat_template) \
            else args.chat_template
    prompt_ids = [encode_prompt(tokenizer, render_generation_prompt(tokenizer, p["messages"],
                                                                    args.auto_insert_empty_system_msg))
                  for p in prompts]
    out = Path(args.out)
    job = Job(out / "generations.parts", _settings(args, prompts, tokenizer.chat_template), out / OUTPUT, "generate")
    batches = length_batches([len(ids) for ids in prompt_ids], [p["prompt_id"] for p in prompts], args.batch_size)
    todo = job.todo(len(batches), rank, world)
    print(f"generate: rank {rank}/{world}: {len(prompts)} prompts in {len(batches)} batches, "
          f"{len(todo)} to do here", flush=True)
    if todo:
        sampler = (VllmSampler if job.settings["backend"] == "vllm" else TransformersSampler)(args, tokenizer,
                                                                                               local_rank)
        for done, unit in enumerate(todo, 1):
            start, members = time.perf_counter(), batches[unit]
            ids = [prompts[i]["prompt_id"] for i in members]
            answers = sampler.sample([prompt_ids[i] for i in members], unit_seed(args.seed, ids))
            job.write_unit(unit, [{**prompts[i], "all_generated_responses": [a for a, _ in ans],
                                   "all_finished": [f for _, f in ans]} for i, ans in zip(members, answers)])
            print(f"generate: rank {rank}: batch {unit} ({len(members)} prompts) in "
                  f"{time.perf_counter() - start:.1f} s [{done}/{len(todo)}]", flush=True)
            if os.environ.get(EXIT_AFTER_UNITS) == str(done):
                os.kill(os.getpid(), signal.SIGKILL)
    if not job.complete(len(batches)):
        print(f"generate: rank {rank} done; the last rank to finish writes {out / OUTPUT}", flush=True)
        return out / OUTPUT
    rows = sorted(job.read_units(len(batches)), key=lambda r: r["prompt_id"])
    if [r["prompt_id"] for r in rows] != [p["prompt_id"] for p in prompts]:
        raise DataError(f"{job.units}: the unit files do not hold each prompt exactly once; delete {job.root} "
                        f"and rerun")
    write_jsonl(out / OUTPUT, rows)
    print(f"generate: wrote {len(rows)} prompts x {args.num_samples} answers to {out / OUTPUT}", flush=True)
    return out / OUTPUT


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="simpo-ds generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="policy: a Hugging Face model directory or id")
    p.add_argument("--prompts", required=True, help="a jsonl/json/parquet file, a directory, or hub/name:split")
    p.add_argument("--out", required=True, help="output directory (rerun with the same settings to resume)")
    p.add_argument("--num_samples", type=int, default=5)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--max_new_tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--batch_size", type=int, default=16, help="prompts per batch (each gives num_samples rows)")
    p.add_argument("--backend", choices=("auto", "transformers", "vllm"), default="auto")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--auto_insert_empty_system_msg", type=parse_bool, default=True)
    p.add_argument("--chat_template", default=None, help="a jinja template (or a file) replacing the tokenizer's")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts (by prompt_id)")
    return p


def main(argv: list[str] | None = None) -> int:
    return command("generate", parser, run, argv)
