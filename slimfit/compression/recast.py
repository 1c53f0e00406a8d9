"""Linears under mixed precision keep no half-precision copy of their weight:
the copy is cast again from the parameter in backward.

Why: under autocast (Lightning's ``bf16-mixed``, the Trainer's ``bf16=True``)
with fp32 weights, ``F.linear`` casts its weight to bf16 and autograd saves
that cast for the input's gradient, one copy of every weight a step uses
(the tied LM head of a 150k-word vocabulary alone is hundreds of MiB), and an
activation compressor would even quantize it, perturbing every input
gradient. The weight cannot change between forward and backward, so the copy
is recomputable exactly: :class:`RecastLinear` saves the parameter itself (no
new bytes) and the input (through the scope's hooks, so it is compressed as a
dynamic activation), and casts the weight again in backward.

Applied inside the Linear scopes of ``slimfit.compression.compressor`` while
autocast is on: ``F.linear`` calls (``nn.Linear``) and the ``torch.addmm``
of GPT-2's ``Conv1D`` whose weight is a parameter of another dtype are
routed; anything else runs as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["RecastLinear", "RecastMode"]


class RecastLinear(torch.autograd.Function):
    """``y = x W^T + b`` (``conv1d=True``: ``b + x W``) in ``dtype``, saving the
    parameter ``W`` (not its cast) and the cast input."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype, conv1d):
        xa = x.to(dtype)
        wa = weight.to(dtype)  # transient: freed after this op, cast again in backward
        ba = None if bias is None else bias.to(dtype)
        y = torch.addmm(ba, xa, wa) if conv1d and ba is not None else \
            (xa @ wa if conv1d else F.linear(xa, wa, ba))
        ctx.save_for_backward(xa if weight.requires_grad else None, weight)
        ctx.conf = (dtype, conv1d, x.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        xa, weight = ctx.saved_tensors
        dtype, conv1d, x_dtype, bias_dtype = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g = g.to(dtype)
        gx = gw = gb = None
        if need_x:
            wa = weight.to(dtype)
            gx = (g @ wa.t() if conv1d else g @ wa).to(x_dtype)
        if need_w:
            g2, x2 = g.reshape(-1, g.shape[-1]), xa.reshape(-1, xa.shape[-1])
            gw = (x2.t() @ g2 if conv1d else g2.t() @ x2).to(weight.dtype)
        if need_b and bias_dtype is not None:
            gb = g.reshape(-1, g.shape[-1]).sum(0).to(bias_dtype)
        return gx, gw, gb, None, None


def _param(t) -> bool:
    return isinstance(t, nn.Parameter) or isinstance(getattr(t, "_base", None), nn.Parameter)


class RecastMode(TorchFunctionMode):
    """Entered while a Linear (or Conv1D) runs under autocast: routes its
    weight-casting matmul through :class:`RecastLinear`."""

    def __init__(self, device_type: str, dtype: torch.dtype):
        super().__init__()
        self.device_type, self.dtype = device_type, dtype
        self.routed = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and not kwargs and len(args) in (2, 3):
            x, w = args[0], args[1]
            b = args[2] if len(args) == 3 else None
            if self._applies(x, w):
                return self._route(x, w, b, conv1d=False)
        elif func is torch.addmm and not kwargs and len(args) == 3:
            b, x, w = args
            if self._applies(x, w) and x.dim() == 2:
                return self._route(x, w, b, conv1d=True)
        return func(*args, **kwargs)

    def _applies(self, x, w) -> bool:
        return (torch.is_grad_enabled() and _param(w) and w.dtype != self.dtype
                and w.is_floating_point() and type(x) is torch.Tensor
                and (x.requires_grad or w.requires_grad))

    def _route(self, x, w, b, conv1d):
        self.routed += 1
        with torch.autocast(self.device_type, enabled=False):
            return RecastLinear.apply(x, w, b, self.dtype, conv1d)
