"""The training-dynamics scores on hand-made tensors, each against a brute-force
reference; the sparse-row case; NaN/inf reported faithfully; one host sync."""

import math

import pytest
import torch

from slimfit import SlimFitError
from slimfit.freezing.scores import SCORES, WeightSnapshot

EPS = 1e-8


def make_units():
    """Unit A: a matrix and a vector (one group); unit B: an embedding table
    whose gradient touches rows 1, 3 and 7 only; unit C: a LayerNorm-like gain ~1."""
    g = torch.Generator().manual_seed(0)
    a1 = torch.nn.Parameter(torch.randn(5, 3, generator=g) * 0.05)
    a2 = torch.nn.Parameter(torch.randn(7, generator=g) * 0.05)
    table = torch.nn.Parameter(torch.randn(10, 4, generator=g))
    gain = torch.nn.Parameter(1 + 0.1 * torch.randn(6, generator=g))
    for p in (a1, a2, gain):
        p.grad = torch.randn(p.shape, generator=g)
    table.grad = torch.zeros_like(table)
    table.grad[[1, 3, 7]] = torch.randn(3, 4, generator=g)
    return [[a1, a2], [table], [gain]], table


def adamw_like_step(units, lr=1e-2, wd=0.1):
    """Moves every element: ``lr * sign(g)`` plus weight decay on all rows (as AdamW
    does to the unused rows of a table: the update is not sparse, the gradient is)."""
    with torch.no_grad():
        for u in units:
            for p in u:
                p.add_(-lr * torch.sign(p.grad) - lr * wd * p)


def reference(score, units, olds, row_sparse):
    """Brute force: concatenate the unit's elements (used rows only for tables)."""
    out = []
    for u, old in zip(units, olds):
        if score == "paper":  # the paper: every element, tables whole
            ratios = [((p.detach() - o).abs() / (o.abs() + EPS)).flatten() for p, o in zip(u, old)]
            out.append(torch.cat(ratios).mean().item())
            continue
        rows = [p.grad.ne(0).any(dim=1) if any(p is q for q in row_sparse) else slice(None)
                for p in u]
        new = torch.cat([p.detach()[r].flatten() for p, r in zip(u, rows)]).double()
        prev = torch.cat([o[r].flatten() for o, r in zip(old, rows)]).double()
        grad = torch.cat([p.grad[r].flatten() for p, r in zip(u, rows)]).double()
        if score == "update_norm":
            out.append(((new - prev).norm() / (prev.norm() + EPS)).item())
        elif score == "grad_norm":
            out.append((grad.norm() / (new.norm() + EPS)).item())
        else:  # fisher
            out.append((grad.square().mean() * new.square().mean()).item())
    return out


@pytest.mark.parametrize("score", SCORES)
def test_each_score_against_brute_force(score):
    units, table = make_units()
    olds = [[p.detach().clone() for p in u] for u in units]
    snap = WeightSnapshot(units, eps=EPS, score=score, row_sparse=[table])
    adamw_like_step(units)
    got = snap.scores()
    torch.testing.assert_close(got, reference(score, units, olds, [table]), rtol=1e-5, atol=0)


@pytest.mark.parametrize("score", ["update_norm", "grad_norm", "fisher"])
def test_sparse_rows_score_only_the_rows_used(score):
    """The table's score depends on the rows with a gradient only: changing the
    unused rows' weights leaves it unchanged, and it differs from the whole-table value."""
    units, table = make_units()
    olds = [[p.detach().clone() for p in u] for u in units]
    snap = WeightSnapshot(units, eps=EPS, score=score, row_sparse=[table])
    adamw_like_step(units)
    used_rows = snap.scores()[1]
    whole = reference(score, units, olds, row_sparse=[])[1]
    assert used_rows == pytest.approx(reference(score, units, olds, [table])[1], rel=1e-5)
    assert abs(used_rows - whole) > 0.05 * abs(whole)
    units2, table2 = make_units()
    with torch.no_grad():
        table2[[0, 2, 9]] *= 5.0  # unused rows: irrelevant to the score
    snap2 = WeightSnapshot(units2, eps=EPS, score=score, row_sparse=[table2])
    adamw_like_step(units2)
    assert snap2.scores()[1] == pytest.approx(used_rows, rel=1e-5)


