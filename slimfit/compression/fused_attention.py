"""Compression inside fused attention: ``F.scaled_dot_product_attention``
(SDPA) called inside a compressed attention scope runs through
:class:`CompressedSDPA`, which saves q, k and v quantized (per token and head)
instead of what the fused kernel saves, and never a T x T tensor.

Interception: the attention scope of ``slimfit.compression.compressor`` enters a
:class:`torch.overrides.TorchFunctionMode` in the module's forward pre-hook
and leaves it in its forward hook (``always_call``), so only SDPA calls made
while that module runs are rerouted (Hugging Face ``sdpa``, timm
``fused_attn``, any model); nothing in ``torch`` is patched, and nothing is
left once the hooks are removed.

Forward: SDPA itself (flash / memory-efficient on CUDA, flash or math on
CPU, whichever PyTorch picks), with grad disabled; so the output and the RNG
stream are the plain call's. With dropout it runs on leaves requiring grad as
the caller's inputs do, its graph dropped at once: PyTorch's kernel choice
may depend on requires_grad, and only the same kernel draws the same mask.
Saved, through the hooks outside SlimFit's scopes (the ledger, activation
offload): q, k, v quantized with the attention treatment (int8 per row of
the innermost dim: per token and head), the mask in its smallest exact form
(a padding mask as one row, one storage for all layers), and with dropout
the device RNG state from before the call.

Backward: recompute (option b), not the fused backward ops (option a). The
backward kernels are private aten ops (``_scaled_dot_product_flash_attention_
for_cpu_backward``, ``_efficient_attention_backward``, ``_flash_attention_
backward``, cuDNN's) whose signatures, mask support, GQA handling and dropout
RNG conventions (philox seed/offset tensors) differ per backend and have
changed across releases, and which one ran is decided in C++ and not
reported; they also need the output and logsumexp saved. The recompute uses
only the public function: attention is run again from the restored q, k, v
with autograd on, under the saved RNG state (the same dropout mask) and the
forward's autocast state, and differentiated. That covers every mask,
causal, GQA (``enable_gqa``), dropout, dtype and device alike. It costs one
attention forward in backward and that layer's attention workspace,
transiently (on CPU with dropout, the math kernel's T x T probabilities, freed
when the layer's backward ends). Restored operands keep the originals'
stride order, so the recompute picks the forward's kernel.

Calls the route cannot take (an unknown argument, tensor subclasses, nested
tensors, a mask that requires grad) run the plain op, uncompressed, with one
warning per reason; calls with nothing to differentiate run the plain op.
Double backward through a routed call is not supported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from slimfit.compression.quantize import dequantize, pack_bool, quantize, unpack_bool
from slimfit.storage import storage_identity

__all__ = ["CompressedSDPA", "SDPARouter"]

_SDPA = F.scaled_dot_product_attention  # the builtin: what a TorchFunctionMode receives
_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
             "enable_gqa": False}


def _bind(args: tuple, kwargs: dict) -> dict | None:
    """SDPA's arguments by name, or None for a signature this module does not know."""
    if len(args) > len(_PARAMS):
        return None
    bound = dict(zip(_PARAMS, args))
    for k, v in kwargs.items():
        if k not in _PARAMS or k in bound:
            return None
        bound[k] = v
    if any(p not in bound for p in _PARAMS[:3]):
        return None
    return {**_DEFAULTS, **bound}


def _unsupported(b: dict) -> str | None:
    """Why the compressed route cannot take this call, or None."""
    for name in _PARAMS[:3]:
        t = b[name]
        if type(t) not in (torch.Tensor, nn.Parameter):
            return f"a {name} of type {type(t).__name__} (tensor subclasses are not supported)"
        if t.is_nested:
            return "nested tensors"
        if not t.is_floating_point():
            return f"a {t.dtype} {name}"
    m = b["attn_mask"]
    if m is not None:
        if isinstance(m, torch.Tensor) and m.requires_grad:
            return "an attn_mask that requires grad (a learned bias: its gradient is T x T)"
        if type(m) is not torch.Tensor:
            return f"an attn_mask of type {type(m).__name__}"
    return None


def _stride_order(t: torch.Tensor) -> tuple[int, ...]:
    """Dimensions from outermost to innermost in memory (stable on ties)."""
    return tuple(sorted(range(t.dim()), key=lambda d: -t.stride(d)))


# ----------------------------------------------------------------------------
# The mask: saved in its smallest exact form, once for all layers
# ----------------------------------------------------------------------------


