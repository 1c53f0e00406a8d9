"""Old module paths, kept for one release (0.2): ``import slimfit.ledger`` still
works, with a ``DeprecationWarning`` naming the new path.

Why: until 0.1 the library was 29 flat modules; it is now grouped by idea
into subpackages (``slimfit.freezing``, ``slimfit.compression``,
``slimfit.offload``, ``slimfit.memory``, ``slimfit.planning``). A user's
``from slimfit.config import SlimFitConfig`` keeps running while they move to
``from slimfit import SlimFitConfig``; the aliases go in 0.3. One table,
:data:`MOVED`, installed as an import hook by ``slimfit/__init__.py``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__all__ = ["MOVED", "install"]

#: old module -> new module (every name the old one exported is in the new one,
#: except where the new module's docstring says what replaced it)
MOVED = {
    "slimfit.config": "slimfit.freezing.config",
    "slimfit.scheduler": "slimfit.freezing.scheduler",
    "slimfit.scores": "slimfit.freezing.scores",
    "slimfit.heads": "slimfit.freezing.heads",
    "slimfit.history": "slimfit.freezing.history",
    "slimfit.freezer": "slimfit.freezing.freezer",
    "slimfit.compress": "slimfit.compression.compressor",
    "slimfit.compress_config": "slimfit.compression.config",
    "slimfit.quantize": "slimfit.compression.quantize",
    "slimfit.detect": "slimfit.compression.detect",
    "slimfit.fused_attention": "slimfit.compression.fused_attention",
    "slimfit.frozen_conv": "slimfit.compression.frozen_conv",
    "slimfit.stream": "slimfit.offload.streaming",
    "slimfit.stream_config": "slimfit.offload.stream_config",
    "slimfit.streamed_tensor": "slimfit.offload.streamed_tensor",
    "slimfit.ledger": "slimfit.memory.ledger",
    "slimfit.tracker": "slimfit.memory.tracker",
    "slimfit.report": "slimfit.memory.report",
    "slimfit.memory_files": "slimfit.memory.files",
    "slimfit.planner": "slimfit.planning.planner",
    "slimfit.calibration": "slimfit.planning.calibration",
    "slimfit.accuracy_price": "slimfit.evidence",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old path to the new module object (the same module: one
    class identity, one state), warning once per old path."""

    def find_spec(self, name, path=None, target=None):
        if name in MOVED:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new} (or import from slimfit directly); the old "
                      "path is an alias until slimfit 0.3.", DeprecationWarning, stacklevel=4)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass  # the new module is already executed


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` (idempotent)."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())
