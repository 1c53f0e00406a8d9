"""Hydra entry point: fine-tune one model on one task, with or without SlimFit,
and write ``results.json`` (accuracy, memory breakdown, step time, freezing)
into the run directory.

Examples:
    python -m slimfit.experiments.train experiment=movie_slimfit
    python -m slimfit.experiments.train experiment=movie_full trainer.max_steps=200 seed=1
    python -m slimfit.experiments.train -m hparams_search=freeze_sweep   # rates x seeds
    python -m slimfit.experiments.train experiment=glue_sst2_slimfit data.data_dir=/data/SST-2

Every component comes from ``configs/`` through ``_target_``: model, data,
task, slimfit, trainer, logger(s), callbacks.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from slimfit.callbacks import MemoryMonitor, SlimFit, StepTimer  # noqa: E402

CONFIG_DIR = str(pathlib.Path(__file__).resolve().parents[1] / "configs")


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
        if key not in cfg or "_target_" not in cfg[key]:
            raise ValueError(f"config group {key!r} needs a _target_ (got {OmegaConf.to_yaml(cfg.get(key))!r}).")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    task = instantiate(cfg.task, model=model)
    callbacks = _instantiate_group(cfg.get("callbacks"), "callbacks")
    sf_cfg = OmegaConf.to_container(cfg.slimfit, resolve=True)
    method = sf_cfg.pop("name")
    enabled = sf_cfg.pop("enabled")
    slimfit = None
    if enabled:
        sf_cfg.setdefault("seed", cfg.seed)
        slimfit = instantiate(OmegaConf.create(sf_cfg), _convert_="all")  # plain lists/dicts
        callbacks.insert(0, slimfit)
    loggers = _instantiate_group(cfg.get("logger"), "logger")
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    meta = {"method": method, "slimfit": slimfit}
    return trainer, task, datamodule, meta


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit, validate and write ``results.json`` to ``cfg.output_dir``; return the results."""
    trainer, task, datamodule, meta = build(cfg)
    trainer.fit(task, datamodule=datamodule)
    trainer.validate(task, datamodule=datamodule, verbose=False)
    mon = next((c for c in trainer.callbacks if isinstance(c, MemoryMonitor)), None)
    timer = next((c for c in trainer.callbacks if isinstance(c, StepTimer)), None)
    slimfit: SlimFit | None = meta["slimfit"]
    report = mon.history[-1][1] if mon is not None and mon.history else None
    results = {
        "task": cfg.data.task, "model": _choice("model", cfg.model._target_),
        "method": meta["method"], "seed": int(cfg.seed),
        "freeze_rate": float(slimfit.freezer.config.freeze_rate) if slimfit else 0.0,
        "compression": bool(slimfit and (slimfit.plan.candidate.compression if slimfit.plan
                                         else slimfit.compression is not None)),
        "steps": int(trainer.global_step), "batch_size": int(cfg.data.batch_size),
        "train_size": len(datamodule.splits.train_y), "val_size": len(datamodule.splits.val_y),
        "val_acc": task.last_val_acc,
        "step_time_s": timer.median if timer else None,
        "memory": ({k.split("/")[-1]: v for k, v in report.scalars().items()} if report else None),
        "memory_files": {k: str(v) for k, v in (mon.files.items() if mon else [])},
        "heatmap": str(slimfit.files["heatmap"]) if slimfit and slimfit.files else None,
        "plan": slimfit.plan.describe() if slimfit and slimfit.plan else None,
    }
    out = pathlib.Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
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
    main()
