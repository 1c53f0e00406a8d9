"""What weight streaming streams: its options (:class:`StreamConfig`), the
modules that are streamed as units, and which of their parameters can be
streamed at all.

Why a module of its own: these are the decisions a user checks before
training (which blocks, how many resident, which weights stay on the device
and why), and they are plain functions of the model; ``slimfit.offload.streaming`` holds
the mechanism that moves the weights during a step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from slimfit.errors import SelectionError, SlimFitError
from slimfit.selection import Pattern, iter_modules, select_modules, validate_pattern
from slimfit.storage import storage_identity

__all__ = ["StreamConfig", "default_stream_units", "select_stream_units", "streamable_parameters"]

#: Per unit: its name, its module and the ``(qualified_name, parameter)`` streamed.
UnitSpec = tuple[str, nn.Module, list[tuple[str, nn.Parameter]]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class StreamConfig:
    """Options of weight streaming.

    Attributes:
        units: the modules streamed as units, in execution order (regex full
            match or list of names); default: the blocks of the model's
            longest list of same-type modules (``encoder.layer.N``, ``blocks.N``).
        resident: k, the most units whose streamed weights are on the device
            at once (>= 1; counts the unit computing and those prefetched).
        prefetch: k', how many units ahead are fetched while one computes
            (0 <= k' < k; 0 fetches on demand, with no overlap; default
            ``min(1, k - 1)``).
        pin_memory: page-locked host masters (default: when CUDA is
            available); needed for copies that overlap compute.
    """

    units: Pattern | None = None
    resident: int = 2
    prefetch: int | None = None
    pin_memory: bool | None = None

    def __post_init__(self):
        validate_pattern(self.units, "StreamConfig.units")
        if self.prefetch is None and isinstance(self.resident, int):
            object.__setattr__(self, "prefetch", min(1, max(self.resident - 1, 0)))
        for name in ("resident", "prefetch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise SlimFitError(f"StreamConfig.{name} must be an int, got {v!r}.")
        if self.resident < 1:
            raise SlimFitError(f"StreamConfig.resident (k) must be >= 1, got {self.resident}: at "
                               "least the unit that computes must be on the device.")
        if not 0 <= self.prefetch < self.resident:
            raise SlimFitError(
                f"StreamConfig.prefetch (k') must be in [0, resident - 1] = [0, "
                f"{self.resident - 1}], got {self.prefetch}: the unit computing and the "
                "units prefetched must fit in the resident window. Raise resident or "
                "lower prefetch.")
        if self.pin_memory is not None and not isinstance(self.pin_memory, bool):
            raise SlimFitError(f"StreamConfig.pin_memory must be a bool or None, got "
                               f"{self.pin_memory!r}.")


def default_stream_units(model: nn.Module) -> list[str]:
    """Names of the transformer blocks of ``model``: the blocks of its longest
    ``nn.ModuleList``/``nn.Sequential`` whose children share one type and hold
    parameters, and of every other such list as long (an encoder-decoder's two
    stacks: T5's ``encoder.block`` and ``decoder.block``), in model order.

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 2), nn.ModuleList([nn.Linear(2, 2) for _ in range(3)]))
        >>> default_stream_units(m)
        ['1.0', '1.1', '1.2']
    """
    lists: list[list[str]] = []
    for name, mod in iter_modules(model, lambda m, _n: isinstance(m, (nn.ModuleList, nn.Sequential))):
        kids = list(mod.named_children())
        if len(kids) < 2 or len({type(c) for _, c in kids}) != 1:
            continue
        if not any(True for _ in kids[0][1].parameters()):
            continue
        lists.append([f"{name}.{k}" if name else k for k, _ in kids])
    longest = max((len(b) for b in lists), default=0)
    return [n for blocks in lists if len(blocks) == longest for n in blocks]


def select_stream_units(model: nn.Module, units: Pattern | None = None
                        ) -> list[tuple[str, nn.Module]]:
    """The modules streamed as units, in model order.

    Args:
        model: the model.
        units: ``StreamConfig.units``; ``None``: :func:`default_stream_units`.

    Raises:
        SelectionError: ``units`` matches no module, the model has no list of
            same-type blocks (with ``units=None``), or two units nest.
    """
    if units is None:
        names = default_stream_units(model)
        if not names:
            raise SelectionError(
                f"{type(model).__name__} has no list of same-type blocks to stream; "
                "name the units with StreamConfig(units=...) (a regex such as "
                r"'encoder\.layer\.\d+' or a list of module names).")
        modules = dict(model.named_modules())
        chosen = [(n, modules[n]) for n in names]
    else:
        chosen = select_modules(model, units, field="StreamConfig.units")
    for a, _ in chosen:
        for b, _ in chosen:
            if b.startswith(a + "."):
                raise SelectionError(f"stream units nest: {b!r} is inside {a!r}; name "
                                     "non-overlapping modules (one per block).")
    return chosen


def streamable_parameters(model: nn.Module, units: list[tuple[str, nn.Module]]
                          ) -> tuple[list[UnitSpec], list[str]]:
    """Per unit, the parameters that can be streamed; and those kept resident.

    A parameter shared with another module (tied weights), or sharing its
    storage with another tensor, or a view into a larger storage, stays on the
    device: evicting it would free memory something else still reads.

    Returns:
        ``([(unit_name, module, [(qualified_name, parameter)])], kept)`` where
        ``kept`` lists ``"name (why)"`` for every unit parameter not streamed.
    """
    owners: dict[int, int] = {}
    for _, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    storage_users: dict[Any, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        sid = storage_identity(t)
        storage_users[sid] = storage_users.get(sid, 0) + 1
    specs: list[UnitSpec] = []
    kept: list[str] = []
    for name, mod in units:
        params = []
        for pname, p in mod.named_parameters():
            full = f"{name}.{pname}"
            if owners.get(id(p), 0) > 1 or storage_users.get(storage_identity(p), 0) > 1:
                kept.append(f"{full} (shared with another module)")
            elif p.storage_offset() != 0 or not p.is_contiguous():
                kept.append(f"{full} (a view into a larger storage)")
            else:
                params.append((full, p))
        specs.append((name, mod, params))
    return specs, kept
