"""Compression of the static activations SlimFit must keep: GELU inputs,
attention operands and probabilities, LayerNorm inputs, the FFN
down-projection input, and dropout masks.

Mechanism: ``saved_tensors_hooks`` scoped to modules. A forward pre-hook on
each selected module pushes a pack/unpack pair for that module's kind and the
forward hook pops it, so every tensor autograd saves *inside* that module is
compressed on save and restored on backward; nothing else is touched. Why
hooks and not forked model files or custom autograd functions: the same ~200
lines cover Hugging Face BERT, RoBERTa, DistilBERT, ViT and timm ViTs (their
attention, GELU, LayerNorm and Linear are ordinary modules), autograd's own
backward formulas stay in use (exact GELU derivative, softmax backward, all
evaluated at the restored values, as in the paper), and the model's code and
state dict are untouched. Modules are found by type; every kind can also be
given explicit module-name patterns.

Rules inside a scope: parameters (and views of them) and small tensors pass
through unchanged (a narrow view of a large storage, such as the ``[CLS]``
row a classifier saves, as a copy: the base is then not kept alive for it);
dropout masks (bool, or on CPU floats {0, 1/(1-p)}, checked
to be exactly two-valued) are bit-packed losslessly; other floating tensors
get the kind's treatment. The innermost scope wins (a Linear
inside an attention block uses the Linear's rule), and each scope forwards
what it stores to the hooks that were active outside SlimFit's scopes (the
memory ledger, activation offload; ``slimfit.hooks``), so the ledger counts compressed
bytes and offload moves them.

Fused attention (Hugging Face ``sdpa``, timm ``fused_attn``, any module that
calls ``F.scaled_dot_product_attention`` inside an attention scope) is
compressed too: the scope enters a torch-function mode that routes the call
through ``slimfit.compression.fused_attention`` (q, k, v saved int8, attention recomputed
in backward; no T x T tensor stored). Attention kernels that bypass that
function (``flash_attention_2``, ``flex_attention``) are left alone, with a
warning. Under ``torch.compile`` saved-tensor hooks save nothing (pytorch
#148222): compression refuses a compiled model, or one with a compiled module
inside. The detection of each kind's modules is in ``slimfit.compression.detect``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from slimfit.compression.config import CompressionConfig, Treatment
from slimfit.compression.detect import KINDS, attention_kernel, detect_kinds
from slimfit.errors import SlimFitError
from slimfit.compression.fused_attention import SDPARouter
from slimfit.hooks import ScopedHooks
from slimfit.parts import Context, Part
from slimfit.compression.quantize import dequantize, pack_bool, quantize, topk_prune, topk_restore, unpack_bool
from slimfit.compression.recast import RecastMode
from slimfit.selection import refuse_compiled, select_modules
from slimfit.storage import is_parameter_or_view, storage_identity

__all__ = ["ActivationCompressor"]


# ----------------------------------------------------------------------------
# The scoped hooks
# ----------------------------------------------------------------------------


class _Packed:
    """What a scope hands to autograd for one compressed tensor."""

    __slots__ = ("kind", "meta", "pieces")

    def __init__(self, kind, meta, pieces):
        self.kind, self.meta, self.pieces = kind, meta, pieces


#: the kinds whose scope wraps a Linear (or Conv1D)
_LINEAR_KINDS = ("ffn_down_input", "linear_input")

#: a saved view is copied when its storage is at least this many times larger
_NARROW = 4
#: ... and at least this many bytes larger (smaller bases are not worth a copy)
_NARROW_MIN_BYTES = 64 * 1024


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it if it is a narrow view of a large storage.

    A view saved for backward keeps its whole base alive: the ``[CLS]`` row
    ``h[:, 0]`` that a pooler or classifier saves holds the full sequence
    output (ViT-B/16: 197 rows for 1, 0.58 MiB per example in fp32). A copy of
    the view costs the view's bytes, once; the base is then freed after the
    forward unless something else holds it (at most a quarter of it extra, if
    it does). Exact: the same values are restored.
    """
    if type(t) is not torch.Tensor or t.layout is not torch.strided:
        return t  # subclasses (DTensor, ...), sparse: their storage is not this one's
    view = t.numel() * t.element_size()
    base = t.untyped_storage().nbytes()
    if base >= _NARROW * view and base - view >= _NARROW_MIN_BYTES:
        return t.detach().clone()
    return t