def test_paper_score_keeps_whole_tables():
    units, table = make_units()
    olds = [[p.detach().clone() for p in u] for u in units]
    a = WeightSnapshot(units, eps=EPS, score="paper", row_sparse=[table])
    adamw_like_step(units)
    torch.testing.assert_close(a.scores(), reference("paper", units, olds, []), rtol=1e-5, atol=0)


def test_scores_are_dimensionless_across_weight_scales():
    """update_norm (the same relative update) and fisher (g * W is unchanged) do not
    change when a tensor is rescaled W -> cW with g -> g / c (the same function):
    LayerNorm gains ~1 and matrices with entries ~0.03 compete on one scale."""
    for score in ("update_norm", "fisher"):
        vals = []
        for c in (1.0, 30.0):
            w = torch.nn.Parameter(torch.linspace(-1, 1, 12) * c)
            w.grad = torch.linspace(0.5, -0.3, 12) / c
            snap = WeightSnapshot([[w]], score=score)
            with torch.no_grad():
                w.add_(-0.01 * c * torch.sign(w.grad))  # the same relative update
            vals.append(snap.scores()[0])
        assert vals[0] == pytest.approx(vals[1], rel=1e-4), score


def test_zero_weight_is_finite_and_nan_is_reported_faithfully():
    z = torch.nn.Parameter(torch.zeros(4))  # zero weight: eps, no division by zero
    n = torch.nn.Parameter(torch.ones(4))
    snap = WeightSnapshot([[z], [n]])
    with torch.no_grad():
        z.add_(1e-3)
        n.fill_(float("nan"))
    m = snap.measure()
    assert math.isfinite(m.scores[0]) and m.scores[0] > 0
    assert math.isnan(m.scores[1]) and not m.finite
    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert math.isinf(WeightSnapshot([[w]], score="grad_norm").scores()[0])


@pytest.mark.parametrize("flag,finite", [(torch.tensor(True), True), (torch.tensor(False), False),
                                         (True, True), (False, False), (None, True)])
def test_loss_flag_travels_with_the_scores(flag, finite):
    w = torch.nn.Parameter(torch.ones(3))
    snap = WeightSnapshot([[w]])
    with torch.no_grad():
        w.mul_(2)
    m = snap.measure(flag)
    assert m.loss_finite is finite and m.scores == [1.0]


@pytest.mark.parametrize("score", SCORES)
def test_one_device_to_host_transfer_per_step(score, monkeypatch):
    units, table = make_units()
    snap = WeightSnapshot(units, score=score, row_sparse=[table])
    adamw_like_step(units)
    calls = []
    for name in ("cpu", "item", "tolist", "__bool__", "__float__"):
        orig = getattr(torch.Tensor, name)
        def spy(self, *a, _o=orig, _n=name, **k):
            calls.append(_n)
            return _o(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, spy)
    snap.measure(torch.isfinite(torch.tensor(1.0)))
    monkeypatch.undo()
    assert calls.count("cpu") == 1 and not {"item", "__bool__", "__float__"} & set(calls)


def test_gradient_scores_copy_no_weights():
    units, table = make_units()
    assert WeightSnapshot(units, score="grad_norm")._old == []
    assert len(WeightSnapshot(units, score="paper")._old) == 4


def test_unknown_score_is_refused():
    with pytest.raises(SlimFitError, match="score must be one of.*'fisher'.*got 'adam'"):
        WeightSnapshot([], score="adam")


@pytest.mark.parametrize("score", ["update_norm", "grad_norm", "fisher"])
def test_sparse_gradient_tables_match_dense_ones(score):
    """nn.Embedding(sparse=True) gives a sparse gradient: same rows, same score."""
    out = []
    for sparse in (False, True):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(12, 4, sparse=sparse)
        emb(torch.tensor([[1, 3, 3, 7]])).square().sum().backward()
        snap = WeightSnapshot([[emb.weight]], score=score, row_sparse=[emb.weight])
        with torch.no_grad():
            emb.weight.mul_(1.01)  # every row moves (as weight decay would)
        out.append(snap.scores()[0])
    assert out[0] == pytest.approx(out[1], rel=1e-6)
