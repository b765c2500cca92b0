"""Ulysses sequence parallelism for packed rows (``sequence_parallel_size: N``): pairs too long for one
device, trained exactly.

Each group of N consecutive ranks shares ONE packed row; rank k of a group computes the contiguous
k-th 1/N of its tokens. Data parallelism runs over the ``world / N`` groups (the planner balances
pairs over groups; every rank of a group collates the same row, no collective ships data)::

    row (global)   [ p0 c0 | p0 r0 | p1 c1 | p1 r1 | pad ]      T padded to a multiple of N
    rank k holds   tokens [k·T/N, (k+1)·T/N)   input_ids, position_ids (global positions: RoPE exact)
    attention      q, k, v of the slice --all-to-all--> all T tokens of H/N heads --varlen attention over
                   the GLOBAL cu_seqlens--> --all-to-all--> the slice's tokens, all heads
    reducer        the answer labels whose PREDICTING position lies in the slice (a label at a slice edge
                   belongs to the rank holding the position before it); per-sequence sums are added over
                   the group with an identity backward (:func:`sum_over_group`)

The loss and metrics are then identical on a group's ranks and are counted once per group. The
gradient: each rank back-propagates the same loss; the identity backward hands every rank's partial
sums the true dL/d(sum), and the all-to-alls route the attention gradients back to the ranks that
computed q, k, v, so the group's gradient is the sum of its ranks' gradients. DeepSpeed is given NO
mpu: it averages over the whole world on every ZeRO stage, and the trainer's ``loss * world_size`` turns
that into the sum over all ranks = the sum over groups — right on ZeRO-1, 2 and 3 alike (with an mpu,
DeepSpeed 0.19.8 divides by world/N or by world depending on the stage).

The all-to-alls are ``all_to_all_single`` in a small autograd function (its backward is the same
exchange) on the group's process group — not ``torch.distributed.nn.functional.all_to_all``, whose gloo
path scatters from group-local ranks as if they were global and fails for any group but the first —
around the same cu_seqlens kernels packed rows use (``sdpa_varlen`` on CPU, ``varlen`` /
``flash_attention_2`` on CUDA). Heads: num_attention_heads % N == 0; key/value heads are repeated to
the query heads when num_key_value_heads % N != 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist

PREFIX = "ulysses_"


@dataclass
class SequenceParallel:
    """This rank's place: ``size`` ranks per group, ``rank`` within it, ``dp_rank`` of ``dp_size`` groups."""

    size: int
    rank: int
    dp_rank: int
    dp_size: int
    group: Optional[object] = None  # the group's torch.distributed process group


_ACTIVE: Optional[SequenceParallel] = None  # the attention functions need the group (one per process)


