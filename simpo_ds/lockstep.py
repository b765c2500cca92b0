"""Debug check that every rank makes the same sequence of module calls (``debug_lockstep: true``).

Under ZeRO-3 each call of a module with partitioned parameters all-gathers them, in forward and again
in the backward recomputation; a rank that calls a module more often than its peers pairs its gathers
with the wrong ones and the job crashes ("collective mismatch") or hangs (docs/design.md §4). The trainer
keeps ranks in lock-step by construction (same micro-batch count, lm_head chunk counts agreed from the
pack plan); this check proves it at run time and names the module when it does not hold::

    counter = CallCounter(policy)           # hooks every module that owns parameters
    ...forward / backward...
    counter.check("train step 3, micro-batch 2/4, forward")   # all ranks; raises LockstepError

A check is one all-gather of a [num_modules] int64 vector. Mismatches under ZeRO-1/2 (no per-module
gathers) are caught at the next check; under ZeRO-3 the planned lm_head chunk count is compared
BEFORE the forward (:func:`check_equal`), so the one data-dependent call count is caught before it
can hang. Enable with the config key or ``SIMPO_DS_DEBUG_LOCKSTEP=1``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

ENV_VAR = "SIMPO_DS_DEBUG_LOCKSTEP"


class LockstepError(RuntimeError):
    """Ranks made different sequences of module calls (or planned different chunk counts)."""


def enabled(config_value: bool) -> bool:
    """The config key, or ``SIMPO_DS_DEBUG_LOCKSTEP=1`` in the environment."""
    return bool(config_value) or os.environ.get(ENV_VAR, "") not in ("", "0", "false", "False")


def _gather(vector: torch.Tensor) -> torch.Tensor:
    """[n] int64 of this rank -> [world, n] (all ranks call)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return vector[None]
    out = [torch.empty_like(vector) for _ in range(dist.get_world_size())]
    dist.all_gather(out, vector)
    return torch.stack(out)


def check_equal(values: dict[str, int], where: str, device: torch.device | str = "cpu") -> None:
    """Raise :class:`LockstepError` naming the first key whose value differs between ranks."""
    names = list(values)
    per_rank = _gather(torch.tensor([values[n] for n in names], dtype=torch.int64, device=device)).cpu()
    differs = (per_rank != per_rank[0]).any(dim=0)
    if differs.any():
        i = int(differs.nonzero()[0])
        counts = ", ".join(f"rank {r}: {int(c)}" for r, c in enumerate(per_rank[:, i]))
        raise LockstepError(
            f"ranks are out of lock-step at {where}: {names[i]} differs ({counts}). Under ZeRO-3 every rank "
            "must call each partitioned module equally often; this run would crash or hang in a collective"
        )


class CallCounter:
    """Counts the calls of every module that owns parameters (forward and checkpoint recomputation)."""

    def __init__(self, model: torch.nn.Module, device: torch.device | str = "cpu"):
        owners = [(name or "<root>", m) for name, m in model.named_modules() if next(m.parameters(False), None) is not None]
        self.names = [name for name, _ in owners]
        self.counts = [0] * len(owners)
        self.device = device
        self.handles = [m.register_forward_pre_hook(self._hook(i)) for i, (_, m) in enumerate(owners)]

    def _hook(self, index: int):
        def count(_module, _inputs):
            self.counts[index] += 1

        return count

    def check(self, where: str) -> None:
        """All ranks: compare the calls since the last check, then start counting again."""
        counts = dict(zip((f"calls of module {n}" for n in self.names), self.counts))
        self.counts = [0] * len(self.names)
        check_equal(counts, where, self.device)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
