"""Hydra entry point: fine-tune one model on one task with one method (full
fine-tuning, a peer such as LoRA or checkpointing, or SlimFit) and write
``results.json`` (method, accuracy, memory breakdown, step time, freezing)
into the run directory.

Examples:
    python -m slimfit.experiments.train experiment=movie_slimfit
    python -m slimfit.experiments.train experiment=movie_full trainer.max_steps=200 seed=1
    python -m slimfit.experiments.train -m hparams_search=freeze_sweep   # rates x seeds
    python -m slimfit.experiments.train experiment=glue_sst2_slimfit data.data_dir=/data/SST-2
    python -m slimfit.experiments.train -m experiment=movie_full method=full,lora,checkpointing,slimfit

Every component comes from ``configs/`` through ``_target_``: model, data,
task, method, slimfit, trainer, logger(s), callbacks. The ``method`` group
(:mod:`slimfit.experiments.runs`) transforms the model (LoRA,
checkpointing) and names the optimizer; SlimFit itself is the ``slimfit``
group's callback, which the SlimFit methods select.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import pathlib
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from slimfit.callbacks import MemoryMonitor, SlimFit, StepTimer
from slimfit.experiments.runs import Run, RunError

#: the YAML files of the installed ``slimfit.configs`` package (editable or not)
CONFIG_DIR = str(importlib.resources.files("slimfit.configs"))


def _instantiate_group(group: DictConfig | None, what: str) -> list[Any]:
    """Instantiate every entry of a ``{name: {_target_: ...}}`` group."""
    out = []
    for name, node in (group or {}).items():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ValueError(f"{what} entry {name!r} has no _target_; every entry of configs/"
                             f"{what}/ must name the class to build.")
        out.append(instantiate(node))
    return out


def _choice(group: str, default: str) -> str:
    """The config option chosen for ``group`` (e.g. ``minilm``) when run by Hydra."""
    from hydra.core.hydra_config import HydraConfig
    return HydraConfig.get().runtime.choices.get(group, default) if HydraConfig.initialized() \
        else default


def build(cfg: DictConfig) -> tuple[pl.Trainer, pl.LightningModule, pl.LightningDataModule, dict]:
    """Instantiate data, model, task, callbacks, loggers and trainer from ``cfg``."""
    for key in ("model", "data", "task", "trainer", "slimfit"):
        node = cfg.get(key)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            got = OmegaConf.to_yaml(node) if isinstance(node, DictConfig) else node
            raise ValueError(f"config group {key!r} needs a _target_ naming the class to build "
                             f"(got {got!r}); choose one of configs/{key}/*.yaml.")
    missing = [k for k in ("name", "enabled") if k not in cfg.slimfit]
    if missing:
        raise ValueError(f"config group 'slimfit' lacks {missing}: it needs 'name' (the method "
                         "label in results) and 'enabled' (attach the callback or not).")
    method = _method(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    model = method.apply(instantiate(cfg.model))
    task = instantiate(cfg.task, model=model, optimizer=_optimizer(cfg, method))
    callbacks = _instantiate_group(cfg.get("callbacks"), "callbacks")
    sf_cfg = OmegaConf.to_container(cfg.slimfit, resolve=True)
    sf_name = sf_cfg.pop("name")
    enabled = sf_cfg.pop("enabled")
    slimfit = None
    if enabled:
        sf_cfg.setdefault("seed", cfg.seed)
        slimfit = instantiate(OmegaConf.create(sf_cfg), _convert_="all")  # plain lists/dicts
        if method.checkpointing and slimfit.memory_budget is not None:
            raise RunError(f"method={method.name} checkpoints activations, which the memory "
                              "planner does not model (it may choose compression, which does not "
                              "compose with checkpointing); drop slimfit.memory_budget.")
        dataclasses.replace(method, session=slimfit.session_config)  # refuses what does not compose
        callbacks.insert(0, slimfit)
    loggers = _instantiate_group(cfg.get("logger"), "logger")
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    # the default method defers to SlimFit's name (as before the method group: "slimfit")
    name = sf_name if enabled and method.name == "full" else method.name
    meta = {"method": name, "method_config": method, "slimfit": slimfit}
    return trainer, task, datamodule, meta


def _method(cfg: DictConfig) -> Run:
    """The run's :class:`Run` (``configs/method/``; full fine-tuning if absent)."""
    node = cfg.get("method")
    if node is None:
        return Run(name="full")
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ValueError(f"config group 'method' needs a _target_ (got {node!r}); choose one of "
                         "configs/method/*.yaml.")
    method = instantiate(node)
    if not isinstance(method, Run):
        raise ValueError(f"method._target_ must build a slimfit.experiments.runs.Run, got "
                         f"{type(method).__name__}.")
    return method


