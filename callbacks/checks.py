"""Trainer setups SlimFit refuses, and small helpers shared by the callbacks.

Per-step freezing is only correct where every replica sees the same trainable
set and the wrapper tolerates parameters without gradients; these checks run
in ``setup``, before any training, and name the setting to change.
"""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info

import slimfit
from slimfit import UnsupportedSetupError

__all__ = ["check_fit_start", "check_fsdp2", "check_single_process", "check_strategy", "is_fsdp2",
           "loss_of", "output_dir"]

#: strategies refused, with the reason and the supported alternative
_REFUSED = {
    "FSDPStrategy": (
        "FSDP1 either fails when frozen and trained tensors share a wrapped unit "
        "(use_orig_params=False: 'FlatParameter requires uniform requires_grad') or trains but "
        "saves no gradient memory (use_orig_params=True, pytorch #104690)"),
    "DeepSpeedStrategy": (
        "DeepSpeed ZeRO fixes the trainable set at initialize (DeepSpeed #5639), so per-step "
        "freezing would not apply"),
    "XLAStrategy": "XLA compiles one graph, so a trainable set that changes every step "
                   "recompiles every step",
}
_REFUSED["SingleDeviceXLAStrategy"] = _REFUSED["XLAStrategy"]
_FSDP2 = ("ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) with fully_shard "
          "applied in configure_model (FSDP2; docs/multi-node.md)")


def is_fsdp2(strategy: Any) -> bool:
    """Lightning's ``ModelParallelStrategy``: the model is sharded with FSDP2 in
    ``configure_model``, so SlimFit resolves its tensors after that, at train start."""
    return type(strategy).__name__ == "ModelParallelStrategy"


def check_strategy(strategy: Any) -> None:
    """Raise :class:`UnsupportedSetupError` unless per-step freezing is correct under it."""
    name = type(strategy).__name__
    if name in _REFUSED:
        raise UnsupportedSetupError(
            f"SlimFit does not support strategy {name}: {_REFUSED[name]}. Use {_FSDP2}, or "
            "DDP with strategy='ddp_find_unused_parameters_true'.")
    if is_fsdp2(strategy):
        return
    if not isinstance(strategy, (DDPStrategy, SingleDeviceStrategy)):
        raise UnsupportedSetupError(
            f"SlimFit does not support strategy {name} (untested: freezing is only correct where "
            f"every replica applies the same trainable set). Use a single device, DDP with "
            f"strategy='ddp_find_unused_parameters_true', or {_FSDP2}.")
    if isinstance(strategy, DDPStrategy):
        kw = getattr(strategy, "_ddp_kwargs", {})
        if not kw.get("find_unused_parameters", False):
            raise UnsupportedSetupError(
                "SlimFit under DDP needs find_unused_parameters=True, got "
                f"{type(strategy).__name__}(find_unused_parameters="
                f"{kw.get('find_unused_parameters', False)!r}): frozen layers produce no "
                "gradient, and DDP otherwise fails with 'Expected to have finished reduction'. "
                "Use Trainer(strategy='ddp_find_unused_parameters_true') (or "
                "'ddp_spawn_find_unused_parameters_true'), or "
                "DDPStrategy(find_unused_parameters=True).")
        if kw.get("static_graph", False):
            raise UnsupportedSetupError(
                "SlimFit changes the trainable set every step, which DDP's static_graph=True "
                "forbids ('training graph has changed'). Remove static_graph=True from DDPStrategy.")


def check_fit_start(pl_module: Any, optimizers: Sequence[Any], units: Sequence[Any]) -> None:
    """At fit start (model wrapped, optimizer built): one optimizer with automatic
    optimization, holding every candidate, none of them frozen yet."""
    if not pl_module.automatic_optimization:
        raise UnsupportedSetupError(
            "SlimFit needs automatic optimization (one optimizer step per training step); "
            "set self.automatic_optimization = True in the LightningModule.")
    if len(optimizers) != 1:
        raise UnsupportedSetupError(
            f"SlimFit supports exactly one optimizer, got {len(optimizers)}.")
    in_opt = {id(p) for g in optimizers[0].param_groups for p in g["params"]}
    missing = [u.name for u in units if any(id(p) not in in_opt for p in u.params)]
    if missing:
        raise UnsupportedSetupError(
            f"{len(missing)} SlimFit candidate(s) are not in the optimizer (e.g. {missing[:3]}); "
            "they would never be trained. Pass all trainable parameters to the optimizer or "
            "exclude them with SlimFit(exclude=[...]).")
    frozen = [u.name for u in units if not all(p.requires_grad for p in u.params)]
    if frozen:  # DDP registered only trainable tensors when it wrapped the model
        raise UnsupportedSetupError(
            f"SlimFit candidate(s) {frozen[:3]} were frozen when the strategy wrapped the "
            "model; under DDP they would train unsynchronised. Do not freeze parameters "
            "between setup and fit start, or exclude them from SlimFit.")


