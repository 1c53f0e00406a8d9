"""Training dynamics: how much each trained unit still learns, measured around
one optimizer step.

Four scores (``SlimFitConfig.score``), each a dimensionless number per unit so
that units of different sizes and kinds (LayerNorm gains ~1, embedding tables,
weight matrices with entries ~0.03) are ranked on one scale:

* ``"paper"`` (section 1 of arXiv 2305.18513, the default): the mean relative
  change ``mean(|W_new - W_old| / (|W_old| + eps))`` over all the unit's
  elements. Kept exactly as the paper defines it (whole tables included) so
  an ablation compares against the paper itself. Under AdamW every element
  moves by about the learning rate, so this mostly ranks tensors by how small
  their entries are, and a near-zero entry inflates it.
* ``"update_norm"``: ``||dW||_2 / (||W_old||_2 + eps)``, the update-to-weight
  norm ratio. Both norms grow as sqrt(numel), so size cancels; a ratio of
  norms is not blown up by individual near-zero entries as the per-element
  ratio is. Still a relative change: it measures the update the optimizer
  really applied (moments, weight decay, clipping included).
* ``"grad_norm"``: ``||g||_2 / (||W||_2 + eps)``, the relative change plain SGD
  would make per unit of learning rate: the raw learning signal, free of
  Adam's per-element normalisation (which makes every update ~lr) and of the
  learning-rate schedule. ``g`` is the gradient the optimizer is about to use
  (after backward and unscaling, before the step); ``W`` the weights after the
  step (the one norm that also catches an optimizer writing NaN).
* ``"fisher"``: ``mean(g^2) * mean(W^2)``, the diagonal empirical Fisher
  information normalised per unit by the unit's mean square weight. ``g * W``
  is the loss change of a relative perturbation of the weights (the gradient
  with respect to ``log|W|``), so this product does not change when a tensor
  is rescaled (W -> cW, g -> g/c): LayerNorm gains and small-entry matrices
  compete in the same unit (loss^2), and the means make it independent of the
  tensor's size. It is the Fisher saliency of pruning (Optimal Brain Damage
  with the Fisher as the Hessian), taken over the unit.

No normalisation makes the kinds equal, and each score leans its own way. A
3-step probe on the pretrained MiniLM (AdamW, lr 1e-4, all 53 units
measured) put in the top 10%: matrices only (``"paper"``, LayerNorm gains
last, ~100x lower); the pooler, embeddings and matrices (``"update_norm"``,
LayerNorm gains last); embeddings, the pooler, LayerNorm gains and matrices
mixed (``"grad_norm"``); LayerNorm gains only (``"fisher"``: one gain rescales
a feature for every token, far more leverage per element than a matrix
entry). The fidelity study (issue 12) decides between them.

Sparse-row tables (embeddings: only the rows of the batch's tokens get a
gradient) are scored by the three new scores over the rows that were used, the
rows with a non-zero gradient, not the whole table: otherwise a 30k-row table
that moved 200 rows looks converged. The rows are read from the gradient, not
the update: AdamW moves every row of a table through weight decay and the rows
of earlier batches through momentum.

What this does better than the reference code:

* only the units trained in this step are read, and the update scores copy
  just those weights (at r = 0.9, ~10% of the weights, copied when
  activations are already freed); the gradient scores copy nothing;
* the arithmetic is ``torch._foreach_*`` over the trained tensors plus one
  stacked result: one device-to-host transfer per step, which also carries
  the "loss was finite" flag, so non-finite detection costs no extra sync;
* ``eps`` in the denominators, and NaN/inf reported faithfully (not mapped to
  numbers), so the caller can refuse to record a step whose scores are garbage.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from slimfit.errors import SlimFitError
from slimfit.storage import local

__all__ = ["SCORES", "Measurement", "WeightSnapshot"]

#: The score names ``SlimFitConfig.score`` accepts.
SCORES = ("paper", "update_norm", "grad_norm", "fisher")
_UPDATE_SCORES = ("paper", "update_norm")


class Measurement(NamedTuple):
    """One step's scores, as measured.

    Attributes:
        scores: per unit, NaN and inf kept as they are.
        loss_finite: the loss flag given to :meth:`WeightSnapshot.measure`
            (True when none was given).
    """

    scores: list[float]
    loss_finite: bool = True

    @property
    def finite(self) -> bool:
        """The loss and every score are finite: the step may be recorded."""
        return self.loss_finite and all(math.isfinite(s) for s in self.scores)


def _norms(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per-tensor L2 norms, accumulated in fp32, on the device (no sync)."""
    return list(torch._foreach_norm(tensors, 2, dtype=torch.float32)) if tensors else []


