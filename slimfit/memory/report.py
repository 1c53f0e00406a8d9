"""The memory report of one training step and its tables: the four categories
(parameters, gradients, optimizer state, peak saved activations), their split
over modules, and the CUDA allocator's peak beside them.

Why a module of its own: the ledger (``slimfit.memory.ledger``) fills a
:class:`MemoryReport`, while the callbacks, the planner, the benchmarks and
the file writers only read one; they import these dataclasses and
:func:`format_bytes` without the measuring code. Plain Python and PyTorch.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterator

from torch import nn

__all__ = ["CATEGORIES", "ROOT_NAME", "CudaPeak", "MemoryReport", "ModuleBytes", "format_bytes",
           "report_modules"]

#: The four categories that make up total training memory, in report order.
CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations")

#: The name a report gives the model itself (its own parameters, tensors saved
#: outside any submodule's forward).
ROOT_NAME = "(model)"


def report_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` with the model itself named :data:`ROOT_NAME`."""
    for name, mod in model.named_modules():
        yield (name or ROOT_NAME), mod


def format_bytes(n: float) -> str:
    """Human-readable binary size, e.g. ``format_bytes(3 * 2**20) == '3.00 MiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


@dataclasses.dataclass
class ModuleBytes:
    """Bytes owned by one module (its direct parameters, not its children's)."""

    parameters: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    activations: int = 0

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state + self.activations

    def __iadd__(self, other: "ModuleBytes") -> "ModuleBytes":
        for c in CATEGORIES:
            setattr(self, c, getattr(self, c) + getattr(other, c))
        return self


@dataclasses.dataclass(frozen=True)
class CudaPeak:
    """What the CUDA caching allocator saw during the measured step."""

    max_allocated: int
    max_reserved: int
    alloc_retries: int
    ooms: int


@dataclasses.dataclass
class MemoryReport:
    """The ledger's result for one training step. All sizes are bytes."""

    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    buffers: int = 0
    per_module: dict[str, ModuleBytes] = dataclasses.field(default_factory=dict)
    cuda: CudaPeak | None = None
    #: optimizer state held in host memory (offloaded); not part of ``total``
    offloaded_optimizer_state: int = 0
    #: host master copies of streamed weights (``slimfit.offload.streaming``); not part of ``total``
    offloaded_parameters: int = 0

    @property
    def total(self) -> int:
        """Parameters + gradients + optimizer state + peak saved activations."""
        return self.parameters + self.gradients + self.optimizer_state + self.activations

    def scalars(self, prefix: str = "memory/") -> dict[str, float]:
        """Flat ``{name: bytes}`` for loggers (CUDA figures only when present)."""
        out = {f"{prefix}{c}": float(getattr(self, c)) for c in CATEGORIES}
        out[f"{prefix}total"] = float(self.total)
        if self.offloaded_optimizer_state:
            out[f"{prefix}offloaded_optimizer_state"] = float(self.offloaded_optimizer_state)
        if self.offloaded_parameters:
            out[f"{prefix}offloaded_parameters"] = float(self.offloaded_parameters)
        if self.cuda is not None:
            out[f"{prefix}cuda_max_allocated"] = float(self.cuda.max_allocated)
            out[f"{prefix}cuda_max_reserved"] = float(self.cuda.max_reserved)
            out[f"{prefix}cuda_alloc_retries"] = float(self.cuda.alloc_retries)
        return out

    def grouped(self, depth: int | None = None) -> dict[str, ModuleBytes]:
        """Per-module bytes summed up to the first ``depth`` name components.

        ``depth=None`` keeps every module; ``depth=3`` folds
        ``bert.encoder.layer.0.attention.self.query`` into ``bert.encoder.layer``
        ... use ``depth=4`` to see one row per BERT layer.
        """
        if depth is not None and depth < 1:
            raise ValueError(f"depth must be >= 1 or None, got {depth!r}")
        out: dict[str, ModuleBytes] = collections.OrderedDict()
        for name, mb in self.per_module.items():
            key = name if depth is None or name == ROOT_NAME else ".".join(name.split(".")[:depth])
            out.setdefault(key, ModuleBytes())
            out[key] += mb
        return out

    def summary_table(self, title: str = "") -> str:
        """Markdown table of the four categories and their total."""
        rows = [("parameters", self.parameters), ("gradients", self.gradients),
                ("optimizer state", self.optimizer_state),
                ("activations (peak saved)", self.activations), ("**total**", self.total)]
        if self.offloaded_optimizer_state:
            rows.append(("optimizer state in host memory (not in total)",
                         self.offloaded_optimizer_state))
        if self.offloaded_parameters:
            rows.append(("streamed weights' host copies (not in total)", self.offloaded_parameters))
        if self.cuda is not None:
            rows += [("cuda max_memory_allocated", self.cuda.max_allocated),
                     ("cuda reserved peak", self.cuda.max_reserved)]
        lines = [f"### {title}"] if title else []
        lines += ["| category | bytes | size |", "|---|---:|---:|"]
        lines += [f"| {k} | {v} | {format_bytes(v)} |" for k, v in rows]
        if self.cuda is not None:
            lines.append(f"| cuda alloc retries | {self.cuda.alloc_retries} | |")
        return "\n".join(lines)

    def module_table(self, depth: int | None = None) -> str:
        """Markdown table, one row per (grouped) module, sizes in MiB."""
        head = "| module | params MiB | grads MiB | optim MiB | activations MiB | total MiB |"
        lines = [head, "|---|---:|---:|---:|---:|---:|"]
        for name, mb in self.grouped(depth).items():
            cells = [getattr(mb, c) / 2**20 for c in CATEGORIES] + [mb.total / 2**20]
            lines.append(f"| {name} | " + " | ".join(f"{x:.2f}" for x in cells) + " |")
        return "\n".join(lines)

    def module_rows(self, depth: int | None = None) -> list[dict[str, Any]]:
        """Per-module rows as plain dicts (for CSV writers and W&B tables)."""
        return [{"module": n, **{c: getattr(mb, c) for c in CATEGORIES}, "total": mb.total}
                for n, mb in self.grouped(depth).items()]
