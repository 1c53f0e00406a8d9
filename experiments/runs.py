"""What a run is, defined once: :class:`Run` (SlimFit's session options, the
peer transforms, the optimizer, the learning-rate rule) and its one name,
:meth:`Run.label`. The benchmarks, the GPU check, the fidelity study and the
Hydra ``method`` group all take their runs from here (:data:`RUNS`); the
budget planner's candidates are the same :class:`slimfit.SessionConfig` a run
holds, named by the same label.

A run is three orthogonal choices:

* a **model transform**: activation checkpointing, then PEFT LoRA
  (:mod:`slimfit.experiments.peers`);
* an **optimizer**: torch AdamW, bitsandbytes AdamW8bit or SGD, at a peak
  learning rate (``lr``: ``None`` is the task's);
* a **SlimFit session** (freezing, compression, offload, streaming) or none.

Composition with SlimFit (tested in ``tests/test_methods.py``): freezing and
compression compose with checkpointing (same gradients, bit for bit), because
each compression scope records, with every tensor it hands to the hooks
outside it, the hook pair that packed it (``slimfit.hooks.ScopedHooks``).
Weight streaming and activation offload are refused with checkpointing:
streaming fetches a block's weights in the block's forward hooks, which
Hugging Face keeps outside the recomputed forward.

:meth:`Run.overrides` writes a run as Hydra overrides of
``slimfit.experiments.train``, so a study runs exactly what the registry says.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Iterable

import torch
from torch import nn

from slimfit import CompressionConfig, SessionConfig, SlimFitConfig, StreamConfig
from slimfit.experiments.peers import LoraSpec, RunError, set_checkpointing

__all__ = ["OPTIMIZERS", "RUNS", "Run", "RunError", "build_optimizer", "get_run"]

#: optimizer names :func:`build_optimizer` knows
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")


def build_optimizer(name: str, params: Iterable[Any], lr: float,
                    weight_decay: float = 0.01) -> torch.optim.Optimizer:
    """``adamw`` (torch, fp32 moments: 8 bytes per trained element), ``adamw8bit``
    (bitsandbytes, block-quantized moments: ~2 bytes per element), or ``sgd``
    (momentum 0.9, no weight decay unless a param group sets it).

    Args:
        name: one of :data:`OPTIMIZERS`.
        params: tensors or param groups (a group's ``weight_decay`` wins).
        lr: learning rate.
        weight_decay: default decoupled weight decay of the Adam variants.

    Raises:
        RunError: an unknown name.
    """
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise RunError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Run:
    """One way to fine-tune.

    Attributes:
        name: short name (:data:`RUNS` key, ``configs/method/<name>.yaml``,
            results' ``method``).
        session: SlimFit's session (``None``: no SlimFit). In Hydra runs the
            ``slimfit`` config group configures the callback; a method file
            that uses SlimFit selects its option there (tests check both agree).
        lora: LoRA adapters (``None``: every weight trainable).
        checkpointing: recompute each transformer block in backward.
        optimizer: ``adamw`` or ``adamw8bit``.
        lr: the peak learning rate (``None``: the task's).
        attention: the attention kernel the model is built with (``None``: as
            loaded, SDPA; ``"eager"`` stores the T x T probabilities).

    Raises:
        RunError: bad values, or a combination that does not compose
            (checkpointing with weight streaming or activation offload).
    """

    name: str
    session: SessionConfig | None = None
    lora: LoraSpec | None = None
    checkpointing: bool = False
    optimizer: str = "adamw"
    lr: float | None = None
    attention: str | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise RunError(f"Run.name must be a non-empty string, got {self.name!r}.")
        if isinstance(self.lora, Mapping):  # Hydra / YAML: the LoraSpec fields
            object.__setattr__(self, "lora", LoraSpec(**dict(self.lora)))
        if self.lora is not None and not isinstance(self.lora, LoraSpec):
            raise RunError(f"Run.lora must be a LoraSpec, a mapping of its fields or None, "
                           f"got {self.lora!r}.")
        if not isinstance(self.checkpointing, bool):
            raise RunError(f"Run.checkpointing must be a bool, got {self.checkpointing!r}.")
        if self.optimizer not in ("adamw", "adamw8bit"):
            raise RunError(f"Run.optimizer must be 'adamw' or 'adamw8bit', got {self.optimizer!r}.")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                    or not self.lr > 0):
            raise RunError(f"Run.lr must be None (the task's) or a positive number, got {self.lr!r}.")
        if self.attention not in (None, "sdpa", "eager"):
            raise RunError(f"Run.attention must be None, 'sdpa' or 'eager', got {self.attention!r}.")
        s = self.session
        if s is not None and not isinstance(s, SessionConfig):
            raise RunError(f"Run.session must be a SessionConfig or None, got {s!r}.")
        if self.checkpointing and s is not None and (s.stream is not None or s.offload_activations):
            raise RunError(
                f"run {self.name!r}: activation checkpointing does not compose with weight "
                "streaming or activation offload (streaming fetches a block's weights in the "
                "block's forward hooks, which the checkpointed recomputation does not run; "
                "activation offload is untested under recomputation). Drop checkpointing, or "
                "use SlimFit with optimizer-state offload only.")

    def apply(self, model: nn.Module) -> nn.Module:
        """The model to train: checkpointing switched on, then LoRA wrapped around
        it (PEFT keeps the base model's checkpointing). Call on a fresh model."""
        if self.checkpointing:
            set_checkpointing(model, True)
        return self.lora.apply(model) if self.lora is not None else model

    def make_optimizer(self, params: Iterable[Any], lr: float,
                       weight_decay: float = 0.01) -> torch.optim.Optimizer:
        """This run's optimizer over ``params`` (pass the trainable ones)."""
        return build_optimizer(self.optimizer, params, lr, weight_decay)

    def variant(self, name: str, **changes: Any) -> "Run":
        """A copy named ``name``; ``changes`` are :class:`Run` fields, else
        :class:`SlimFitConfig` fields (``score=...``), else CompressionConfig
        kinds (``linear_input=...``), in that order."""
        own = {f.name for f in dataclasses.fields(Run)}
        rest = {k: changes.pop(k) for k in list(changes) if k not in own}
        freezing = {k: rest.pop(k) for k in list(rest) if k in SlimFitConfig.__dataclass_fields__}
        comp = {k: rest.pop(k) for k in list(rest) if k in CompressionConfig.__dataclass_fields__}
        if rest:
            raise RunError(f"Run.variant: unknown option(s) {sorted(rest)}.")
        session = changes.pop("session", self.session)
        if freezing or comp:
            session = dataclasses.replace(
                session, freezing=dataclasses.replace(session.freezing, **freezing)
                if freezing else session.freezing,
                compression=dataclasses.replace(session.compression, **comp)
                if comp else session.compression)
        return dataclasses.replace(self, name=name, session=session, **changes)

    @property
    def freeze_rate(self) -> float:
        s = self.session
        return s.freezing.freeze_rate if s is not None and s.freezing is not None else 0.0

    def label(self) -> str:
        """The run's one human-readable name, e.g. ``LoRA r=8 + compression +
        checkpointing``: the session's label (:meth:`SessionConfig.label`)
        with the peers and the optimizer."""
        text = self.session.label() if self.session is not None else "full fine-tuning"
        if self.lora is not None:
            text = self.lora.label() + text.removeprefix("full fine-tuning")
        text += " + checkpointing" if self.checkpointing else ""
        text += ", eager attention" if self.attention == "eager" else ""
        return text + (", AdamW8bit" if self.optimizer == "adamw8bit" else "")

    def overrides(self) -> list[str]:
        """Hydra overrides of ``slimfit.experiments.train`` that run exactly this run.

        Raises:
            RunError: a setting the Hydra entry point has no option for (a
                changed Treatment field other than the method, streaming).
        """
        out = []
        peers = {(False, False, "adamw"): None, (False, False, "adamw8bit"): "full_8bit",
                 (False, True, "adamw"): "checkpointing", (True, False, "adamw"): "lora",
                 (True, True, "adamw"): "lora_checkpointing"}
        method = peers.get((self.lora is not None, self.checkpointing, self.optimizer), "?")
        if method == "?":
            raise RunError(f"run {self.name!r}: no method file runs this peer combination.")
        out += [f"method={method}"] if method else []
        out += _slimfit_overrides(self)
        out += [f"task.lr={self.lr!r}"] if self.lr is not None else []
        out += [f"model.attn_implementation={self.attention}"] if self.attention else []
        return out


#: keys of configs/slimfit/r090*.yaml (others are added with "+")
_IN_YAML = {"freeze_rate", "policy", "always_train", "max_frozen_age", "lr_normalized"}


def _hydra(v: Any) -> str:
    return {True: "true", False: "false", None: "null"}.get(v, str(v)) \
        if isinstance(v, (bool, type(None))) else str(v)


def _slimfit_overrides(run: Run) -> list[str]:
    s = run.session
    if s is None:
        return ["slimfit=full"]
    if s.stream is not None or s.freezing is None:
        raise RunError(f"run {run.name!r}: the Hydra slimfit group runs freezing with optional "
                       "compression and optimizer-state offload; write this one as a file.")
    out = ["slimfit=r090_compress" if s.compression is not None else "slimfit=r090"]
    default = SlimFitConfig(freeze_rate=0.9)
    for f in dataclasses.fields(SlimFitConfig):
        v = getattr(s.freezing, f.name)
        if v != getattr(default, f.name):
            out.append(f"{'' if f.name in _IN_YAML else '+'}slimfit.{f.name}={_hydra(v)}")
    if s.compression is not None:
        base = CompressionConfig()
        for f in dataclasses.fields(CompressionConfig):
            v, d = getattr(s.compression, f.name), getattr(base, f.name)
            if v == d:
                continue
            if not hasattr(v, "method") or dataclasses.replace(d, method=v.method) != v:
                raise RunError(f"run {run.name!r}: compression.{f.name}={v!r} has no one-word "
                               "Hydra override; write this one as a file.")
            out.append(f"slimfit.compression.{f.name}={v.method}")
    for flag in ("offload_optimizer_state", "offload_activations"):
        if getattr(s, flag):
            out.append(f"slimfit.{flag}=true")
    if s.optimizer_state == "release":
        out.append("slimfit.optimizer_state=release")
    return out


def _slimfit(rate: float = 0.9, compression: bool = True, **options: Any) -> SessionConfig:
    """SlimFit at ``rate`` (default compression when ``compression``)."""
    return SessionConfig(freezing=SlimFitConfig(freeze_rate=rate),
                         compression=CompressionConfig() if compression else None, **options)


#: Every named run: the Hydra method files (``configs/method/<name>.yaml``), the
#: benchmarks' SlimFit arms and the GPU check's. LoRA's lr is its best in the
#: fidelity study's sweep (docs/results.md).
RUNS: dict[str, Run] = {r.name: r for r in (
    Run(name="full"),
    Run(name="full_eager", attention="eager"),  # the secondary baseline: probabilities stored
    Run(name="full_8bit", optimizer="adamw8bit"),
    Run(name="checkpointing", checkpointing=True),
    Run(name="lora", lora=LoraSpec(), lr=1e-3),
    Run(name="lora_checkpointing", lora=LoraSpec(), checkpointing=True, lr=1e-3),
    Run(name="lora_compress", lora=LoraSpec(), lr=1e-3,
        session=SessionConfig(compression=CompressionConfig())),
    Run(name="slimfit", session=_slimfit()),
    Run(name="slimfit_checkpointing", session=_slimfit(compression=False), checkpointing=True),
    # the benchmarks' arms: freezing alone, and each exact technique added to SlimFit
    Run(name="slimfit_nocompress", session=_slimfit(compression=False)),
    Run(name="slimfit_8bit", session=_slimfit(), optimizer="adamw8bit"),
    Run(name="slimfit_offload", session=_slimfit(offload_optimizer_state=True)),
    Run(name="slimfit_offload_act", session=_slimfit(offload_optimizer_state=True,
                                                     offload_activations=True)),
    Run(name="slimfit_stream", session=_slimfit(offload_optimizer_state=True,
                                                stream=StreamConfig(resident=2, prefetch=1))),
    Run(name="slimfit_stream_act", session=_slimfit(offload_optimizer_state=True,
                                                    offload_activations=True,
                                                    stream=StreamConfig(resident=2, prefetch=1))),
)}


def get_run(name: str) -> Run:
    """The run called ``name``.

    Raises:
        RunError: an unknown name (the message lists the known ones).
    """
    if name not in RUNS:
        raise RunError(f"unknown run {name!r}; choose one of {', '.join(RUNS)}.")
    return RUNS[name]
