"""``OptimizerStateOffloader``: the optimizer state of frozen units lives in
host memory while they stay frozen, or is released (a session part,
``SessionConfig.optimizer_state="host"`` or ``"release"``).

Why: freezing removes gradients and dynamic activations, but AdamW keeps 8
bytes per parameter for every tensor ever trained, resident on the GPU even
while the tensor is frozen (section 3 of the method notes). A unit frozen in
this step does not need its state until the scheduler trains it again, so the
offloader moves that state to (pinned) host memory right after the freezing
decision and brings the state of the units to be trained back on a side CUDA
stream, overlapping the copy with forward and backward;
``before_optimizer_step`` makes the compute stream wait for it. The optimizer
reads exactly the tensors it wrote, so the update is bit-exact.

The state stays inside ``optimizer.state`` (host tensors in place of device
ones), so ``optimizer.state_dict()`` and Lightning checkpoints stay complete.
On a machine without CUDA the copies are synchronous host-to-host copies: the
bookkeeping and exactness are the same, the memory moved is not.

``release`` (BAdam's choice, arXiv 2404.02827): the state of a unit is
dropped when it freezes, so the device holds state for the trained units
only and nothing is kept anywhere for the others; a unit that trains again
starts from fresh state (AdamW's step count and bias correction restart), so
the updates change: an accuracy choice, not an exact one.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from slimfit.parts import Context, MemoryAdjustment, Part, Step
from slimfit.storage import local, storage_key

__all__ = ["OptimizerStateOffloader"]


class OptimizerStateOffloader(Part):
    """Keep the optimizer state of frozen units in host memory.

    As a session part (``SessionConfig.offload_optimizer_state``) it takes the
    optimizer and the freezing units at ``attach`` and follows each step's
    frozen set; standalone, pass them here and call :meth:`sync` with the
    frozen unit indices after each freezing decision.

    Args:
        optimizer: the optimizer (any: AdamW, SGD momentum, bitsandbytes 8-bit).
        units: per unit, its parameters (``LayerFreezer.units[i].params``).
        pin_memory: page-locked host buffers (default: when CUDA is available),
            needed for asynchronous copies.
        release: drop the state of frozen units instead of moving it.

    Example:
        >>> lin = nn.Linear(4, 4)
        >>> opt = torch.optim.AdamW(lin.parameters())
        >>> lin(torch.randn(2, 4)).sum().backward(); opt.step()
        >>> off = OptimizerStateOffloader(opt, [[lin.weight], [lin.bias]])
        >>> off.sync(frozen=[0])
        >>> off.offloaded_units
        {0}
    """

    name = "optimizer_state_offload"

    def __init__(self, optimizer: torch.optim.Optimizer | None = None,
                 units: Sequence[Sequence[nn.Parameter]] = (), pin_memory: bool | None = None,
                 release: bool = False):
        self.optimizer = optimizer
        self.release = release
        self.bytes_released = 0
        self.units = [tuple(u) for u in units]
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.offloaded_units: set[int] = set()
        self._host_keys: set = set()
        self._stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self._pending = False
        self.bytes_moved = 0

    @classmethod
    def from_config(cls, model: nn.Module, config: Any) -> "OptimizerStateOffloader | None":
        if config.optimizer_state == "device":
            return None
        return cls(release=config.optimizer_state == "release")

    # -- the step protocol (slimfit.parts) ------------------------------------------
    def attach(self, ctx: Context) -> None:
        self.optimizer = ctx.optimizer
        self.units = [tuple(u.params) for u in ctx.units]
        self.offloaded_units.clear()
        self._host_keys.clear()

    def on_step_start(self, step: Step) -> None:
        self.sync(step.frozen)

    def before_optimizer_step(self, step: Step | None = None) -> None:
        """Make the compute stream wait for the prefetch copies (CUDA)."""
        if self._stream is not None and self._pending:
            torch.cuda.current_stream().wait_stream(self._stream)
            self._pending = False

    def detach(self) -> None:
        self.restore_all()  # the counters stay readable

    def synchronize(self) -> None:
        """Wait for every copy in flight (before host state is read, e.g. a checkpoint)."""
        if self._stream is not None:
            self._stream.synchronize()
        self._pending = False

    def describe(self) -> str:
        return ("optimizer state of frozen units: released (re-initialised when a unit trains "
                "again)" if self.release else "optimizer state of frozen units: in host memory, "
                "prefetched back before a unit trains (exact)")

    def memory_adjustment(self) -> MemoryAdjustment:
        return MemoryAdjustment(host_state_keys=frozenset(self._host_keys))

    # -- moving state ---------------------------------------------------------------
    def sync(self, frozen: Sequence[int]) -> None:
        """Right after the freezing decision of a step is applied: offload (or
        release) the state of newly frozen units, prefetch that of units to be
        trained."""
        fz = set(int(i) for i in frozen)
        if self.release:
            for i in fz:
                self._release_unit(i)
            return
        for i in sorted(fz - self.offloaded_units):
            self._move_unit(i, to_host=True)
        for i in sorted(self.offloaded_units - fz):
            self._move_unit(i, to_host=False)

    def restore_all(self) -> None:
        """Bring every state back to its parameter's device (end of training)."""
        for i in sorted(self.offloaded_units):
            self._move_unit(i, to_host=False)
        self.synchronize()

    def _release_unit(self, i: int) -> None:
        for p in self.units[i]:
            state = self.optimizer.state.pop(p, None)
            for v in (state or {}).values():
                if torch.is_tensor(v):
                    self.bytes_released += local(v).numel() * v.element_size()

    # -- moving one unit --------------------------------------------------------
    def _move_unit(self, i: int, to_host: bool) -> None:
        for p in self.units[i]:
            state = self.optimizer.state.get(p)
            if not state:
                continue  # never trained yet: nothing to move
            for k, v in list(state.items()):
                if torch.is_tensor(v) and v.numel() > 1:  # scalars (step) stay put
                    state[k] = self._to_host(v) if to_host else self._to_device(v, p.device)
        (self.offloaded_units.add if to_host else self.offloaded_units.discard)(i)

    def _to_host(self, v: torch.Tensor) -> torch.Tensor:
        if local(v) is not v:  # FSDP2: this rank's shard moves inside its DTensor (layout,
            local(v).data = self._to_host(local(v))  # identity and checkpoint format kept)
            return v
        host = torch.empty(v.shape, dtype=v.dtype, device="cpu", pin_memory=self.pin_memory)
        if v.is_cuda:
            # D2H on the side stream after the step that last wrote v; the
            # allocator must not reuse v's memory before the copy ran.
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                host.copy_(v, non_blocking=True)
            v.record_stream(self._stream)
            self._pending = True
        else:
            host.copy_(v)
        self._host_keys.add(storage_key(host)[0])
        self.bytes_moved += v.numel() * v.element_size()
        return host

    def _to_device(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        if local(host) is not host:
            local(host).data = self._to_device(local(host), device)
            return host
        self._host_keys.discard(storage_key(host)[0])
        self.bytes_moved += host.numel() * host.element_size()
        if device.type == "cuda":
            with torch.cuda.stream(self._stream):
                dev = host.to(device, non_blocking=True)
            dev.record_stream(torch.cuda.current_stream(device))
            self._pending = True
            return dev
        return host.clone()  # a distinct "device" tensor, so bookkeeping is identical on CPU

    # -- reporting ----------------------------------------------------------------
    def host_bytes(self) -> int:
        total = 0
        for i in self.offloaded_units:
            for p in self.units[i]:
                for v in self.optimizer.state.get(p, {}).values():
                    if torch.is_tensor(v) and v.numel() > 1:
                        total += local(v).numel() * v.element_size()
        return total

