"""The options of static-activation compression: :class:`Treatment` (how one
kind of saved tensor is stored) and :class:`CompressionConfig` (which kind
gets which treatment, and which modules).

Why a module of its own: these are the choices a user (or a Hydra file)
makes and the validation that names a bad value and its fix; the mechanism
that applies them during a step is ``slimfit.compression.compressor``, which re-exports
both classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from slimfit.compression.detect import KINDS
from slimfit.errors import SlimFitError
from slimfit.compression.quantize import SUPPORTED_BITS
from slimfit.selection import Pattern, validate_pattern

__all__ = ["Treatment", "CompressionConfig"]

_METHODS = ("none", "int8", "int4", "topk")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Treatment:
    """How one kind of saved activation is stored.

    Attributes:
        method: ``none`` (keep), ``int8``, ``int4`` (affine, packed), or
            ``topk`` (LayerNorm only: keep the largest centred values).
        group_size: elements per scale; ``None`` = per token (last dim row).
        stochastic: stochastic rounding instead of round-to-nearest.
        topk_fraction: fraction kept by ``topk`` (paper: 0.1).
    """

    method: str = "int8"
    group_size: int | None = None
    stochastic: bool = False
    topk_fraction: float = 0.1

    def __post_init__(self):
        if self.method not in _METHODS:
            bits = self.method
            raise SlimFitError(
                f"unsupported activation treatment {bits!r}: choose one of {_METHODS} "
                f"(bit widths supported: {SUPPORTED_BITS}).")
        if self.group_size is not None and (isinstance(self.group_size, bool) or
                                            not isinstance(self.group_size, int) or self.group_size < 1):
            raise SlimFitError(f"group_size must be None (per token) or an int >= 1, "
                               f"got {self.group_size!r}.")
        f = self.topk_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
            raise SlimFitError(f"topk_fraction must be a number in (0, 1], got {f!r}.")
        if not isinstance(self.stochastic, bool):
            raise SlimFitError(f"stochastic must be a bool, got {self.stochastic!r}.")

    @property
    def bits(self) -> int | None:
        return {"int8": 8, "int4": 4}.get(self.method)


def _t(method: str, **kw) -> Treatment:
    return Treatment(method=method, **kw)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompressionConfig:
    """Which saved activations get which treatment (defaults follow the paper,
    with scaled quantizers instead of fixed-point ranges).

    Attributes:
        attention: Q/K/V operands and softmax probabilities of eager attention
            (fused attention: q, k, v, the attention recomputed in backward).
        mlp: what a gated MLP saves in its own forward (``act(gate)``, ``up``,
            the activation's input: Llama, Qwen2, Mistral, Gemma, Phi-3, T5).
        gelu: GELU input (4-bit, as in the paper).
        layernorm: LayerNorm and RMSNorm input and what their backward keeps
            (``int8``, or ``topk`` for LayerNorm as in the paper).
        ffn_down_input: input of the FFN down-projection when it is trainable.
        linear_input: inputs saved by every other trained Linear (dynamic
            activations; int8 per token since the fidelity study measured it at the
            defaults' accuracy: ``none`` keeps them as they are).
        dropout_mask: bit-pack dropout masks (lossless).
        modules: optional ``{kind: pattern}`` to choose modules by name instead
            of by type (regex full match, or list of exact/suffix names).
        min_numel: tensors smaller than this are kept as they are.
    """

    attention: Treatment = _t("int8")
    mlp: Treatment = _t("int8")
    gelu: Treatment = _t("int4", group_size=64)
    layernorm: Treatment = _t("int8")
    ffn_down_input: Treatment = _t("int8")
    linear_input: Treatment = _t("int8")
    dropout_mask: bool = True
    modules: dict[str, Pattern] | None = None
    min_numel: int = 1024

    def __post_init__(self):
        for kind in KINDS[:-1]:
            t = getattr(self, kind)
            if isinstance(t, Mapping):  # Hydra / YAML: a mapping of Treatment fields
                unknown = sorted(set(t) - {f.name for f in dataclasses.fields(Treatment)})
                if unknown:
                    raise SlimFitError(f"{kind} has unknown Treatment field(s) {unknown}; fields "
                                       "are method, group_size, stochastic, topk_fraction.")
                object.__setattr__(self, kind, Treatment(**dict(t)))
            elif isinstance(t, str):
                object.__setattr__(self, kind, Treatment(method=t))
            elif not isinstance(getattr(self, kind), Treatment):
                raise SlimFitError(f"{kind} must be a Treatment, a method name or a mapping, got {t!r}.")
        if self.layernorm.method not in ("none", "int8", "int4", "topk"):
            raise SlimFitError(f"layernorm treatment {self.layernorm.method!r} is not supported.")
        for kind in ("attention", "mlp", "gelu", "ffn_down_input", "linear_input"):
            if getattr(self, kind).method == "topk":
                raise SlimFitError(f"topk pruning is only defined for layernorm, not {kind}; "
                                   "use int8 or int4.")
        if self.modules is not None and not isinstance(self.modules, Mapping):
            raise SlimFitError(f"modules must be a mapping {{kind: pattern}} or None, got "
                               f"{self.modules!r}; kinds are {KINDS}.")
        for kind, pat in (self.modules or {}).items():
            if kind not in KINDS:
                raise SlimFitError(f"modules has unknown kind {kind!r}; kinds are {KINDS}.")
            validate_pattern(pat, f"modules[{kind!r}]")
        if not isinstance(self.dropout_mask, bool):
            raise SlimFitError(f"dropout_mask must be a bool, got {self.dropout_mask!r}.")
        if isinstance(self.min_numel, bool) or not isinstance(self.min_numel, int) \
                or self.min_numel < 0:
            raise SlimFitError(f"min_numel must be an int >= 0, got {self.min_numel!r}.")

    def enabled(self, kind: str) -> bool:
        return self.dropout_mask if kind == "dropout_mask" else getattr(self, kind).method != "none"
