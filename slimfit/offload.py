"""Offloading for SlimFit: the optimizer state of frozen units lives in host
memory, and saved activations can be moved to host memory too (copies on a
side stream, overlapped with compute).

Why: freezing removes gradients and dynamic activations, but AdamW keeps 8
bytes per parameter for every tensor ever trained, resident on the GPU even
while the tensor is frozen (section 3 of the method notes). A unit frozen in
this step does not need its state until the scheduler trains it again, so
:class:`OptimizerStateOffloader` moves that state to (pinned) host memory right
after the freezing decision and brings the state of the units to be trained
back on a side CUDA stream, overlapping the copy with forward and backward;
``before_optimizer_step`` makes the compute stream wait for it. The optimizer
reads exactly the tensors it wrote, so the update is bit-exact.

The state stays inside ``optimizer.state`` (host tensors in place of device
ones), so ``optimizer.state_dict()`` and Lightning checkpoints stay complete.
On a machine without CUDA the copies are synchronous host-to-host copies: the
bookkeeping and exactness are the same, the memory moved is not.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from slimfit.storage import is_parameter_or_view, storage_identity, storage_key

__all__ = ["ActivationOffloader", "OptimizerStateOffloader", "activation_offload"]


class OptimizerStateOffloader:
    """Keep the optimizer state of frozen units in host memory.

    Args:
        optimizer: the optimizer (any: AdamW, SGD momentum, bitsandbytes 8-bit).
        units: per unit, its parameters (``LayerFreezer.units[i].params``).
        pin_memory: page-locked host buffers (default: when CUDA is available),
            needed for asynchronous copies.

    Example:
        >>> lin = nn.Linear(4, 4)
        >>> opt = torch.optim.AdamW(lin.parameters())
        >>> lin(torch.randn(2, 4)).sum().backward(); opt.step()
        >>> off = OptimizerStateOffloader(opt, [[lin.weight], [lin.bias]])
        >>> off.sync(frozen=[0])
        >>> off.offloaded_units
        {0}
    """

    def __init__(self, optimizer: torch.optim.Optimizer, units: Sequence[Sequence[nn.Parameter]],
                 pin_memory: bool | None = None):
        self.optimizer = optimizer
        self.units = [tuple(u) for u in units]
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.offloaded_units: set[int] = set()
        self._host_keys: set = set()
        self._stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self._pending = False
        self.bytes_moved = 0

    # -- the per-step protocol ------------------------------------------------
    def sync(self, frozen: Sequence[int]) -> None:
        """Call right after the freezing decision of a step is applied: offload
        the state of newly frozen units, prefetch that of units to be trained."""
        fz = set(int(i) for i in frozen)
        for i in sorted(fz - self.offloaded_units):
            self._move_unit(i, to_host=True)
        for i in sorted(self.offloaded_units - fz):
            self._move_unit(i, to_host=False)

    def before_optimizer_step(self) -> None:
        """Make the compute stream wait for the prefetch copies (CUDA)."""
        if self._stream is not None and self._pending:
            torch.cuda.current_stream().wait_stream(self._stream)
            self._pending = False

    def synchronize(self) -> None:
        """Wait for every copy in flight (before host state is read, e.g. a checkpoint)."""
        if self._stream is not None:
            self._stream.synchronize()
        self._pending = False

    def restore_all(self) -> None:
        """Bring every state back to its parameter's device (end of training)."""
        for i in sorted(self.offloaded_units):
            self._move_unit(i, to_host=False)
        self.synchronize()

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
    def host_storage_keys(self) -> set:
        """Storage keys of the state tensors currently held in host memory (for the ledger)."""
        return set(self._host_keys)

    def host_bytes(self) -> int:
        total = 0
        for i in self.offloaded_units:
            for p in self.units[i]:
                for v in self.optimizer.state.get(p, {}).values():
                    if torch.is_tensor(v) and v.numel() > 1:
                        total += v.numel() * v.element_size()
        return total


class _Host:
    """What autograd stores for one offloaded saved tensor."""

    __slots__ = ("device", "host", "copied")

    def __init__(self, device: torch.device, host: torch.Tensor, copied: Any):
        self.device, self.host, self.copied = device, host, copied


