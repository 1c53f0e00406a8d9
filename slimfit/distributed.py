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

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["agree", "is_rank_zero", "world_size"]


def world_size() -> int:
    """Processes in the default group (1 without ``torch.distributed``)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_rank_zero() -> bool:
    return world_size() == 1 or dist.get_rank() == 0


def agree(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (itself in a single process).

    NCCL moves objects through a device tensor: the current CUDA device is
    used, as ``torch.distributed`` requires.
    """
    if world_size() == 1:
        return obj
    box = [obj]
    device = None
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]
