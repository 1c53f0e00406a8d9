"""``CollectiveBytes``: the bytes a process hands to gradient collectives,
counted at the call, for comparing what freezing saves on the wire.

Why count and not estimate: under FSDP2 only parameters that have a gradient
are reduce-scattered, so freezing should cut communication in proportion to
the trained fraction; under DDP with ``find_unused_parameters=True`` the
buckets are all-reduced whole (unused gradients travel as zeros), so it
should not. Both claims are checked by counting what each engine actually
passes to ``torch.distributed``:

- FSDP2 (``fully_shard``) calls ``torch.distributed.reduce_scatter_single``
  for gradients and ``all_gather_single`` for weights (torch 2.6-2.14,
  ``torch.distributed.fsdp._fully_shard._fsdp_collectives``); inside the
  context those module functions are wrapped to add up their input bytes.
- DDP reduces in C++; :meth:`CollectiveBytes.ddp_hook` is a communication
  hook (``DistributedDataParallel.register_comm_hook``) that counts each
  bucket and then all-reduces it exactly as DDP's default does.

The counts are per process (what this rank sends into the collective:
the reduce-scatter's unsharded input, the all-gather's shard, the bucket).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist

__all__ = ["CollectiveBytes"]

_WRAPPED = {"reduce_scatter_single": "reduce_scatter", "all_gather_single": "all_gather"}


class CollectiveBytes:
    """Bytes per kind of collective, while :meth:`counting` is open.

    Example (one process: a gloo group of one)::

        counter = CollectiveBytes()
        with counter.counting():
            loss.backward()            # under fully_shard
        counter.bytes["reduce_scatter"]
    """

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {"reduce_scatter": 0, "all_gather": 0, "all_reduce": 0}
        self.calls: dict[str, int] = dict.fromkeys(self.bytes, 0)

    def reset(self) -> None:
        for k in self.bytes:
            self.bytes[k] = self.calls[k] = 0

    def _add(self, kind: str, t: torch.Tensor) -> None:
        self.bytes[kind] += t.numel() * t.element_size()
        self.calls[kind] += 1

    @contextlib.contextmanager
    def counting(self) -> Iterator["CollectiveBytes"]:
        """Count FSDP2's collectives inside the block (restored on exit)."""
        originals = {name: getattr(dist, name) for name in _WRAPPED if hasattr(dist, name)}

        def wrap(name: str, fn: Any) -> Any:
            def counted(*args: Any, **kwargs: Any) -> Any:
                src = kwargs.get("input", kwargs.get("input_tensor",
                                                     args[1] if len(args) > 1 else None))
                if torch.is_tensor(src):
                    self._add(_WRAPPED[name], src)
                return fn(*args, **kwargs)
            return counted

        for name, fn in originals.items():
            setattr(dist, name, wrap(name, fn))
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)

    def ddp_hook(self, state, bucket):  # unannotated: DDP checks real annotations, not strings
        """A DDP communication hook: counts the bucket (a ``dist.GradBucket``),
        then averages it over the ranks as DDP's default hook does
        (``model.register_comm_hook(None, counter.ddp_hook)``); returns the
        future of the all-reduced bucket."""
        buf = bucket.buffer()
        self._add("all_reduce", buf)
        group = state if state is not None else dist.group.WORLD
        fut = dist.all_reduce(buf.div_(dist.get_world_size(group)), group=group,
                              async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])
