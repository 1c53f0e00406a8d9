"""``ActivationOffloader``: tensors saved for backward kept in host memory
between the forward and the optimizer step, the copies overlapped with
compute (a session part, and a context manager on its own).

Why: on a GPU the saved activations are the largest part of a step that
freezing and compression leave; a host copy queued on a side stream right
after the op that produced a tensor frees the device memory for the rest of
the forward, at the cost of PCIe traffic that overlaps with compute. On a
machine without CUDA there is nothing to move: the part stays inactive
(``force_host_copy`` runs the same bookkeeping with host-to-host copies, for
tests).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimfit.parts import Context, Part, Step
from slimfit.storage import is_parameter_or_view, storage_identity

__all__ = ["ActivationOffloader"]


class _Host:
    """What autograd stores for one offloaded saved tensor."""

    __slots__ = ("device", "host", "copied")

    def __init__(self, device: torch.device, host: torch.Tensor, copied: Any):
        self.device, self.host, self.copied = device, host, copied


class ActivationOffloader(Part):
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

    name = "activation_offload"

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

    @classmethod
    def from_config(cls, model: nn.Module, config: Any) -> "ActivationOffloader | None":
        return cls(model) if config.offload_activations else None

    @property
    def active(self) -> bool:
        """Copies happen: CUDA is available (or ``force_host_copy``, tests)."""
        return self.force or torch.cuda.is_available()

    # -- the step protocol (slimfit.parts): open from the step's start to backward's end
    def on_step_start(self, step: Step) -> None:
        if self.active and self._hooks is None:
            self.__enter__()

    def before_optimizer_step(self, step: Step) -> None:
        if self._hooks is not None:
            self.__exit__(None, None, None)

    def detach(self) -> None:
        self.before_optimizer_step(None)

    # -- as a context manager
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
