"""Saved-tensor hooks scoped to a module's forward, shared by compression and
weight streaming.

Why a shared base: PyTorch keeps one stack of saved-tensor hooks and calls
only the top pair. SlimFit pushes a pair while a module runs (a compressed
attention, a streamed block) and each pair hands what it does not keep to the
pair that was active outside it (the ledger, activation offload, another
SlimFit feature), so the features compose in any nesting. Scopes of one kind
chain past each other to the nearest hooks of another kind (a compressed
module inside a compressed module compresses once).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["ScopedHooks", "top_saved_tensors_hooks"]


def top_saved_tensors_hooks() -> tuple[Callable, Callable] | None:
    """The (pack, unpack) pair autograd would call now, or None."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False)
    except (AttributeError, RuntimeError):  # pragma: no cover - older torch
        return None


class ScopedHooks:
    """A pack/unpack pair pushed by a module's forward pre-hook and popped by its
    forward hook. Subclasses define ``pack``/``unpack`` and pass what they do not
    keep to :meth:`pack_outer` / :meth:`unpack_outer`."""

    outer: tuple[Callable, Callable] | None = None

    def pack(self, t: torch.Tensor) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def unpack(self, obj: Any) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def push(self) -> None:
        top = top_saved_tensors_hooks()
        owner = getattr(top[0], "__self__", None) if top else None
        # same kind outside: chain to what that one chains to
        self.outer = owner.outer if isinstance(owner, type(self)) else top
        torch._C._autograd._push_saved_tensors_default_hooks(self.pack, self.unpack)

    def pop(self) -> None:
        torch._C._autograd._pop_saved_tensors_default_hooks()

    def pack_outer(self, t: torch.Tensor) -> Any:
        """Hand ``t`` to the hooks outside; the pair is recorded with what they
        returned, because a scope can be re-entered under other outer hooks
        before this backward runs (non-reentrant checkpointing recomputes the
        forward inside its own hooks) and must unpack with the pair that packed."""
        outer = self.outer
        # detach: a saved output must not hold its own grad_fn (reference cycle)
        return (outer, outer[0](t)) if outer else (None, t.detach())

    @staticmethod
    def unpack_outer(obj: Any) -> torch.Tensor:
        outer, inner = obj
        return outer[1](inner) if outer else inner