def check_fsdp2(strategy: Any, units: Sequence[Any]) -> None:
    """Under ``ModelParallelStrategy`` at train start: data parallelism only, and
    every candidate sharded by ``fully_shard`` (the strategy itself does not
    synchronise anything else: an unsharded tensor would train apart on each rank)."""
    mesh = strategy.device_mesh
    tp = mesh["tensor_parallel"].size() if "tensor_parallel" in (mesh.mesh_dim_names or ()) else 1
    if tp > 1:
        raise UnsupportedSetupError(
            f"SlimFit under ModelParallelStrategy supports data parallelism (FSDP2) only, got "
            f"tensor_parallel_size={tp}: a tensor-parallel layer's shards would need one "
            "freezing decision per layer across the tensor-parallel group, which SlimFit does "
            "not coordinate. Use ModelParallelStrategy(data_parallel_size=N, "
            "tensor_parallel_size=1).")
    if strategy.world_size > 1:
        plain = [u.name for u in units if not all(type(p).__name__ == "DTensor" for p in u.params)]
        if plain:
            raise UnsupportedSetupError(
                f"{len(plain)} SlimFit candidate(s) are not sharded (e.g. {plain[:3]}): under "
                "ModelParallelStrategy only what fully_shard sharded is synchronised, so these "
                "would train apart on each rank. Apply fully_shard to the blocks and the whole "
                "model in configure_model (docs/multi-node.md), or exclude them from SlimFit.")


def check_single_process(world_size: int, feature: str) -> None:
    """Refuse ``feature`` (weight streaming) in a run of more than one process."""
    if world_size > 1:
        raise UnsupportedSetupError(
            f"SlimFit {feature} runs in one process; this run has {world_size}. Under DDP "
            "each rank holds its own weights and the strategy reads them outside forward: "
            "drop stream_weights, or use offload_optimizer_state / compression, which work "
            "with DDP.")


def loss_of(out: Any):
    """The loss a ``training_step`` returned (a tensor or a dict with ``loss``)."""
    return out["loss"] if isinstance(out, dict) else out


def _inside_package(path: pathlib.Path) -> bool:
    """``path`` is (inside) the installed or checked-out slimfit package source."""
    pkg = pathlib.Path(slimfit.__file__).resolve().parent
    root = pkg.parent  # the checkout (or site-packages): its callbacks/ is ours too
    path = path.resolve()
    return any(path == d or d in path.parents for d in (pkg, root / "callbacks"))


def output_dir(trainer: Any, name: str, chosen: str | None = None) -> pathlib.Path:
    """Where a SlimFit callback writes its files: ``chosen`` if given; else
    ``<logger's log_dir>/<name>``; without a logger ``<default_root_dir>/<name>``,
    unless that is the package's own source (a run started in the repository
    root, ``name == "slimfit"``): then ``<default_root_dir>/slimfit_output/<name>``.
    Every rank must call it (``trainer.log_dir`` is a collective under DDP)."""
    if chosen is not None:
        return pathlib.Path(chosen)
    log_dir = trainer.log_dir if trainer.loggers else None
    out = pathlib.Path(log_dir or trainer.default_root_dir) / name
    if _inside_package(out):
        safe = pathlib.Path(trainer.default_root_dir) / "slimfit_output" / name
        rank_zero_info(f"SlimFit: {out} is the slimfit package's source; writing {name} files "
                       f"to {safe} instead (attach a logger or pass output_dir= to choose).")
        out = safe
    return out