class _Scope(ScopedHooks):
    """Pack/unpack pair of one kind; pushed while a module of that kind runs.
    An attention scope also enters a torch-function mode (``mode``) that
    routes the module's SDPA calls (``slimfit.compression.fused_attention``)."""

    def __init__(self, kind: str, treatment: Treatment | None, compressor: "ActivationCompressor"):
        self.kind, self.treatment, self.compressor = kind, treatment, compressor
        self.mode: Any = None
        # One tensor saved by two ops (softmax output saved by softmax and by
        # the next matmul) is stored once. Keys are storage addresses, so the
        # original is held until the module's forward returns: no address can
        # be freed and reused by another tensor while its key is live. Costs
        # one module's uncompressed saves, transiently.
        self._cache: dict[Any, tuple[_Packed, torch.Tensor]] = {}

    def push(self) -> None:
        super().push()
        if self.kind in _LINEAR_KINDS:  # under autocast: keep no half-precision weight copy
            dev = self.compressor._device_type
            self.mode = RecastMode(dev, torch.get_autocast_dtype(dev)) \
                if torch.is_autocast_enabled(dev) else None
        if self.mode is not None:
            self.mode.__enter__()

    def pop(self) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
        super().pop()
        self._cache.clear()

    def pack(self, t: torch.Tensor) -> Any:
        c = self.compressor
        storage = storage_identity(t)
        if storage in c._param_storages or storage in c._constants or is_parameter_or_view(t):
            # weights; rotary cos/sin, computed once per forward for every layer: by reference
            return ("raw", self.pack_outer(t))
        key = (storage, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t._version)
        hit = self._cache.get(key, (None,))[0]
        if hit is None:
            hit = self._compress(t) if t.numel() >= c.config.min_numel else None
            if hit is None:
                hit = ("raw", self.pack_outer(_compact(t)))
            self._cache[key] = (hit, t)
        return hit

    def _compress(self, t: torch.Tensor) -> "_Packed | None":
        """The stored form of ``t`` under this scope's rule, or None to keep it."""
        cfg = self.compressor.config
        if t.dtype == torch.bool:
            if not cfg.dropout_mask:
                return None
            packed, shape = pack_bool(t)
            return _Packed("bool", shape, [self.pack_outer(packed)])
        if not t.is_floating_point():
            return None
        if cfg.dropout_mask and self.kind in ("attention", "dropout_mask") and not t.requires_grad:
            # Dropout on CPU saves its mask as floats {0, 1/(1-p)}: bits plus the
            # one scale if (and only if) that is lossless. One reduction and one
            # host sync per candidate (a saved tensor that needs no grad).
            scale = t.amax()
            if bool(((t == 0) | (t == scale)).all()):
                packed, shape = pack_bool(t != 0)
                return _Packed("mask", (shape, t.dtype),
                               [self.pack_outer(packed), self.pack_outer(scale.reshape(1))])
        tr = self.treatment
        if tr is None or tr.method == "none":
            return None
        x = t.detach()
        if tr.method == "topk":
            z = topk_prune(x, tr.topk_fraction)
            return _Packed("topk", z, [self.pack_outer(p) for p in z.tensors()])
        q = quantize(x, bits=tr.bits, group_size=tr.group_size, stochastic=tr.stochastic)
        return _Packed("q", q, [self.pack_outer(p) for p in q.tensors()])

    def unpack(self, obj: Any) -> torch.Tensor:
        if isinstance(obj, tuple):
            return self.unpack_outer(obj[1])
        pieces = [self.unpack_outer(p) for p in obj.pieces]
        if obj.kind == "bool":
            return unpack_bool(pieces[0], obj.meta)
        if obj.kind == "mask":
            shape, dtype = obj.meta
            return unpack_bool(pieces[0], shape).to(dtype) * pieces[1].to(dtype)
        meta = obj.meta
        if obj.kind == "topk":
            meta.values, meta.indices, meta.mean = pieces
            return topk_restore(meta)
        meta.codes, meta.zero, meta.scale = pieces
        return dequantize(meta)


