"""``StreamedTensor``: one parameter whose device storage can be freed and
refilled from a copy in host memory, with nothing stale ever read back.

Mechanism (the one FSDP uses for sharded weights): the parameter keeps its
tensor object, and its storage is resized to 0 bytes when evicted and back
when fetched, then filled from the host master through ``.data`` (which does
not bump autograd's version counter), so autograd's saved references to it
see the refilled bytes. Why a module of its own: this is the per-tensor
mechanism, independent of the schedule in ``slimfit.offload.streaming`` that decides
which units are on the device when.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["StreamedTensor"]


class StreamedTensor:
    """One streamed parameter: its host master and residency.

    Args:
        param: the parameter, on its training device (resident).
        name: its qualified name, for messages and state dicts.
        pin: allocate the master in page-locked memory (CUDA only).
    """

    __slots__ = ("param", "name", "master", "nbytes", "resident", "version", "trained", "written")

    def __init__(self, param: nn.Parameter, name: str, pin: bool):
        if not param.untyped_storage().resizable():
            # e.g. memory-mapped from a safetensors file: give the weight its
            # own storage (one copy now) so eviction can free it
            param.data = param.detach().clone()
        self.master = torch.empty(param.shape, dtype=param.dtype, device="cpu", pin_memory=pin)
        self.master.copy_(param.detach())  # a one-off D2H of every streamed weight
        self.param, self.name = param, name
        self.nbytes = param.untyped_storage().nbytes()
        self.resident = True
        self.version = param._version  # device bytes == master bytes at this version
        # seen requiring grad since the master was written: an optimizer may have
        # changed it without bumping the version (bitsandbytes writes raw pointers)
        self.trained = False
        self.written: Any = None  # CUDA event of the last write-back into master

    def fetch(self, stream: Any = None) -> None:
        """Refill the device storage from the master; asynchronous on a CUDA
        ``stream`` (the caller is inside ``torch.cuda.stream(stream)``)."""
        if stream is not None and self.written is not None:
            stream.wait_event(self.written)  # the master's last write-back landed
        self.param.untyped_storage().resize_(self.nbytes)
        self.param.data.copy_(self.master, non_blocking=stream is not None)  # H2D
        self.resident = True

    def evict(self, cuda: bool) -> bool:
        """Free the device storage, writing the weight back to its master first
        if it changed since the last write-back. Returns whether it wrote back."""
        p = self.param
        changed = self.trained or p._version != self.version  # trained or loaded since
        if changed:
            self.master.copy_(p.detach(), non_blocking=cuda)  # D2H, compute stream
            if cuda:
                self.written = self.written or torch.cuda.Event()  # one per tensor, re-recorded
                self.written.record(torch.cuda.current_stream())
            self.version, self.trained = p._version, False
        if cuda:  # freeing waits for the compute stream's use of it
            p.data.record_stream(torch.cuda.current_stream())
        p.untyped_storage().resize_(0)
        self.resident = False
        return changed