class _MaskStore:
    """One-entry cache: the mask of the last call and its saved form. Every
    layer of a forward passes the same mask, so its form is computed (one
    comparison, one host sync) and stored once; all layers save one storage."""

    def __init__(self):
        self._entry: tuple[Any, torch.Tensor, tuple] | None = None

    def clear(self) -> None:
        self._entry = None

    def save(self, mask: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        key = (storage_identity(mask), mask.storage_offset(), tuple(mask.shape), mask.stride(),
               mask.dtype, mask._version)
        if self._entry is None or self._entry[0] != key:
            # the original is held with its key, so no other tensor can take its address
            self._entry = (key, mask, self._compact(mask))
        return self._entry[2]

    @staticmethod
    def _compact(mask: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        shape, contiguous = tuple(mask.shape), mask.is_contiguous()
        small = mask
        for d in range(mask.dim()):  # broadcast (stride 0) dims: one slice
            if mask.stride(d) == 0 and mask.shape[d] > 1:
                small = small.narrow(d, 0, 1)
        if small.dim() >= 2 and small.shape[-2] > 1:
            row = small.narrow(-2, 0, 1)
            # a padding mask: every query row alike -> (B, 1, 1, S) instead of (B, 1, T, S)
            if torch.equal(small, row.expand_as(small)):
                small = row
        if small.numel() < mask.numel():
            return small.clone(), ("expand", shape, contiguous)
        if mask.dtype == torch.bool:  # causal + padding: bits, 8x smaller
            packed, _ = pack_bool(mask)
            return packed, ("bits", shape, contiguous)
        return mask, ("ref", shape, contiguous)  # by reference, as the plain kernels keep it

    @staticmethod
    def restore(saved: torch.Tensor, form: tuple) -> torch.Tensor:
        how, shape, contiguous = form
        if how == "ref":
            return saved
        out = saved.expand(shape) if how == "expand" else unpack_bool(saved, torch.Size(shape))
        return out.contiguous() if contiguous else out


# ----------------------------------------------------------------------------
# The autograd function
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Call:
    """The non-tensor part of one call: SDPA options and how to restore."""

    dropout_p: float
    is_causal: bool
    scale: float | None
    enable_gqa: bool
    bits: int
    group_size: int | None
    stochastic: bool
    mask_form: tuple | None = None
    rng: torch.Tensor | None = None
    autocast: tuple | None = None
    operands: list = dataclasses.field(default_factory=list)  # (perm, Quantized without tensors)

    def kwargs(self, mask: torch.Tensor | None) -> dict:
        kw = dict(attn_mask=mask, dropout_p=self.dropout_p, is_causal=self.is_causal,
                  scale=self.scale)
        if self.enable_gqa:  # passed only when set: the same call as the user's
            kw["enable_gqa"] = True
        return kw


def _get_rng(device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return torch.get_rng_state()
    return torch.get_device_module(device.type).get_rng_state(device)


def _set_rng(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.get_device_module(device.type).set_rng_state(state, device)


@contextlib.contextmanager
def _rng_state(device: torch.device, state: torch.Tensor | None):
    """Run under ``state`` (the forward's), then put the current state back."""
    if state is None:
        yield
        return
    now = _get_rng(device)
    _set_rng(device, state)
    try:
        yield
    finally:
        _set_rng(device, now)


def _keep(t: torch.Tensor) -> torch.Tensor:
    # detach: a saved output must not hold its own grad_fn (reference cycle)
    return t.detach()


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


class CompressedSDPA(torch.autograd.Function):
    """SDPA whose saved state is q, k, v quantized; backward recomputes the
    attention (module docstring). Called by :class:`SDPARouter` with the hooks
    outside SlimFit's scopes active, so what it saves goes to them."""

    @staticmethod
    def forward(ctx, q, k, v, mask, mask_saved, call: _Call):
        dev = q.device
        call.rng = _get_rng(dev) if call.dropout_p > 0 else None
        call.autocast = (torch.is_autocast_enabled(dev.type), torch.get_autocast_dtype(dev.type),
                         torch.is_autocast_cache_enabled())
        if call.dropout_p > 0:
            # As the plain call runs (inputs requiring grad), so PyTorch picks the
            # kernel it would pick there and in the recompute (its choice may
            # depend on requires_grad): the same kernel draws the same dropout
            # mask. The graph is dropped at once; its saves stay out of the hooks.
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_keep, _same):
                leaves = [x.detach().requires_grad_(x.requires_grad) for x in (q, k, v)]
                out = _SDPA(*leaves, **call.kwargs(mask)).detach()
        else:
            with torch.no_grad():
                out = _SDPA(q, k, v, **call.kwargs(mask))
        pieces = []
        for x in (q, k, v):
            perm = _stride_order(x)
            # groups along the innermost dim: per token and head for (B, H, T, D)
            z = quantize(x.detach().permute(perm), bits=call.bits, group_size=call.group_size,
                         stochastic=call.stochastic)
            pieces += z.tensors()
            call.operands.append((perm, dataclasses.replace(z, codes=None, zero=None, scale=None)))
        ctx.save_for_backward(*pieces, mask_saved)
        ctx.call = call
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        call: _Call = ctx.call
        saved = ctx.saved_tensors
        restored = []
        for i, (perm, meta) in enumerate(call.operands):
            z = dataclasses.replace(meta, codes=saved[3 * i], zero=saved[3 * i + 1],
                                    scale=saved[3 * i + 2])
            inv = [0] * len(perm)
            for j, d in enumerate(perm):
                inv[d] = j
            restored.append(dequantize(z).permute(inv))  # the original's stride order
        mask = None if saved[9] is None else _MaskStore.restore(saved[9], call.mask_form)
        need = ctx.needs_input_grad[:3]
        leaves = [x.detach().requires_grad_(n) for x, n in zip(restored, need)]
        enabled, dtype, cache = call.autocast
        # the recompute's own saved tensors are backward workspace, freed in this
        # call: kept on the device, out of the ledger and activation offload
        with torch.enable_grad(), _rng_state(grad_out.device, call.rng), \
                torch.autocast(grad_out.device.type, dtype=dtype, enabled=enabled,
                               cache_enabled=cache), \
                torch.autograd.graph.saved_tensors_hooks(_keep, _same):
            out = _SDPA(*leaves, **call.kwargs(mask))
        wrt = [x for x in leaves if x.requires_grad]
        grads = iter(torch.autograd.grad(out, wrt, grad_out))
        return (*(next(grads) if n else None for n in need), None, None, None)


# ----------------------------------------------------------------------------
# Routing the calls of one compressor
# ----------------------------------------------------------------------------


class _SDPAMode(TorchFunctionMode):
    """Entered while one attention module runs: reroutes its SDPA calls."""

    def __init__(self, router: "SDPARouter", scope: Any, name: str):
        super().__init__()
        self.router, self.scope, self.name = router, scope, name

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            return self.router.call(self.scope, self.name, args, kwargs)
        return func(*args, **kwargs)


class SDPARouter:
    """The SDPA calls of one :class:`slimfit.compression.compressor.ActivationCompressor`.

    Args:
        bits: 8 or 4, the attention treatment's width.
        group_size: elements per scale (``None``: per row, i.e. per token and head).
        stochastic: stochastic rounding.
        min_numel: calls whose q, k, v are all smaller run the plain op.

    Attributes:
        fallbacks: ``{module name: reason}`` of calls that ran uncompressed.
        routed: number of calls routed through :class:`CompressedSDPA`.
    """

    def __init__(self, *, bits: int, group_size: int | None, stochastic: bool, min_numel: int):
        self.bits, self.group_size, self.stochastic = bits, group_size, stochastic
        self.min_numel = min_numel
        self.fallbacks: dict[str, str] = {}
        self.routed = 0
        self._warned: set[str] = set()
        self._masks = _MaskStore()

    def mode(self, scope: Any, name: str) -> TorchFunctionMode:
        """The mode the attention scope ``scope`` (of module ``name``) enters;
        ``scope.outer`` is read at each call: the hooks outside SlimFit's."""
        return _SDPAMode(self, scope, name)

    def clear(self) -> None:
        self._masks.clear()

    def call(self, scope: Any, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
        outer = scope.outer or (_keep, _same)
        b = _bind(args, kwargs)
        reason = "arguments this SlimFit does not know" if b is None else _unsupported(b)
        if reason is None and not (torch.is_grad_enabled() and any(
                b[n].requires_grad for n in _PARAMS[:3])):
            return _SDPA(*args, **kwargs)  # nothing to save
        if reason is not None:
            self._fall_back(name, reason)
        if reason is not None or max(b[n].numel() for n in _PARAMS[:3]) < self.min_numel:
            # what the plain kernel saves goes past the attention scope, unquantized
            with torch.autograd.graph.saved_tensors_hooks(*outer):
                return _SDPA(*args, **kwargs)
        call = _Call(dropout_p=float(b["dropout_p"]), is_causal=bool(b["is_causal"]),
                     scale=b["scale"], enable_gqa=bool(b["enable_gqa"]), bits=self.bits,
                     group_size=self.group_size, stochastic=self.stochastic)
        mask, mask_saved = b["attn_mask"], None
        if mask is not None:
            mask_saved, call.mask_form = self._masks.save(mask)
        self.routed += 1
        with torch.autograd.graph.saved_tensors_hooks(*outer):
            return CompressedSDPA.apply(b["query"], b["key"], b["value"], mask, mask_saved, call)

    def _fall_back(self, name: str, reason: str) -> None:
        self.fallbacks.setdefault(name, reason)
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"SlimFit compression: F.scaled_dot_product_attention in {name!r} was "
                          f"called with {reason}; such calls run uncompressed (the plain op). "
                          "Warned once.", UserWarning, stacklevel=4)