class ActivationCompressor(Part):
    """Installs the scoped hooks on a model.

    Args:
        model: any ``nn.Module`` (not ``torch.compile``-d, nor any module in it).
        config: a :class:`CompressionConfig` (default: the paper's choices).

    Raises:
        SlimFitError: the model or a module inside it is ``torch.compile``-d;
            SelectionError: a ``modules`` pattern that matches no module.

    ``sdpa`` is the :class:`slimfit.compression.fused_attention.SDPARouter` of the
    attention scopes (calls routed, calls that fell back and why).

    Example:
        >>> m = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
        >>> comp = ActivationCompressor(m, CompressionConfig(min_numel=0))
        >>> sorted(k for k, v in comp.preview().items() if v)
        ['ffn_down_input', 'gelu', 'linear_input']
        >>> with comp:
        ...     m(torch.randn(4, 8)).sum().backward()
    """

    name = "compression"

    def __init__(self, model: nn.Module, config: CompressionConfig | None = None):
        refuse_compiled(model, "activation compression uses saved-tensor hooks, which "
                        "torch.compile runs all at once at the end of the forward (pytorch "
                        "#148222): nothing would be saved. Compress the uncompiled model, or "
                        "disable compression (compression=None) under torch.compile.")
        if config is not None and not isinstance(config, CompressionConfig):
            raise SlimFitError(f"config must be a CompressionConfig or None, got {config!r}.")
        self.model = model
        self.config = config or CompressionConfig()
        self.skipped: dict[str, str] = {}
        self.fused: list[str] = []  # attention modules calling F.scaled_dot_product_attention
        self._handles: list[Any] = []
        self._param_storages: set = set()
        self._constants: set = set()  # storages of this forward's rotary cos/sin
        self._fused_gelus: list[nn.Module] = []
        self._device_type = "cpu"
        self.targets = self._select()
        tr = self.config.attention
        self.sdpa = SDPARouter(bits=tr.bits or 8, group_size=tr.group_size,
                               stochastic=tr.stochastic, min_numel=self.config.min_numel)

    @classmethod
    def from_config(cls, model: nn.Module, config: Any) -> "ActivationCompressor | None":
        return cls(model, config.compression) if config.compression is not None else None

    def attach(self, ctx: Context) -> None:
        self.install()

    def detach(self) -> None:
        self.remove()

    def _select(self) -> dict[str, list[tuple[str, nn.Module]]]:
        cfg = self.config
        detected = detect_kinds(self.model)
        targets: dict[str, list[tuple[str, nn.Module]]] = {}
        missing: list[str] = []
        other: dict[str, str] = {}  # attention module -> kernel that bypasses SDPA
        for kind in KINDS:
            pat = (cfg.modules or {}).get(kind)
            chosen = detected[kind] if pat is None else \
                select_modules(self.model, pat, field=f"modules[{kind!r}]")
            if kind == "attention":
                kernels = {n: attention_kernel(m) for n, m in chosen}
                other = {n: k for n, k in kernels.items() if k not in ("eager", "sdpa")}
                self.skipped.update({n: f"attention kernel {k!r} bypasses "
                                        "F.scaled_dot_product_attention" for n, k in other.items()})
                chosen = [(n, m) for n, m in chosen if n not in other]
                self.fused = [n for n, _ in chosen if kernels[n] == "sdpa"]
                if not kernels and cfg.enabled(kind):
                    missing.append(kind)
            elif not chosen and cfg.enabled(kind) and kind in ("gelu", "layernorm") \
                    and not (kind == "gelu" and targets.get("mlp")):  # a gated MLP's activation
                missing.append(kind)
            # Linears always get a scope, pass-through when "none": otherwise an
            # enclosing attention scope would quantize their inputs; and under
            # autocast their weight is cast again in backward (compression.recast)
            targets[kind] = chosen if cfg.enabled(kind) or kind in _LINEAR_KINDS else []
        if other:
            warnings.warn(f"SlimFit compression leaves {len(other)} attention module(s) alone: "
                          f"kernel(s) {sorted(set(other.values()))} do not call "
                          "F.scaled_dot_product_attention; "
                          "use attn_implementation='sdpa' or 'eager' to compress attention.",
                          UserWarning, stacklevel=3)
        if missing:
            warnings.warn(f"SlimFit compression: {type(self.model).__name__} has no module of kind "
                          f"{missing}; nothing is compressed for it.", UserWarning, stacklevel=3)
        return targets

    def preview(self) -> dict[str, list[str]]:
        """``{kind: [module names]}`` that will be compressed; ``"fused_attention"``:
        the attention modules among them whose ``F.scaled_dot_product_attention``
        calls are routed (q, k, v saved quantized, attention recomputed in
        backward); ``"skipped"``: modules left alone and, once seen, SDPA calls
        that ran uncompressed, with the reason."""
        out = {k: [n for n, _ in v] for k, v in self.targets.items()}
        out["fused_attention"] = list(self.fused) if self.targets["attention"] else []
        out["skipped"] = [f"{n}: {why}" for n, why in self.skipped.items()]
        out["skipped"] += [f"{n}: F.scaled_dot_product_attention called with {why}: ran "
                           "uncompressed" for n, why in self.sdpa.fallbacks.items()]
        return out

    def install(self) -> "ActivationCompressor":
        if self._handles:
            return self
        # by storage identity: a streamed weight (slimfit.offload.streaming) keeps its storage
        # but not its address, and must still never be quantized
        self._param_storages = {storage_identity(p) for p in self.model.parameters()}
        self._device_type = next(self.model.parameters()).device.type
        for mod in self.model.modules():  # cos/sin: one storage every layer's RoPE saves
            if type(mod).__name__.endswith("RotaryEmbedding"):
                self._handles.append(mod.register_forward_hook(self._record_constants))
        for _, mod in self.targets.get("gelu", []):
            self._fuse_tanh_gelu(mod)
        for kind, mods in self.targets.items():
            tr = None if kind == "dropout_mask" else getattr(self.config, kind)
            for name, mod in mods:
                scope = _Scope(kind, tr, self)
                if kind == "attention":
                    scope.mode = self.sdpa.mode(scope, name)
                self._handles.append(mod.register_forward_pre_hook(lambda *_a, s=scope: s.push()))
                self._handles.append(mod.register_forward_hook(lambda *_a, s=scope: s.pop(),
                                                               always_call=True))
        return self

    def _fuse_tanh_gelu(self, mod: nn.Module) -> None:
        """GPT-2's ``NewGELUActivation`` (and ``FastGELUActivation``) write the
        tanh approximation as five ops, each saving its own input for backward;
        ``F.gelu(approximate="tanh")`` is the same function as one op saving one
        (the input, quantized here). Restored by :meth:`remove`."""
        if type(mod).__name__ in ("NewGELUActivation", "FastGELUActivation") \
                and "forward" not in mod.__dict__:
            mod.forward = lambda x: torch.nn.functional.gelu(x, approximate="tanh")
            self._fused_gelus.append(mod)

    def _record_constants(self, _mod, _args, out) -> None:
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self._constants = {storage_identity(t) for t in outs if isinstance(t, torch.Tensor)}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for mod in self._fused_gelus:
            mod.__dict__.pop("forward", None)
        self._fused_gelus.clear()
        self._constants = set()
        self.sdpa.clear()

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> "ActivationCompressor":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    def describe(self) -> str:
        lines = ["| kind | treatment | modules |", "|---|---|---:|"]
        for kind in KINDS:
            tr = "bit-packed" if kind == "dropout_mask" else getattr(self.config, kind).method
            if kind != "dropout_mask" and getattr(self.config, kind).group_size:
                tr += f" (groups of {getattr(self.config, kind).group_size})"
            n = len(self.targets[kind]) if self.config.enabled(kind) else 0
            if kind == "attention" and n:
                n_sdpa = len(self.fused)
                tr += (f"; {n - n_sdpa} eager (Q, K, V, probabilities), {n_sdpa} SDPA (q, k, v "
                       "per token and head, attention recomputed in backward)")
            lines.append(f"| {kind} | {tr if self.config.enabled(kind) else 'none'} | {n} |")
        if self.skipped or self.sdpa.fallbacks:
            lines.append("left uncompressed: " + "; ".join(self.preview()["skipped"]))
        return "\n".join(lines)