def _optimizer(cfg: DictConfig, method: Run) -> str:
    """The method's optimizer; ``task.optimizer`` may only repeat it or stay ``adamw``."""
    task_opt = cfg.task.get("optimizer", "adamw")
    if task_opt in ("adamw", method.optimizer):
        return method.optimizer
    if method.optimizer != "adamw":
        raise RunError(f"task.optimizer={task_opt} conflicts with method={method.name} "
                          f"({method.optimizer}); drop one of them.")
    return task_opt


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit, validate and write ``results.json`` to ``cfg.output_dir``; return the results."""
    trainer, task, datamodule, meta = build(cfg)
    trainer.fit(task, datamodule=datamodule)
    trainer.validate(task, datamodule=datamodule, verbose=False)
    if cfg.data.get("n_test", 0):  # the test split, never used to choose a setting
        trainer.test(task, datamodule=datamodule, verbose=False)
    mon = next((c for c in trainer.callbacks if isinstance(c, MemoryMonitor)), None)
    timer = next((c for c in trainer.callbacks if isinstance(c, StepTimer)), None)
    slimfit: SlimFit | None = meta["slimfit"]
    method: Run = meta["method_config"]
    report = mon.history[-1][1] if mon is not None and mon.history else None
    rate = float(slimfit.freezer.config.freeze_rate) if slimfit else 0.0
    compression = bool(slimfit and slimfit.session.config.compression is not None)
    results = {
        "task": cfg.data.get("task") or cfg.data.get("corpus"),
        "model": _choice("model", cfg.model._target_),
        # how attention ran: HF attn_implementation, or timm's fused/eager switch
        "attention": cfg.model.get("attn_implementation") or (
            "eager" if cfg.model.get("eager_attention") else "fused"),
        "method": meta["method"],
        # what ran: the method with the session the callback ran (a budget's plan included)
        "method_label": dataclasses.replace(
            method, session=slimfit.session.config if slimfit else None).label(),
        "lora_r": method.lora.r if method.lora else None,
        "checkpointing": method.checkpointing, "optimizer": task.optimizer_name,
        "seed": int(cfg.seed), "freeze_rate": rate, "compression": compression,
        # every freezing option the run used (score, heads, staleness ...), as run
        "freezing": (dataclasses.asdict(slimfit.session.config.freezing) if slimfit else None),
        "steps": int(trainer.global_step), "batch_size": int(cfg.data.batch_size),
        "train_size": len(datamodule.train_set), "val_size": len(datamodule.val_set),
        "val_acc": task.last_val_acc, "val_loss": getattr(task, "last_val_loss", None),
        "test_acc": task.last_test_acc,
        "test_size": len(getattr(datamodule, "test_set", None) or ()),
        "step_time_s": timer.median if timer else None,
        "memory": ({k.split("/")[-1]: v for k, v in report.scalars().items()} if report else None),
        "memory_files": {k: str(v) for k, v in (mon.files.items() if mon else [])},
        "heatmap": str(slimfit.files["heatmap"]) if slimfit and slimfit.files else None,
        "plan": slimfit.plan.describe() if slimfit and slimfit.plan else None,
    }
    out = pathlib.Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    for logger in trainer.loggers:  # final figures as run summary (W&B, CSV)
        logger.log_metrics({"final/val_acc": results["val_acc"] or 0.0,
                            **({f"final/{k}": v for k, v in results["memory"].items()}
                               if results["memory"] else {})}, step=trainer.global_step)
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    results = run(cfg)
    print(json.dumps({k: results[k] for k in ("task", "method", "seed", "val_acc", "step_time_s")}))
    return results["val_acc"]


if __name__ == "__main__":
    # the data and model ship in packages: never wait on a hub lookup
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