def make_groups(world_size: int, rank: int, size: int) -> SequenceParallel:
    """Create the ``world_size / size`` groups of consecutive ranks (every rank calls this)."""
    global _ACTIVE
    group = None
    if size > 1:
        for start in range(0, world_size, size):  # new_group is collective: every rank creates every group
            ranks = list(range(start, start + size))
            created = dist.new_group(ranks)
            if rank in ranks:
                group = created
    _ACTIVE = SequenceParallel(size, rank % size, rank // size, world_size // size, group)
    return _ACTIVE


# ---------------------------------------------------------------------------------------------
# the row: pad, slice
# ---------------------------------------------------------------------------------------------
def pad_row(batch: dict, multiple: int, pad_token_id: int) -> dict:
    """Append a padding segment so the row's length is a multiple of ``multiple``: its own sequence in
    ``cu_seqlens`` (attends only to itself), positions 0.., no labels; ``num_tokens`` stays the real count."""
    tokens = batch["input_ids"].shape[-1]
    pad = (-tokens) % multiple
    if pad == 0:
        return batch
    out = dict(batch)
    out["input_ids"] = torch.cat([batch["input_ids"], torch.full((1, pad), pad_token_id, dtype=torch.long)], dim=1)
    out["position_ids"] = torch.cat([batch["position_ids"], torch.arange(pad)[None]], dim=1)
    if "labels" in batch:
        out["labels"] = torch.cat([batch["labels"], torch.full((1, pad), -100, dtype=torch.long)], dim=1)
    out["cu_seqlens"] = torch.cat([batch["cu_seqlens"], torch.tensor([tokens + pad], dtype=torch.int32)])
    out["max_seqlen"] = max(int(batch["max_seqlen"]), pad)
    return out


def slice_row(batch: dict, sp: SequenceParallel) -> dict:
    """This rank's contiguous slice of a padded row: input_ids/position_ids [1, T/N], and the reducer
    index restricted to the predicting positions inside the slice (local indices). Everything
    per-sequence (seq_num_tokens, chosen_seq, ...) stays global."""
    tokens = batch["input_ids"].shape[-1]
    if tokens % sp.size:
        raise ValueError(f"a row of {tokens} tokens does not split into {sp.size} slices (pad_row first)")
    width = tokens // sp.size
    lo, hi = sp.rank * width, (sp.rank + 1) * width
    out = dict(batch)
    for key in ("input_ids", "position_ids", "labels"):
        if key in batch:
            out[key] = batch[key][:, lo:hi]
    mine = (batch["pred_positions"] >= lo) & (batch["pred_positions"] < hi)
    out["pred_positions"] = batch["pred_positions"][mine] - lo
    out["pred_labels"] = batch["pred_labels"][mine]
    out["pred_seq"] = batch["pred_seq"][mine]
    return out


# ---------------------------------------------------------------------------------------------
# reductions
# ---------------------------------------------------------------------------------------------
class _SumOverGroup(torch.autograd.Function):
    """all_reduce(SUM) over the group in forward; identity in backward (every rank's partial sum gets
    the gradient of the total, which every rank computes alike)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def sum_over_group(tensor: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """[S] partial per-sequence sums of this slice -> the row's sums, on every rank of the group."""
    return _SumOverGroup.apply(tensor, sp.group) if sp.size > 1 else tensor


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """x [N, ...]: slab j goes to group rank j; returns [N, ...] with slab i from group rank i. Its
    backward is the same exchange of the gradients (every slab has the same shape)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        dist.all_to_all_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = torch.empty_like(grad, memory_format=torch.contiguous_format)
        dist.all_to_all_single(out, grad.contiguous(), group=ctx.group)
        return out, None


def _gather_sequence(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """[1, H, T/N, d] (all heads, my tokens) -> [1, H/N, T, d] (my heads, all tokens)."""
    return torch.cat(_AllToAll.apply(torch.stack(x.chunk(sp.size, dim=1)), sp.group).unbind(0), dim=2)


def _scatter_sequence(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """[1, H/N, T, d] (my heads, all tokens) -> [1, H, T/N, d] (all heads, my tokens)."""
    return torch.cat(_AllToAll.apply(torch.stack(x.chunk(sp.size, dim=2)), sp.group).unbind(0), dim=1)


class _AsKernel:
    """The attention module as the kernel ``base_name`` sees it inside the wrapper: the module itself in
    every attribute (``is_causal``, ``layer_idx``, ``modules()``, ``isinstance``), except that
    ``config._attn_implementation`` is the kernel's own name. transformers' ``flash_attention_2`` forward
    loads its flash-attn functions by that config name on every call; the wrapper's name must not
    reach it (:func:`wrapper_name`)."""

    def __init__(self, module, base_name: str):
        self._module = module
        self.config = _ConfigAs(module.config, base_name)

    @property
    def __class__(self):  # isinstance / error messages see the model's attention class
        return type(self._module)

    def __getattr__(self, name):
        return getattr(self._module, name)


class _ConfigAs:
    """A model config as the kernel sees it: every attribute of ``config``, ``_attn_implementation`` = ``name``."""

    def __init__(self, config, name: str):
        self._config = config
        self._attn_implementation = name

    def __getattr__(self, name):
        return getattr(self._config, name)


def ulysses_attention(base_name: str):
    """An attention function (transformers' ``AttentionInterface`` signature) running ``base_name``
    (a cu_seqlens implementation) on all tokens of H/N heads between two all-to-alls.

    query [1, H, T/N, d], key/value [1, Hkv, T/N, d] (this rank's slice), kwargs ``cu_seq_lens_q/k`` and
    ``max_length_q/k`` of the WHOLE padded row (:func:`simpo_ds.attention.attention_kwargs` before
    :func:`slice_row`) -> ([1, T/N, H, d], None). The kernel gets [1, H/N, T, d] and exactly those kwargs:
    the gathered row is the row they describe (a kernel that derived its segments from the slice's
    ``position_ids`` instead would be wrong, so a call without them is refused)."""
    from simpo_ds.attention import check_packed_row_call

    def attention(module, query, key, value, attention_mask, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        check_packed_row_call(f"sequence-parallel {base_name}", attention_mask, kwargs)
        sp = _ACTIVE
        heads, kv_heads = query.shape[1], key.shape[1]
        if kv_heads % sp.size:  # GQA groups must not straddle ranks: give every query head its own kv
            key, value = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (key, value))
        q, k, v = (_gather_sequence(t, sp) for t in (query, key, value))
        kernel = ALL_ATTENTION_FUNCTIONS[base_name]
        out, _ = kernel(_AsKernel(module, base_name), q, k, v, None, **kwargs)  # [1, T, H/N, d]
        return _scatter_sequence(out.transpose(1, 2), sp).transpose(1, 2).contiguous(), None

    return attention


def wrapper_name(base_name: str) -> str:
    """The name the Ulysses wrapper of ``base_name`` is registered under: ``ulysses_`` + the kernel's name
    with "flash" spelled "fa" (``flash_attention_2`` -> ``ulysses_fa_attention_2``; ``sdpa_varlen`` ->
    ``ulysses_sdpa_varlen``). transformers reads "flash" anywhere in a model's attention name as "load
    flash-attn functions by this name" (at load, and in every flash call): a wrapper named
    ``ulysses_flash_attention_2`` fails with "Could not find the currently requested flash attention
    implementation". The kernel inside sees its own name (:class:`_AsKernel`)."""
    return PREFIX + base_name.replace("flash", "fa")


def register(base_name: str) -> str:
    """Register the Ulysses wrapper of ``base_name`` (no mask function: attention_mask stays None);
    returns its name (:func:`wrapper_name`), the model's ``attn_implementation`` under sequence parallelism."""
    from transformers import AttentionInterface

    name = wrapper_name(base_name)
    AttentionInterface.register(name, ulysses_attention(base_name))
    return name


def check_heads(config, size: int) -> None:
    """Raise ValueError naming ``sequence_parallel_size`` when the heads cannot be split N ways."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    if heads % size:
        raise ValueError(f"sequence_parallel_size={size}: num_attention_heads={heads} is not divisible by it "
                         "(Ulysses gives each rank heads/N heads)")
    if kv % size and size % kv:
        raise ValueError(f"sequence_parallel_size={size}: num_key_value_heads={kv} neither divides nor is divided by it")


# ---------------------------------------------------------------------------------------------
# memory knob for long slices: DeepSpeed's tiled MLP
# ---------------------------------------------------------------------------------------------
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def agreed_tiles(tokens: int, tokens_per_tile: int, device: torch.device) -> int:
    """ceil(tokens / tokens_per_tile), the largest over all ranks: under ZeRO-3 every rank must call the
    projections (and all-gather their weights) the same number of times."""
    tiles = torch.tensor([-(-tokens // tokens_per_tile)], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tiles, op=dist.ReduceOp.MAX)
    return max(int(tiles.item()), 1)


def tile_mlps(model: torch.nn.Module, tokens_per_tile: int) -> int:
    """Run every gated MLP of ``model`` (a module with gate_proj, up_proj and down_proj) over tiles of at
    most ``tokens_per_tile`` tokens with DeepSpeed's ``TiledMLP``: only the MLP input is kept for
    backward, which recomputes each tile (the [T, intermediate] activations of a long slice never exist
    at once). Exact: an MLP acts on each token alone. Returns how many MLPs were tiled."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    def tiled(module, plain, x):
        tiles = agreed_tiles(x.shape[-2], tokens_per_tile, x.device)
        return TiledMLP.apply(lambda _, part: plain(part), module, x, tiles, list(module.parameters()))

    count = 0
    for module in model.modules():
        if all(isinstance(getattr(module, name, None), torch.nn.Module) for name in MLP_PROJECTIONS):
            module.forward = partial(tiled, module, module.forward)
            count += 1
    return count
