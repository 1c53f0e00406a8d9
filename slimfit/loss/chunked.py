"""Linear + cross-entropy in chunks of tokens: the language-model head's loss
without ever keeping a (tokens x vocab) tensor for backward.

Why: a causal LM computes ``logits = lm_head(hidden)`` and then the
cross-entropy, which upcasts the logits to fp32 and keeps them (or their
softmax) for backward: Llama-3's 128,256-word vocabulary at 4 x 2,048 tokens
is 4.2 GB for the loss alone, more than every other saved activation of a
frozen-mostly step. Here the forward computes, chunk by chunk, the logits,
their log-sum-exp and the target's logit, and keeps only the head's input and
one fp32 number per token; the backward recomputes each chunk's logits and
turns them into the gradients of the input and (if it trains) the head's
weight and bias. The price is one more head matmul in backward, the same
trade torchtune's chunked loss and Liger's fused linear cross-entropy make.

Exact: the same ops in the same dtypes as the unchunked path (under
autocast the chunk's matmul runs in the autocast dtype, the loss in fp32, the
logits' gradient is cast back for the matmuls, as autograd does), so the loss
and gradients equal the unchunked ones up to the order of summation.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from slimfit.errors import SlimFitError

__all__ = ["DEFAULT_CHUNK", "chunked_cross_entropy", "linear_cross_entropy"]

#: tokens per chunk: 1,024 x a 128k vocabulary in fp32 is 512 MiB of transient logits
DEFAULT_CHUNK = 1024


def _autocast_state(device: torch.device) -> tuple:
    t = device.type
    return (torch.is_autocast_enabled(t), torch.get_autocast_dtype(t),
            torch.is_autocast_cache_enabled())


def _under(device: torch.device, state: tuple):
    enabled, dtype, cache = state
    return torch.autocast(device.type, dtype=dtype, enabled=enabled, cache_enabled=cache)


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over valid targets of ``-log softmax(h W^T + b)[target]``, divided by
    ``denom``; saves ``h``, the target indices and one log-sum-exp per token."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, chunk, denom, softcap, autocast):
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)  # (N,) fp32: 4 bytes a token
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.no_grad(), _under(hidden.device, autocast):
            for s in range(0, n, chunk):
                logits = _logits(hidden[s:s + chunk], weight, bias, softcap)  # (chunk, V) fp32
                lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
                t = targets[s:s + chunk]
                valid = t != ignore_index
                picked = logits.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
                total += torch.where(valid, lse[s:s + chunk] - picked, 0.0).sum()
        ctx.save_for_backward(hidden, weight, bias, targets, lse, denom)
        ctx.conf = (ignore_index, chunk, softcap, autocast)
        return total / denom

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse, denom = ctx.saved_tensors
        ignore_index, chunk, softcap, autocast = ctx.conf
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        scale = (grad_out / denom).to(torch.float32)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        dt = autocast[1] if autocast[0] else hidden.dtype  # the dtype the matmuls ran in
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk]
            with torch.enable_grad() if softcap else contextlib.nullcontext(), \
                    _under(hidden.device, autocast):
                raw = F.linear(h, weight, bias).float()  # (chunk, V): recomputed, as in forward
            z = softcap * torch.tanh(raw / softcap) if softcap else raw
            g = torch.exp(z - lse[s:s + chunk].unsqueeze(1))  # softmax
            t = targets[s:s + chunk]
            valid = (t != ignore_index).unsqueeze(1)
            g.scatter_add_(1, t.clamp(min=0).unsqueeze(1), -torch.ones_like(g[:, :1]))
            g = torch.where(valid, g, 0.0) * scale
            if softcap:  # d(cap * tanh(x / cap)) / dx = 1 - tanh(x / cap) ** 2
                g = g * (1 - torch.tanh(raw / softcap) ** 2)
            g = g.to(dt)
            if need_h:
                grad_h[s:s + chunk] = (g @ weight.to(dt)).to(hidden.dtype)
            if need_w:
                grad_w += (g.t() @ h.to(dt)).float()
            if need_b:
                grad_b += g.float().sum(0)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype),
                None, None, None, None, None, None)


def _logits(h, weight, bias, softcap):
    z = F.linear(h, weight, bias).float()
    return softcap * torch.tanh(z / softcap) if softcap else z


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, *, ignore_index: int = -100,
                         chunk_size: int = DEFAULT_CHUNK,
                         num_items_in_batch: torch.Tensor | int | None = None,
                         softcap: float | None = None) -> torch.Tensor:
    """Cross-entropy of ``F.linear(hidden, weight, bias)`` against ``targets``,
    in chunks of ``chunk_size`` rows, never keeping the logits.

    Args:
        hidden: ``(N, H)`` (any leading shape is flattened).
        weight, bias: the head's parameters, ``(V, H)`` and ``(V,)`` or None.
        targets: ``(N,)`` class indices; ``ignore_index`` entries are skipped.
        num_items_in_batch: divide the sum by this (transformers' gradient
            accumulation convention) instead of the number of valid targets.
        softcap: Gemma's final logit soft-capping ``cap * tanh(z / cap)``.

    Returns:
        The mean (or sum / ``num_items_in_batch``) loss, a 0-d fp32 tensor.

    Raises:
        SlimFitError: shapes that do not match, or a bad ``chunk_size``.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise SlimFitError(f"chunk_size must be an int >= 1, got {chunk_size!r}.")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).to(h.device)
    if t.shape[0] != h.shape[0] or weight.shape[-1] != h.shape[-1]:
        raise SlimFitError(f"chunked cross-entropy: {h.shape[0]} hidden rows of width "
                           f"{h.shape[-1]}, {t.shape[0]} targets, a head of shape "
                           f"{tuple(weight.shape)}: they must agree.")
    if num_items_in_batch is None:
        denom = (t != ignore_index).sum().to(torch.float32)  # on the device: no sync
    else:
        denom = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=h.device)
    return _LinearCrossEntropy.apply(h, weight, bias, t, ignore_index, chunk_size, denom,
                                     softcap, _autocast_state(h.device))


