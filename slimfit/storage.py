"""Tensor and storage identity: which memory a tensor occupies, and whether it
is a parameter.

Why a module of its own: every saved tensor goes through these questions on
the hot pack paths of compression, activation offload and weight streaming,
and the memory ledger asks them when it counts bytes. Keeping them here lets
the features import three small functions instead of the measurement code.
Two views of one storage share its identity; a weight whose storage is resized
in place (weight streaming) keeps it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["is_parameter_or_view", "local", "storage_identity", "storage_key"]


def local(t: torch.Tensor) -> torch.Tensor:
    """What this process holds of ``t``: a sharded ``DTensor``'s local shard
    (FSDP2's parameters, gradients and optimizer state), else ``t`` itself."""
    inner = getattr(t, "_local_tensor", None)
    return inner if isinstance(inner, torch.Tensor) and type(t).__name__ == "DTensor" else t


def storage_key(t: torch.Tensor) -> tuple[Any, int]:
    """Identity and size of the memory a tensor occupies: ``(key, nbytes)``.

    Views share their base's storage, so they map to the same key; a
    ``DTensor`` counts its local shard (what this rank holds). Tensors without
    a plain storage (other subclasses) fall back to their own identity and
    ``nbytes``.

    Example:
        >>> x = torch.zeros(4, 4)
        >>> storage_key(x[1]) == storage_key(x), storage_key(x)[1]
        (True, 64)
    """
    t = local(t)
    try:
        st = t.untyped_storage()
        return (str(t.device), st.data_ptr()), st.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return ("id", id(t)), t.numel() * t.element_size()


def storage_identity(t: torch.Tensor) -> Any:
    """The StorageImpl a tensor views: stable while that storage lives, even when
    it is resized in place (weight streaming), unlike its data pointer."""
    t = local(t)
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, TypeError):
        return ("id", id(t))


def is_parameter_or_view(t: torch.Tensor) -> bool:
    """A parameter or a view of one (a Linear saves ``weight.t()``), whatever
    its storage is now (streaming may give a weight a new storage)."""
    return isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)
