"""``SavedTensorTracker``: the live bytes of the tensors autograd saves for
backward during a step, their peak, and how that peak splits over modules.

Mechanism: ``torch.autograd.graph.saved_tensors_hooks``. A saved tensor is
live from its pack until autograd drops it after its node's backward; each is
attributed to the innermost module whose forward was running when it was
saved, and counted once per storage (two views of one storage count once).
Parameter and buffer storages are excluded: the ledger counts them apart.
Why a module of its own: the tracker is the one piece of the ledger that
hooks into autograd, and it must compose with SlimFit's own saved-tensor hooks
(compression, offload, streaming; ``slimfit.hooks``) in any nesting.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Any, Callable

import torch
from torch import nn

from slimfit.errors import LedgerError
from slimfit.hooks import top_saved_tensors_hooks
from slimfit.memory.report import ROOT_NAME, report_modules
from slimfit.storage import is_parameter_or_view, storage_identity, storage_key

__all__ = ["SavedTensorTracker"]


class _Saved:
    """What the pack hook hands to autograd: the tensor plus a release callback.

    Autograd drops it when the node's saved variables are freed (after that
    node's backward, or when the graph is discarded); ``__del__`` then releases
    the storage's reference in the tracker.
    """

    __slots__ = ("tensor", "key", "tracker", "__weakref__")

    def __init__(self, tensor: torch.Tensor, key: Any, tracker: "SavedTensorTracker"):
        self.tensor = tensor
        self.key = key
        self.tracker = tracker

    def __del__(self):
        self.tracker._release(self.key)


class _Passed:
    """A saved tensor the tracker does not count: a parameter or buffer, or one
    the hooks outside it moved off the device (activation offload)."""

    __slots__ = ("packed",)

    def __init__(self, packed: Any):
        self.packed = packed


class SavedTensorTracker:
    """Counts the live bytes of tensors saved for backward, with their peak.

    Use as a context manager around forward (and backward); the module hooks
    and the saved-tensor hooks exist only inside it, so a model outside a
    measurement pays nothing. ``peak`` is the maximum over the context of the
    bytes of distinct storages held by autograd; ``peak_by_module`` is how that
    peak splits over the modules that saved them.

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> with SavedTensorTracker(m) as tr:
        ...     m(torch.randn(3, 4)).sum().backward()
        >>> tr.peak > 0
        True
    """

    def __init__(self, model: nn.Module, top: int = 0):
        self.model = model
        self.peak = 0
        self.live = 0
        self.peak_by_module: dict[str, int] = {}
        #: with ``top``: the largest storages live at the peak, ``(bytes, module,
        #: shape, dtype)`` of the tensor that first saved each, largest first
        self.peak_tensors: list[tuple[int, str, tuple, str]] = []
        self._top = top
        self._meta: dict[Any, tuple[tuple, str]] = {}
        self._refs: dict[Any, int] = {}
        self._sizes: dict[Any, int] = {}
        self._owner: dict[Any, str] = {}
        self._live_by_module: dict[str, int] = collections.defaultdict(int)
        self._snapshot_due = False
        self._stack: list[str] = []
        self._excluded: set = set()
        self._handles: list[Any] = []
        self._hooks_cm: contextlib.AbstractContextManager | None = None
        self._outer: tuple[Callable, Callable] | None = None

    # -- context -----------------------------------------------------------
    def __enter__(self) -> "SavedTensorTracker":
        if self._hooks_cm is not None:
            raise LedgerError("SavedTensorTracker is already active; it cannot be nested.")
        # Parameters and buffers are counted elsewhere; a Linear's saved
        # weight.t() is a view of the parameter's storage and maps to it here.
        # By StorageImpl identity, not address: a streamed weight's storage is
        # resized in place (slimfit.offload.streaming), and an activation may be allocated
        # at the address it just freed.
        self._excluded = {storage_identity(t) for t in self.model.parameters()}
        self._excluded |= {storage_identity(t) for t in self.model.buffers()}
        for name, mod in report_modules(self.model):
            self._handles.append(mod.register_forward_pre_hook(self._make_pre(name)))
            self._handles.append(mod.register_forward_hook(self._post, always_call=True))
        # hooks already active (activation offload entered first) keep working:
        # every saved tensor goes on to them, and what they move off the device
        # is not counted, whichever was entered first
        self._outer = top_saved_tensors_hooks()
        self._hooks_cm = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks_cm.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook (idempotent). Tensors already saved keep being tracked
        until autograd releases them, so a backward after ``close`` is still seen."""
        if self._hooks_cm is not None:
            self._hooks_cm.__exit__(None, None, None)
            self._hooks_cm = None
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.clear()

    # -- module attribution -------------------------------------------------
    def _make_pre(self, name: str) -> Callable:
        def pre(_mod, _args):
            self._stack.append(name)
        return pre

    def _post(self, _mod, _args, _out):
        if self._stack:
            self._stack.pop()

    # -- saved tensor hooks -------------------------------------------------
    def _pack(self, t: torch.Tensor) -> Any:
        packed = self._outer[0](t) if self._outer else t
        sid = storage_identity(t)
        # a parameter saved by reference costs nothing new: among them FSDP2's unsharded
        # (all-gathered) weights, which are parameters while their module runs
        if sid in self._excluded or is_parameter_or_view(t) or not torch.is_tensor(packed) \
                or storage_identity(packed) != sid:
            return _Passed(packed.detach() if packed is t else packed)
        key, nbytes = storage_key(t)
        n = self._refs.get(key, 0)
        self._refs[key] = n + 1
        if n == 0:
            owner = self._stack[-1] if self._stack else ROOT_NAME
            self._sizes[key] = nbytes
            self._owner[key] = owner
            if self._top:
                self._meta[key] = (tuple(t.shape), str(t.dtype).removeprefix("torch."))
            self.live += nbytes
            self._live_by_module[owner] += nbytes
            if self.live > self.peak:
                self.peak = self.live
                self._snapshot_due = True
        # detach: no cycle through grad_fn
        return _Saved(packed.detach() if packed is t else packed, key, self)

    def _unpack(self, obj: Any) -> torch.Tensor:
        inner = obj.packed if isinstance(obj, _Passed) else obj.tensor
        return self._outer[1](inner) if self._outer else inner

    def _release(self, key: Any) -> None:
        n = self._refs.get(key, 0) - 1
        if n > 0:
            self._refs[key] = n
            return
        if self._snapshot_due:  # the live set is at its peak: remember its split
            self._snapshot()
        self._refs.pop(key, None)
        self._meta.pop(key, None)
        nbytes = self._sizes.pop(key, 0)
        self.live -= nbytes
        self._live_by_module[self._owner.pop(key, ROOT_NAME)] -= nbytes

    def _snapshot(self) -> None:
        self.peak_by_module = {k: v for k, v in self._live_by_module.items() if v}
        if self._top:  # cost: a sort of the live storages, at each new peak only
            keys = sorted(self._sizes, key=self._sizes.__getitem__, reverse=True)[:self._top]
            self.peak_tensors = [(self._sizes[k], self._owner[k], *self._meta.get(k, ((), "?")))
                                 for k in keys]
        self._snapshot_due = False

    def finalize(self) -> None:
        """Freeze the peak's split if the peak was never followed by a release."""
        if self._snapshot_due:
            self._snapshot()
