"""Resuming a SlimFit run from a sharded (distributed) checkpoint under FSDP2.

Why this exists: Lightning's ``ModelParallelStrategy`` loads the optimizer with
torch's ``get_optimizer_state_dict``, which first gives every parameter that
requires a gradient a state (a zero-gradient step at lr 0) and then asks the
checkpoint for each of those states. A SlimFit checkpoint holds state only for
the units that have trained so far (a unit frozen since the start never had
any), so the load fails with "Missing key in checkpoint state_dict:
optimizer_0.state.<name>.step". While the checkpoint loads, the parameters
without a saved state are marked as not requiring gradients, so the optimizer
asks for exactly the states the checkpoint holds; the session sets every
``requires_grad`` itself when it starts (``on_train_start``).
"""

from __future__ import annotations

import contextlib
import pathlib
from typing import Any, Iterator

import torch

__all__ = ["load_only_saved_optimizer_state"]


def load_only_saved_optimizer_state(strategy: Any, module: torch.nn.Module) -> None:
    """Wrap ``strategy.load_checkpoint`` (once) so that a sharded checkpoint loads
    into an optimizer that expects only the states it holds."""
    load = strategy.load_checkpoint
    if getattr(load, "_slimfit_wrapped", False):
        return

    def load_checkpoint(checkpoint_path, *args, **kwargs):
        with _without_grad_where_no_state(module, pathlib.Path(checkpoint_path)):
            return load(checkpoint_path, *args, **kwargs)

    load_checkpoint._slimfit_wrapped = True  # type: ignore[attr-defined]
    strategy.load_checkpoint = load_checkpoint


@contextlib.contextmanager
def _without_grad_where_no_state(module: torch.nn.Module, path: pathlib.Path) -> Iterator[None]:
    if not path.is_dir():  # a consolidated single-file checkpoint loads its own way
        yield
        return
    from torch.distributed.checkpoint import FileSystemReader
    # reads only the index file of the checkpoint (names and shapes), no tensor data
    keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata.keys()
    prefix = "optimizer_0.state."  # then "<parameter name>.<state key>" (step, exp_avg ...)
    saved = {k[len(prefix):].rsplit(".", 1)[0] for k in keys if k.startswith(prefix)}
    changed = [p for name, p in module.named_parameters() if p.requires_grad and name not in saved]
    for p in changed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in changed:
            p.requires_grad_(True)
