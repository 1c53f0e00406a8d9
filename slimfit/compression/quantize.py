"""Quantizers for saved activations: affine int8 / int4 with per-token or
per-block scales, round-to-nearest or stochastic rounding, plus lossless bit
packing of boolean masks and top-k pruning.

Free functions over tensors (torchao style), device- and dtype-agnostic: the
maths runs in fp32 whatever the input (fp32, bf16, fp16) and the result is
returned in the input dtype. Affine rather than the paper's fixed-point ranges
(GELU input in [-4, 3.5], Q3.4 for Q/K): a per-group minimum and scale cannot
saturate on outlier channels. int4 packs two codes per byte and handles odd
element counts by padding one code.

Layout: the tensor is flattened and cut into groups of ``group_size``
consecutive elements (``None``: one group per row of the last dimension, i.e.
per token); each group stores ``zero`` (its minimum) and ``scale`` (range /
(2^bits - 1)) in fp32: 8 bytes a group, ~1% of a 768-wide int8 row.
"""

from __future__ import annotations

import dataclasses
import math

import torch

__all__ = ["Quantized", "quantize", "dequantize", "pack_bool", "unpack_bool", "TopK",
           "topk_prune", "topk_restore", "SUPPORTED_BITS"]

SUPPORTED_BITS = (4, 8)


@dataclasses.dataclass
class Quantized:
    """Codes plus per-group affine parameters of one quantized tensor."""

    codes: torch.Tensor  # uint8: one code per byte (8 bit) or two (4 bit)
    zero: torch.Tensor  # (groups, 1) group minimum
    scale: torch.Tensor  # (groups, 1) step size
    bits: int
    shape: torch.Size
    dtype: torch.dtype
    numel: int
    group_size: int

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.zero, self.scale]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _groups(x: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, int]:
    """Flattened fp32 view cut into (groups, group_size), zero-padded at the end."""
    gs = x.shape[-1] if (group_size is None and x.dim() > 0) else (group_size or x.numel())
    gs = max(int(gs), 1)
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % gs
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, gs), gs


def quantize(x: torch.Tensor, bits: int = 8, group_size: int | None = None,
             stochastic: bool = False, generator: torch.Generator | None = None) -> Quantized:
    """Affine-quantize ``x`` to ``bits`` (4 or 8) per group.

    Args:
        x: floating tensor, any shape, any device.
        bits: 8 (one code per byte) or 4 (two codes per byte).
        group_size: elements per scale; ``None``: per row of the last dim.
        stochastic: unbiased stochastic rounding instead of nearest.
        generator: RNG for stochastic rounding.

    Returns:
        A :class:`Quantized`.

    Raises:
        ValueError: unsupported ``bits`` or ``group_size``, or a non-float input.

    Example:
        >>> x = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
        >>> q = quantize(x, bits=8)
        >>> torch.equal(dequantize(q), x)
        True
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}.")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be None (per token) or a positive int, got {group_size!r}.")
    if not x.is_floating_point():
        raise ValueError(f"quantize() needs a floating tensor, got {x.dtype}.")
    g, gs = _groups(x, group_size)
    levels = (1 << bits) - 1
    lo = g.amin(dim=1, keepdim=True)
    hi = g.amax(dim=1, keepdim=True)
    scale = (hi - lo) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant group: any scale
    v = (g - lo) / scale
    if stochastic:
        noise = torch.rand(v.shape, generator=generator, device="cpu" if generator is not None
                           and generator.device.type == "cpu" else v.device)
        v = torch.floor(v + noise.to(v.device))
    else:
        v = torch.round(v)
    codes = v.clamp_(0, levels).to(torch.uint8).view(-1)
    if bits == 4:
        if codes.numel() % 2:
            codes = torch.cat([codes, codes.new_zeros(1)])
        codes = codes[0::2] | (codes[1::2] << 4)
    return Quantized(codes=codes, zero=lo, scale=scale, bits=bits, shape=x.shape, dtype=x.dtype,
                     numel=x.numel(), group_size=gs)


def dequantize(q: Quantized) -> torch.Tensor:
    """Inverse of :func:`quantize` (exact on grid points), in the input's dtype."""
    codes = q.codes
    if q.bits == 4:
        codes = torch.stack([codes & 0x0F, codes >> 4], dim=1).view(-1)
    n_groups = q.zero.shape[0]
    codes = codes[: n_groups * q.group_size].view(n_groups, q.group_size)
    out = codes.float() * q.scale + q.zero
    return out.view(-1)[: q.numel].view(q.shape).to(q.dtype)


def pack_bool(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
    """Pack a bool tensor into bits (8x smaller), losslessly."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8), mask.shape


def unpack_bool(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.view(-1, 1) >> shifts) & 1
    return bits.view(-1)[: math.prod(shape)].view(shape).bool()


@dataclasses.dataclass
class TopK:
    """Per-row top-k of ``|x - mean|``: what LayerNorm's backward needs, pruned."""

    values: torch.Tensor  # (rows, k) centred values, input dtype
    indices: torch.Tensor  # (rows, k) int16 (int32 for rows wider than 32767)
    mean: torch.Tensor  # (rows, 1) fp32
    shape: torch.Size
    dtype: torch.dtype

    def tensors(self) -> list[torch.Tensor]:
        return [self.values, self.indices, self.mean]


def topk_prune(x: torch.Tensor, fraction: float) -> TopK:
    """Keep the ``fraction`` largest ``|x - row mean|`` entries of each last-dim row.

    Restored, the other entries equal the row mean, so a LayerNorm backward
    that recomputes ``(x - mean) * rstd`` sees exactly the kept normalised
    values and zeros elsewhere: the paper's pruning (section 4), per token
    rather than one global top-k over tens of millions of elements.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"top-k fraction must be in (0, 1], got {fraction!r}.")
    rows = x.reshape(-1, x.shape[-1]).float()
    mean = rows.mean(dim=1, keepdim=True)
    centred = rows - mean
    k = max(1, int(round(fraction * rows.shape[1])))
    idx = centred.abs().topk(k, dim=1, sorted=False).indices
    vals = centred.gather(1, idx)
    idx_dtype = torch.int16 if rows.shape[1] <= 32767 else torch.int32
    return TopK(values=vals.to(x.dtype), indices=idx.to(idx_dtype), mean=mean, shape=x.shape,
                dtype=x.dtype)


def topk_restore(t: TopK) -> torch.Tensor:
    width = t.shape[-1]
    out = t.mean.expand(t.values.shape[0], width).clone()
    out.scatter_add_(1, t.indices.long(), t.values.float())
    return out.view(t.shape).to(t.dtype)