def chunked_cross_entropy(hidden: torch.Tensor, head: nn.Module | torch.Tensor,
                          labels: torch.Tensor, *, shift: bool = True, ignore_index: int = -100,
                          chunk_size: int = DEFAULT_CHUNK,
                          num_items_in_batch: torch.Tensor | int | None = None,
                          softcap: float | None = None) -> torch.Tensor:
    """The language-model loss from the last hidden states, for a user who
    computes the loss outside the model: what ``lm_head`` + transformers'
    causal-LM loss compute, without keeping the logits.

    Args:
        hidden: ``(B, T, H)`` hidden states (the input of the LM head).
        head: the LM head (an ``nn.Linear``, tied or not) or its weight.
        labels: ``(B, T)`` token ids, ``ignore_index`` where no loss is wanted.
        shift: predict token t + 1 at position t (transformers' causal-LM
            convention: labels padded with ``ignore_index`` and shifted);
            ``False``: labels aligned with positions (masked LM, seq2seq).

    Example:
        >>> head = nn.Linear(8, 50, bias=False)
        >>> h, labels = torch.randn(2, 5, 8), torch.randint(0, 50, (2, 5))
        >>> ref = F.cross_entropy(head(h)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1))
        >>> torch.allclose(chunked_cross_entropy(h, head, labels, chunk_size=3), ref)
        True
    """
    if isinstance(head, nn.Module):
        weight, bias = head.weight, getattr(head, "bias", None)
    else:
        weight, bias = head, None
    if shift:
        labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return linear_cross_entropy(hidden, weight, bias, labels, ignore_index=ignore_index,
                                chunk_size=chunk_size, num_items_in_batch=num_items_in_batch,
                                softcap=softcap)