class ActivationOffloader:
    """Save tensors for backward in host memory, the copies overlapped with compute.

    ``torch.autograd.graph.save_on_cpu`` copies each saved tensor with a
    blocking ``copy_``: the host waits for the GPU at every save, and it copies
    the weights a Linear saves too (every step, for nothing). Here each
    device-to-host copy is queued on a side CUDA stream after the op that
    produced the tensor (the compute stream runs on); the device tensor is
    recorded on that stream so its memory is reused only once the copy ran;
    backward waits for the copy's event, then copies back on the compute
    stream. Parameters (and views of them) and the buffers of ``model`` stay
    where they are (stored by reference, as without hooks), and so do tensors
    under ``min_bytes``.

    The ledger, entered inside or outside this context, counts nothing of what
    moved (the device holds it only until the copy ran). Hooks inside (SlimFit
    compression, weight streaming) hand their compressed pieces here, so
    compressed bytes move.
    Without CUDA, tensors stay put unless ``force_host_copy`` (tests: the same
    bookkeeping with host-to-host copies).

    Args:
        model: whose buffers are not copied either (parameters never are).
        pin_memory: page-locked host buffers (needed for asynchronous copies).
        min_bytes: smaller saved tensors are kept on the device (default 64 KiB:
            a copy, a pinned buffer and an event per tiny tensor cost more
            than the bytes they free).
        force_host_copy: copy CPU tensors too (testing the path without a GPU).

    Example:
        >>> lin = nn.Linear(4, 4)
        >>> with ActivationOffloader(lin, min_bytes=0, force_host_copy=True, pin_memory=False) as off:
        ...     y = torch.relu(lin(torch.randn(2, 4, requires_grad=True))).sum()
        >>> y.backward(); off.copies > 0
        True
    """

    def __init__(self, model: nn.Module | None = None, *, pin_memory: bool | None = None,
                 min_bytes: int = 1 << 16, force_host_copy: bool = False):
        if isinstance(min_bytes, bool) or not isinstance(min_bytes, int) or min_bytes < 0:
            raise ValueError(f"min_bytes must be an int >= 0, got {min_bytes!r}.")
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.min_bytes = min_bytes
        self.force = force_host_copy
        # parameters are recognised by type in pack; buffers need their storages
        self._skip = {storage_identity(b) for b in model.buffers()} if model is not None else set()
        self._stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self._hooks: Any = None
        self.copies = 0
        self.bytes_moved = 0

    def __enter__(self) -> "ActivationOffloader":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._hooks = None

    def pack(self, t: torch.Tensor) -> Any:
        nbytes = t.numel() * t.element_size()
        if (not t.is_cuda and not self.force) or nbytes < self.min_bytes or t.layout != torch.strided \
                or is_parameter_or_view(t) or storage_identity(t) in self._skip:
            return t.detach()  # kept by reference; detach: an output must not hold its grad_fn
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self.pin_memory)
        copied = None
        if t.is_cuda:
            compute = torch.cuda.current_stream(t.device)
            self._stream.wait_stream(compute)  # after the op that wrote t
            with torch.cuda.stream(self._stream):
                host.copy_(t, non_blocking=True)  # D2H, overlapped with the next ops
            t.record_stream(self._stream)  # t's memory is reused only after the copy
            copied = torch.cuda.Event()
            copied.record(self._stream)
        else:
            host.copy_(t)
        self.copies += 1
        self.bytes_moved += nbytes
        return _Host(t.device, host, copied)

    @staticmethod
    def unpack(obj: Any) -> torch.Tensor:
        if not isinstance(obj, _Host):
            return obj
        if obj.copied is not None:
            torch.cuda.current_stream(obj.device).wait_event(obj.copied)
            return obj.host.to(obj.device, non_blocking=True)  # H2D on the compute stream
        return obj.host.clone() if obj.device.type == "cpu" else obj.host.to(obj.device)


@contextlib.contextmanager
def activation_offload(model: nn.Module | None = None, pin_memory: bool = True) -> Iterator[None]:
    """Save tensors for backward in host memory with overlapped copies
    (:class:`ActivationOffloader`); ``model``'s weights are not copied.

    SlimFit's compression scopes forward what they store to the hooks active
    outside them, so under this context compressed activations are what is
    copied to the host. Without CUDA it is a no-op (nothing to move).
    """
    if not torch.cuda.is_available():
        yield
        return
    with ActivationOffloader(model, pin_memory=pin_memory):
        yield
