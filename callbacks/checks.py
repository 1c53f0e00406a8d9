"""Trainer setups SlimFit refuses, and small helpers shared by the callbacks.

Per-step freezing is only correct where every replica sees the same trainable
set and the wrapper tolerates parameters without gradients; these checks run
in ``setup``, before any training, and name the setting to change.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from slimfit.errors import UnsupportedSetupError

__all__ = ["check_strategy", "loss_of"]

_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAStrategy",
            "SingleDeviceXLAStrategy")


def check_strategy(strategy: Any) -> None:
    """Raise :class:`UnsupportedSetupError` unless per-step freezing is correct under it."""
    name = type(strategy).__name__
    if name in _SHARDED or not isinstance(strategy, (DDPStrategy, SingleDeviceStrategy)):
        raise UnsupportedSetupError(
            f"SlimFit does not support strategy {name}: sharded strategies fix the trainable set "
            "at initialisation (DeepSpeed) or need uniform requires_grad per unit (FSDP), so "
            "per-step freezing would fail or save nothing. Use a single device or "
            "strategy='ddp_find_unused_parameters_true'.")
    if isinstance(strategy, DDPStrategy):
        kw = getattr(strategy, "_ddp_kwargs", {})
        if not kw.get("find_unused_parameters", False):
            raise UnsupportedSetupError(
                "SlimFit under DDP needs find_unused_parameters=True (frozen layers produce no "
                "gradient, and DDP otherwise fails with 'Expected to have finished reduction'). "
                "Use Trainer(strategy='ddp_find_unused_parameters_true') (or "
                "'ddp_spawn_find_unused_parameters_true'), or "
                "DDPStrategy(find_unused_parameters=True).")
        if kw.get("static_graph", False):
            raise UnsupportedSetupError(
                "SlimFit changes the trainable set every step, which DDP's static_graph=True "
                "forbids ('training graph has changed'). Remove static_graph=True from DDPStrategy.")


def loss_of(out: Any):
    """The loss a ``training_step`` returned (a tensor or a dict with ``loss``)."""
    return out["loss"] if isinstance(out, dict) else out
