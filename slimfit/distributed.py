"""What every process of a multi-process run must agree on, in plain
``torch.distributed`` (any launcher: Lightning's DDP, ``torchrun``,
accelerate).

Why in the core: a layer frozen on one rank and trained on another trains
without error and drifts silently (Lightning #20340), and every entry point
(the Lightning callback, the Hugging Face Trainer callback) needs the same
guarantee. Rank 0's decision is broadcast, so every rank freezes the same
units whatever its local scores; the broadcast is one small pickled object
per optimizer step.
"""

from __future__ import annotations

import zlib
from typing import Any, Sequence

import torch
import torch.distributed as dist

from slimfit.errors import RanksDivergedError

__all__ = ["agree", "check_same_frozen", "check_same_units", "is_rank_zero", "world_size"]


def world_size() -> int:
    """Processes in the default group (1 without ``torch.distributed``)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_rank_zero() -> bool:
    return world_size() == 1 or dist.get_rank() == 0


def _device() -> torch.device | None:
    """Where NCCL needs a collective's tensors (the current CUDA device); None for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def agree(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (itself in a single process).

    NCCL moves objects through a device tensor: the current CUDA device is
    used, as ``torch.distributed`` requires.
    """
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_device())
    return box[0]


def check_same_units(names: Sequence[str]) -> None:
    """Check at start that every rank rotates the same candidate units, in the
    same order: rank 0's decisions are unit indices, so a rank built with other
    options (another ``include``/``exclude``, another model) would apply them to
    other tensors. Cost: one all-gather of two int64 per rank, once.

    Raises:
        RanksDivergedError: naming the ranks and a unit that differs.
    """
    _check_same(list(names), "at start: rank(s) {ranks} rotate other candidate units than rank 0",
                "Every rank must build the same model with the same SlimFit options.")


def check_same_frozen(step: int, frozen: Sequence[str]) -> None:
    """Check that every rank froze the units ``frozen`` (names) in ``step``.

    Rank 0's decision is broadcast, so ranks differ only when something else
    went wrong: code outside SlimFit changed ``requires_grad``, or a rank took
    a decision of its own (``begin_step(frozen=...)``). The check is what the
    model holds, not what was decided. Cost: one all-gather of two int64 per
    rank per step (a host sync on CUDA); the names are gathered only when the
    digests differ, to name the difference.

    Raises:
        RanksDivergedError: naming the step, the ranks and a unit that differs.
    """
    _check_same(sorted(frozen), f"step {step}: rank(s) {{ranks}} froze a different set of units "
                "than rank 0", "Their weights would drift apart. Every rank must take rank 0's "
                "decision (SlimFitSession.begin_step() without a frozen= argument), and nothing "
                "else may change requires_grad during the run.")


def _check_same(names: list[str], what: str, fix: str) -> None:
    n = world_size()
    if n == 1:
        return
    digest = zlib.crc32("\n".join(names).encode())  # the same in every process
    mine = torch.tensor([digest, len(names)], dtype=torch.int64, device=_device())
    every = [torch.empty_like(mine) for _ in range(n)]
    dist.all_gather(every, mine)
    values = [tuple(t.tolist()) for t in every]
    if len(set(values)) == 1:
        return
    gathered: list[Any] = [None] * n
    dist.all_gather_object(gathered, names)
    ranks = [r for r in range(n) if values[r] != values[0]]
    other = gathered[ranks[0]]
    diff = sorted(set(other).symmetric_difference(gathered[0]))
    raise RanksDivergedError(
        f"{what.format(ranks=ranks)} ({len(other)} vs {len(gathered[0])}; "
        f"e.g. {diff[:3] or 'the same names in another order'} differ). {fix}")
