"""Training dynamics: how much each trained unit's weights moved in one step.

Score of a unit after an optimizer step (paper, section 1): the mean relative
change ``mean(|W_new - W_old| / (|W_old| + eps))`` over all its elements. It
measures the update the optimizer really applied (after AdamW's moments and
weight decay), not the raw gradient.

What this does better than the reference code:

* only the units trained in this step are snapshotted (at r = 0.9, ~10% of the
  weights, copied just before ``optimizer.step()`` when activations are already
  freed), instead of a permanent second copy of every weight;
* the arithmetic is ``torch._foreach_*`` over the trained tensors and one
  stacked result, so a step costs one device-to-host transfer, not one per
  tensor;
* ``eps`` in the denominator, and NaN/inf results mapped to a finite value, so
  a zero weight cannot produce a NaN that sorts last and is never frozen.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["WeightSnapshot"]


class WeightSnapshot:
    """Copy of the trained units' weights, taken just before the optimizer step.

    Args:
        units: per unit, the parameters that belong to it.
        eps: denominator epsilon.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(4))
        >>> snap = WeightSnapshot([[w]])
        >>> with torch.no_grad():
        ...     _ = w.mul_(1.5)
        >>> snap.scores()
        [0.5]
    """

    def __init__(self, units: Sequence[Sequence[torch.Tensor]], eps: float = 1e-8):
        self._params = [p for u in units for p in u]
        self._sizes = [len(u) for u in units]
        self._numel = [sum(p.numel() for p in u) for u in units]
        self.eps = eps
        # Memory: one copy of the trained units only (~(1 - r) of the weights).
        self._old = torch._foreach_mul(self._params, 1.0) if self._params else []

    def scores(self) -> list[float]:
        """Per-unit mean relative change since the snapshot (one host sync).

        Frees the snapshot. Non-finite results become ``0.0`` for NaN and the
        largest finite float for +inf (a weight that exploded is "moving").
        """
        if not self._params:
            return []
        new = [p.detach() for p in self._params]
        # Transient: |W_new - W_old| for the trained tensors, then in-place ops.
        delta = torch._foreach_sub(new, self._old)
        torch._foreach_abs_(delta)
        torch._foreach_abs_(self._old)
        torch._foreach_add_(self._old, self.eps)
        torch._foreach_div_(delta, self._old)
        self._old = []
        # L1 norm of the non-negative ratios = their sum; fp32 accumulation.
        sums = torch.stack([s.float() for s in torch._foreach_norm(delta, 1)])
        del delta
        per_tensor = sums.cpu().tolist()  # the single device -> host sync of the step
        out, i = [], 0
        for size, numel in zip(self._sizes, self._numel):
            s = sum(per_tensor[i:i + size]) / max(numel, 1)
            i += size
            if s != s:  # NaN
                s = 0.0
            elif s == float("inf"):
                s = 1.7976931348623157e308
            out.append(s)
        return out
