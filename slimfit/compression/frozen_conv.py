"""Convolutions with a frozen weight keep nothing they do not need for backward.

Why: PyTorch's convolution is one autograd op for input, weight and bias, and
it saves its input (and weight) whenever any of the three needs a gradient.
Under SlimFit a convolution's weight is frozen in most steps while its bias,
never a freezing candidate (biases are always trained), still needs its
gradient, which is only the sum of the output gradient. So a ViT's patch
embedding keeps the pixels alive for nothing (ViT-B/16 at 224 px: 0.57 MiB
per example in fp32), and so does every frozen convolution with a bias in a
convolutional stem, for its input.

How: while a convolution module whose weight does not require grad runs, its
``F.conv1d/2d/3d`` call is rerouted (a :class:`TorchFunctionMode` entered in
the module's forward pre-hook and left in its forward hook, ``always_call``;
nothing in ``torch`` is patched). The convolution runs without its bias,
under ``no_grad`` when its input needs no gradient (nothing saved), else in
:class:`_FrozenWeightConv`, which saves only the weight (a parameter: no new
bytes) and computes the input gradient with the same aten op PyTorch's
backward uses (``convolution_backward``, input mask only). The bias is added
afterwards (an add saves nothing). Same values as the plain op up to the
rounding of that one add; under autocast in its dtype, as the plain op.
Steps where the weight trains, calls with string ``padding="same"`` and
calls without grad run the plain op.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from slimfit.parts import Context, Part
from slimfit.selection import is_compiled

__all__ = ["FrozenConvRouter"]

_CONV = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _tuple(v: Any, nd: int) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [int(v)] * nd


class _FrozenWeightConv(torch.autograd.Function):
    """Bias-free convolution with a frozen weight: saves the weight only."""

    @staticmethod
    def forward(ctx, func, x, weight, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)  # a parameter (or its view): no new bytes
        ctx.conf = (tuple(x.shape), stride, padding, dilation, groups, _CONV[func])
        return func(x, weight, None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups, nd = ctx.conf
        # PyTorch's own conv*d_input does the same: an expanded one-element stand-in
        # for the input, whose values the input gradient never reads.
        unbatched = len(shape) == nd + 1  # F.conv*d takes (C, *spatial) too; the aten op does not
        if unbatched:
            shape, grad = (1, *shape), grad.unsqueeze(0)
        stand_in = grad.new_empty(1).expand(shape)
        gx = torch.ops.aten.convolution_backward(
            grad, stand_in, weight, None, _tuple(stride, nd), _tuple(padding, nd),
            _tuple(dilation, nd), False, [0] * nd, groups, (True, False, False))[0]
        return None, (gx[0] if unbatched else gx), None, None, None, None, None


def frozen_weight_conv(func, args: tuple, kwargs: dict) -> torch.Tensor:
    """``func(*args, **kwargs)`` (an ``F.conv*d`` call) saving no input when the
    weight is frozen; the plain call when that saves nothing or cannot apply."""
    b = dict(zip(_NAMES, args))
    b.update(kwargs)
    for k, v in _DEFAULTS.items():
        b.setdefault(k, v)
    x, w, bias, padding = b["input"], b["weight"], b["bias"], b["padding"]
    needs_bias = bias is not None and bias.requires_grad
    if w.requires_grad or not torch.is_grad_enabled() or isinstance(padding, str) \
            or not (x.requires_grad or needs_bias) or len(b) != len(_NAMES):
        return func(*args, **kwargs)
    conf = (b["stride"], padding, b["dilation"], b["groups"])
    dev, plain_dtypes = x.device.type, contextlib.nullcontext()
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        # what autocast does to the plain op: input, weight and bias in its dtype (the
        # weight's cast is saved instead of the input's; it is transient either way)
        dt = torch.get_autocast_dtype(dev)
        x, w = x.to(dt), w.to(dt)
        bias = None if bias is None else bias.to(dt)
        plain_dtypes = torch.autocast(dev, enabled=False)
    with plain_dtypes:
        if x.requires_grad:
            y = _FrozenWeightConv.apply(func, x, w, *conf)
        else:
            with torch.no_grad():
                y = func(x, w, None, *conf)
        # (C, 1, ..., 1): broadcasts over batched and unbatched outputs alike
        return y if bias is None else y + bias.reshape(-1, *([1] * _CONV[func]))


class _Mode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CONV:
            return frozen_weight_conv(func, args, kwargs)
        return func(*args, **kwargs)


class FrozenConvRouter(Part):
    """Hooks on every convolution of ``model`` (``nn.Conv1d/2d/3d`` and subclasses,
    not transposed) so that its steps with a frozen weight save no input.

    Example:
        >>> conv = nn.Conv2d(3, 8, 4, stride=4)
        >>> router = FrozenConvRouter(conv).install()
        >>> conv.weight.requires_grad_(False)
        Parameter containing:...
        >>> conv(torch.randn(2, 3, 8, 8)).sum().backward()  # saves no pixels
        >>> router.remove()
    """

    name = "frozen_conv"

    def __init__(self, model: nn.Module):
        self.modules = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)
                        and not m.transposed]
        self._handles: list[Any] = []
        self._active: list[_Mode | None] = []

    @classmethod
    def from_config(cls, model: nn.Module, config: Any) -> "FrozenConvRouter | None":
        # with freezing only (a weight is frozen in most steps); not under torch.compile,
        # whose graphs would break at the hooks' function mode
        if config.freezing is None or is_compiled(model):
            return None
        return cls(model)

    def attach(self, ctx: Context) -> None:
        self.install()

    def detach(self) -> None:
        self.remove()

    def install(self) -> "FrozenConvRouter":
        if not self._handles:
            for m in self.modules:
                self._handles.append(m.register_forward_pre_hook(self._enter))
                self._handles.append(m.register_forward_hook(self._leave, always_call=True))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        while self._active:  # a forward that raised before its forward hook ran
            mode = self._active.pop()
            if mode is not None:
                mode.__exit__(None, None, None)

    def _enter(self, module: nn.Module, args: Any) -> None:
        w = getattr(module, "weight", None)
        mode = _Mode() if isinstance(w, torch.Tensor) and not w.requires_grad \
            and torch.is_grad_enabled() else None
        if mode is not None:
            mode.__enter__()
        self._active.append(mode)

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        mode = self._active.pop() if self._active else None
        if mode is not None:
            mode.__exit__(None, None, None)
