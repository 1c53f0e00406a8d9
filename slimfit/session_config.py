"""``SessionConfig``: what a SlimFit session runs, validated in one place.

Why a module of its own: the configuration is read by everything that builds a
session (the entry points' options, the planner, which returns one as its
plan, the benchmarks' runs) without the session's machinery, and its one
label names every configuration the same way in every table.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch

from slimfit.compression.config import CompressionConfig
from slimfit.errors import OptionTypeError, SlimFitError
from slimfit.freezing.config import SlimFitConfig
from slimfit.offload.stream_config import StreamConfig

__all__ = ["OPTIMIZER_STATES", "SessionConfig"]

#: where the optimizer state of frozen units lives (``SessionConfig.optimizer_state``)
OPTIMIZER_STATES = ("device", "host", "release")


def _option(name: str, value: Any, cls: type) -> Any:
    """``True``: the defaults of ``cls``; ``False``/``None``: off; else an instance of ``cls``."""
    if value is True:
        return cls()
    if value is False or value is None:
        return None
    if not isinstance(value, cls):
        raise OptionTypeError(f"{name} must be True, False, None or a {cls.__name__}, got {value!r}.")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class SessionConfig:
    """What a session runs; every part is optional.

    Attributes:
        freezing: per-iteration freezing (``None``: every tensor trained
            every step, as in full fine-tuning).
        compression: compress static saved activations (``None``: off).
        optimizer_state: where the optimizer state of frozen units lives:
            ``"device"`` (kept, as plain freezing leaves it), ``"host"``
            (moved to host memory while frozen and prefetched back: exact) or
            ``"release"`` (dropped when a unit freezes, re-initialised when it
            trains again: BAdam's reset on switch; changes the updates). Needs
            ``freezing`` unless ``"device"``.
        offload_optimizer_state: ``True`` is ``optimizer_state="host"`` (the
            two are kept in agreement).
        chunked_loss: compute the loss of transformers' causal-LM heads in
            chunks of tokens, never keeping the logits (``True``: chunks of
            1,024 tokens; an int: that many; :mod:`slimfit.loss`).
        offload_activations: saved activations in host memory between the
            forward and the optimizer step (CUDA; nothing to move on a CPU).
        stream: stream the weights of frozen tensors (``None``: off; needs
            ``freezing`` to have frozen tensors to stream, one process).
    """

    freezing: SlimFitConfig | None = None
    compression: CompressionConfig | None = None
    offload_optimizer_state: bool = False
    offload_activations: bool = False
    stream: StreamConfig | None = None
    optimizer_state: str = "device"
    chunked_loss: bool | int = False

    def __post_init__(self):
        for name, cls in (("freezing", SlimFitConfig), ("compression", CompressionConfig),
                          ("stream", StreamConfig)):
            v = getattr(self, name)
            if v is not None and not isinstance(v, cls):
                raise OptionTypeError(f"SessionConfig.{name} must be a {cls.__name__} or None, "
                                      f"got {v!r}.")
        for name in ("offload_optimizer_state", "offload_activations"):
            if not isinstance(getattr(self, name), bool):
                raise OptionTypeError(f"SessionConfig.{name} must be a bool, got "
                                      f"{getattr(self, name)!r}.")
        c = self.chunked_loss
        if not isinstance(c, (bool, int)) or (not isinstance(c, bool) and c < 1):
            raise OptionTypeError(f"SessionConfig.chunked_loss must be a bool or a chunk size >= 1 "
                                  f"(tokens), got {c!r}.")
        if self.optimizer_state not in OPTIMIZER_STATES:
            raise SlimFitError(f"optimizer_state must be one of {', '.join(map(repr, OPTIMIZER_STATES))}"
                               f", got {self.optimizer_state!r}.")
        if self.offload_optimizer_state and self.optimizer_state == "release":
            raise SlimFitError("offload_optimizer_state=True keeps frozen units' state in host "
                               "memory, optimizer_state='release' drops it: choose one.")
        if self.offload_optimizer_state or self.optimizer_state == "host":  # one setting, two names
            object.__setattr__(self, "offload_optimizer_state", True)
            object.__setattr__(self, "optimizer_state", "host")
        if self.optimizer_state != "device" and self.freezing is None:
            what = ("offload_optimizer_state=True (optimizer_state='host')" if self.offload_optimizer_state
                    else f"optimizer_state={self.optimizer_state!r}")
            raise SlimFitError(f"{what} acts on the optimizer state of frozen units: it needs "
                               "freezing (a SlimFitConfig); without freezing no unit is ever frozen.")

    @classmethod
    def from_options(cls, *, config: SlimFitConfig | None = None,
                     compression: CompressionConfig | bool | None = None,
                     offload_optimizer_state: bool = False, offload_activations: bool = False,
                     stream_weights: StreamConfig | bool | None = None,
                     optimizer_state: str = "device", chunked_loss: bool | int = False,
                     **freezing: Any) -> "SessionConfig":
        """The user-facing options of ``SlimFit(...)``: ``compression`` and
        ``stream_weights`` take ``True`` (defaults), ``False``/``None`` (off) or
        their config; ``freezing`` holds :class:`SlimFitConfig` fields, or pass
        ``config``.

        Raises:
            SlimFitError: both ``config`` and freezing keywords, or a bad value.
            TypeError: an unknown option (the message lists the known ones).
        """
        if config is not None and freezing:
            raise SlimFitError(f"pass either config=SlimFitConfig(...) or freezing options "
                               f"{sorted(freezing)}, not both.")
        if config is None:
            known = set(SlimFitConfig.__dataclass_fields__)
            unknown = sorted(set(freezing) - known)
            if unknown:
                raise TypeError(f"unknown SlimFit option(s) {unknown}; freezing options are the "
                                f"fields of SlimFitConfig: {sorted(known)}.")
            config = SlimFitConfig(**freezing)
        out = cls(freezing=config, compression=_option("compression", compression, CompressionConfig),
                  offload_optimizer_state=offload_optimizer_state,
                  offload_activations=offload_activations, optimizer_state=optimizer_state,
                  chunked_loss=chunked_loss,
                  stream=_option("stream_weights", stream_weights, StreamConfig))
        if (out.offload_optimizer_state or out.offload_activations or out.stream) \
                and not torch.cuda.is_available():
            warnings.warn("SlimFit offload requested but no CUDA device is available: host and "
                          "device memory are the same here, so offloading saves nothing (the "
                          "bookkeeping still runs).", UserWarning, stacklevel=3)
        return out

    def label(self) -> str:
        """The one name of a configuration, e.g. ``SlimFit r=0.9 + compression``
        (benchmarks, studies and the planner all print it)."""
        f = self.freezing
        who = {"slimfit": "SlimFit", "lisa": "LISA", "badam": "BAdam"}[f.policy] if f else ""
        parts = ["full fine-tuning" if f is None or f.freeze_rate == 0
                 else f"{who} r={f.freeze_rate:.3g}"
                 + (" of the bytes" if f.rate_of == "bytes" else "")]
        parts += [n for n, on in (("optimizer-state offload", self.offload_optimizer_state),
                                  ("optimizer state released", self.optimizer_state == "release"),
                                  ("compression", self.compression is not None),
                                  ("chunked loss", bool(self.chunked_loss)),
                                  ("weight streaming", self.stream is not None),
                                  ("activation offload", self.offload_activations)) if on]
        return " + ".join(parts)