def _row_norm(t: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """``||t[used]||_2`` without boolean indexing (which would sync): row norms,
    masked. ``t``: (rows, ...) ; ``used``: (rows,) bool."""
    rows = torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1, dtype=torch.float32)
    return torch.linalg.vector_norm(rows * used)


def _used_rows(p: torch.Tensor) -> torch.Tensor:
    """(rows,) bool: rows of ``p`` (this rank's shard) with a non-zero gradient."""
    g = None if p.grad is None else local(p.grad)
    p = local(p)
    if g is None:
        return torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
    if g.is_sparse:  # nn.Embedding(sparse=True)
        used = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
        return used.index_fill_(0, g.coalesce().indices()[0], True)
    return g.reshape(g.shape[0], -1).ne(0).any(dim=1)


def _grad_norms(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per-parameter gradient L2 norms (fp32, on the device; 0 without a gradient;
    of this rank's shard for a sharded parameter)."""
    dense = [local(p.grad) for p in params if p.grad is not None and not p.grad.is_sparse]
    it = iter(_norms(dense))
    out = []
    for p in params:
        g = p.grad
        if g is None:
            out.append(torch.zeros((), dtype=torch.float32, device=p.device))
        elif g.is_sparse:  # nn.Embedding(sparse=True)
            out.append(torch.linalg.vector_norm(g.coalesce().values(), dtype=torch.float32))
        else:
            out.append(next(it))
    return out


class WeightSnapshot:
    """What the trained units looked like just before the optimizer step: a
    copy of their weights (update scores) or their gradient norms (gradient
    scores). Build it after backward, before ``optimizer.step()``; call
    :meth:`measure` after the step.

    Args:
        units: per unit, the parameters that belong to it.
        eps: denominator epsilon.
        score: one of :data:`SCORES`.
        row_sparse: parameters scored over their used rows (embedding tables);
            ignored by ``"paper"``.

    Raises:
        SlimFitError: an unknown ``score``.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(4))
        >>> snap = WeightSnapshot([[w]])
        >>> with torch.no_grad():
        ...     _ = w.mul_(1.5)
        >>> snap.scores()
        [0.5]
    """

    def __init__(self, units: Sequence[Sequence[torch.Tensor]], eps: float = 1e-8,
                 score: str = "paper", row_sparse: Sequence[torch.Tensor] = (),
                 keep_weights: bool = False):
        if score not in SCORES:
            raise SlimFitError(f"score must be one of {', '.join(map(repr, SCORES))}, "
                               f"got {score!r}.")
        self.score, self.eps = score, eps
        self._params = [p for u in units for p in u]
        self._local = [local(p) for p in self._params]  # FSDP2: this rank's shard of each
        self._group = next((p.device_mesh.get_group() for p, q in zip(self._params, self._local)
                            if q is not p), None)  # sharded: per-tensor sums all-reduced
        self._sizes = [len(u) for u in units]
        sparse = {id(p) for p in row_sparse}
        # Rows used this step, (rows,) bool per table; None for dense tensors.
        self._used = [_used_rows(p) if score != "paper" and id(p) in sparse and p.dim() >= 2
                      else None for p in self._params]
        with torch.no_grad():
            if score in _UPDATE_SCORES or keep_weights:
                # Memory: one copy of the trained units only (~(1 - r) of the weights).
                self._old = torch._foreach_mul([p.detach() for p in self._local], 1.0) \
                    if self._params else []
                self._gnorm = []
            if score not in _UPDATE_SCORES:  # gradient scores: their norms, before the step
                self._gnorm = _grad_norms(self._params)
            if not (score in _UPDATE_SCORES or keep_weights):
                self._old = []

    def scale_update(self, factor: float) -> None:
        """Make the step just taken ``factor`` times as large: ``W <- W_old +
        factor * (W - W_old)`` (needs ``keep_weights`` or an update score).
        In place, no extra memory: the weight copy exists already."""
        if self._params and len(self._old) != len(self._params):
            raise SlimFitError("scale_update() needs a snapshot built with keep_weights=True.")
        with torch.no_grad():
            live = [p.detach() for p in self._local]
            torch._foreach_sub_(live, self._old)
            torch._foreach_mul_(live, factor)
            torch._foreach_add_(live, self._old)

    def _weight_norms(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        dense = [t for t, u in zip(tensors, self._used) if u is None]
        it = iter(_norms(dense))
        return [next(it) if u is None else _row_norm(t, u) for t, u in zip(tensors, self._used)]

    def measure(self, loss_finite: torch.Tensor | bool | None = None) -> Measurement:
        """Per-unit scores since the snapshot, in one device-to-host sync.

        Frees the snapshot.

        Args:
            loss_finite: optional bool tensor (any device, not yet synced) or
                bool, "the step's loss was finite"; it travels with the scores
                in the same transfer.

        Returns:
            A :class:`Measurement` (NaN/inf scores kept as measured).
        """
        flag = loss_finite if torch.is_tensor(loss_finite) else None  # read after the sync
        host_flag = bool(loss_finite) if flag is None and loss_finite is not None else True
        if not self._params:
            ok = host_flag and (flag is None or bool(flag.all()))  # the only sync
            return Measurement([], ok)
        with torch.no_grad():
            vals = self._device_values()
            if self._group is not None:
                vals = self._all_reduce(vals)
        dev = vals[0][0].device
        cols = [torch.stack([v.to(dev, torch.float32) for v in col]) for col in vals]
        if flag is not None:
            cols.append(flag.detach().all().to(dev, torch.float32).reshape(1))
        host = torch.cat(cols).cpu().tolist()  # the single device -> host sync of the step
        n = len(self._params)
        cols_host = [host[i * n:(i + 1) * n] for i in range(len(vals))]
        if flag is not None:
            host_flag = host[-1] == 1.0
        return Measurement(self._per_unit(cols_host), host_flag)

    def scores(self) -> list[float]:
        """Per-unit scores since the snapshot (one host sync); see :meth:`measure`."""
        return self.measure().scores

    def _all_reduce(self, vals: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        """Whole-tensor values from the shards' (FSDP2): every rank then holds the
        same scores. Sums (the paper's L1, row counts) add up; L2 norms add up
        as squares. One collective per step, over the stacked values."""
        l2 = [False] if self.score == "paper" else [True, True] + [False] * (len(vals) - 2)
        flat = torch.stack([v.to(torch.float32) ** 2 if sq else v.to(torch.float32)
                            for col, sq in zip(vals, l2) for v in col])
        torch.distributed.all_reduce(flat, group=self._group)
        n = len(self._params)
        return [[flat[c * n + i].sqrt() if sq else flat[c * n + i] for i in range(n)]
                for c, sq in enumerate(l2)]

    def _device_values(self) -> list[list[torch.Tensor]]:
        """Per-tensor 0-d device values, one list per quantity (no sync; of this
        rank's shard for a sharded parameter)."""
        new = [p.detach() for p in self._local]
        if self.score == "paper":
            # Transient: |W_new - W_old| for the trained tensors, then in-place ops.
            delta = torch._foreach_sub(new, self._old)
            torch._foreach_abs_(delta)
            torch._foreach_abs_(self._old)
            torch._foreach_add_(self._old, self.eps)
            torch._foreach_div_(delta, self._old)
            self._old = []
            # L1 norm of the non-negative ratios = their sum; fp32 accumulation.
            return [list(torch._foreach_norm(delta, 1, dtype=torch.float32))]
        if self.score == "update_norm":
            delta = torch._foreach_sub(new, self._old)
            out = [self._weight_norms(delta), self._weight_norms(self._old)]
            self._old = []
            return out
        gnorm, self._gnorm = self._gnorm, []
        out = [gnorm, self._weight_norms(new)]
        if self.score == "fisher":  # rows used per table (dense tensors: counted on the host)
            out.append([p.new_zeros((), dtype=torch.float32) if u is None else u.sum()
                        for p, u in zip(self._params, self._used)])
        return out

    def _per_unit(self, cols: list[list[float]]) -> list[float]:
        """Combine per-tensor host values into per-unit scores (float64 on the host)."""
        out, i = [], 0
        for size in self._sizes:
            part = [c[i:i + size] for c in cols]
            i += size
            if self.score == "paper":
                numel = sum(p.numel() for p in self._params[i - size:i])
                out.append(sum(part[0]) / max(numel, 1))
                continue
            num = math.sqrt(sum(x * x for x in part[0]))  # ||dW|| or ||g||
            den = math.sqrt(sum(x * x for x in part[1]))  # ||W||
            if self.score == "fisher":  # elements scored: used rows x row size for tables
                n = sum(p.numel() if u is None else rows * (p.numel() // max(p.shape[0], 1))
                        for p, u, rows in zip(self._params[i - size:i], self._used[i - size:i],
                                              part[2]))
                out.append((num * num / n) * (den * den / n) if n > 0 else 0.0)
            else:
                out.append(num / (den + self.eps))
        return out
