"""The inter-layer scheduler and the training-dynamics score, as pure logic."""

import math

import pytest
import torch

from slimfit.errors import CheckpointMismatchError
from slimfit.scheduler import InterLayerScheduler
from slimfit.scores import WeightSnapshot

NAMES = [f"u{i}" for i in range(10)]


def run(s, steps, score_of=lambda i, step: (i + 1) / 10):
    decisions = []
    for step in range(steps):
        frozen = s.decide()
        decisions.append(frozen)
        trained = [i for i in range(len(s.names)) if i not in frozen]
        s.update(frozen, [score_of(i, step) for i in trained])
    return decisions


@pytest.mark.parametrize("rate", [0.0, 0.5, 0.8, 0.9, 0.95])
def test_exactly_floor_rt_frozen_every_step(rate):
    s = InterLayerScheduler(NAMES, rate, seed=1)
    for frozen in run(s, 30):
        assert len(frozen) == math.floor(rate * 10) == s.num_frozen


def test_initial_pass_trains_every_unit_once_then_freezes_lowest():
    s = InterLayerScheduler(NAMES, 0.8, seed=3)  # 2 trained per step
    decisions = run(s, 5)
    trained_first = [set(range(10)) - set(f) for f in decisions[:5]]
    assert set().union(*trained_first) == set(range(10))  # round robin covers all
    assert all(len(t) == 2 for t in trained_first)
    assert s.initial_pass_done
    # afterwards the two highest scores (units 8, 9) are trained, the rest frozen
    assert s.decide() == list(range(8))


def test_stale_scores_follow_paper_by_default_and_max_age_forces_training():
    s = InterLayerScheduler(NAMES, 0.8, seed=0)
    run(s, 5)
    for _ in range(10):  # units 8, 9 keep high scores: 0..7 stay frozen forever
        f = s.decide()
        assert f == list(range(8))
        s.update(f, [0.9, 1.0])
    capped = InterLayerScheduler(NAMES, 0.8, seed=0, max_frozen_age=3)
    run(capped, 5)
    trained = set()
    for _ in range(12):
        f = capped.decide()
        trained |= set(range(10)) - set(f)
        capped.update(f, [1.0] * 2)
    assert trained == set(range(10))  # every unit revisited within the age cap


def test_deterministic_given_seed_and_seed_matters():
    a, b, c = (InterLayerScheduler(NAMES, 0.9, seed=s) for s in (7, 7, 8))
    same = lambda i, step: 0.5  # all ties: order comes from the seeded tie-break
    assert run(a, 20, same) == run(b, 20, same)
    assert run(c, 20, same) != run(InterLayerScheduler(NAMES, 0.9, seed=7), 20, same)


def test_unmeasured_step_keeps_scores():
    s = InterLayerScheduler(NAMES, 0.5, seed=0)
    f = s.decide()
    s.update(f, None)  # skipped step: no scores
    assert s.scores == [None] * 10 and s.step == 1


def test_state_round_trip_continues_identically():
    a = InterLayerScheduler(NAMES, 0.7, seed=5, max_frozen_age=4)
    run(a, 6)
    b = InterLayerScheduler(NAMES, 0.7, seed=99, max_frozen_age=4)
    b.load_state_dict(a.state_dict())
    assert run(a, 10) == run(b, 10)


def test_state_for_another_model_is_rejected():
    a = InterLayerScheduler(NAMES, 0.5)
    other = InterLayerScheduler(NAMES[:-1] + ["bert.pooler.dense.weight"], 0.5)
    with pytest.raises(CheckpointMismatchError, match="another model.*bert.pooler.dense.weight"):
        a.load_state_dict(other.state_dict())
    with pytest.raises(CheckpointMismatchError, match="not a SlimFit scheduler state"):
        a.load_state_dict({"garbage": 1})
    bad = a.state_dict()
    bad["scores"] = bad["scores"][:3]
    with pytest.raises(CheckpointMismatchError, match="corrupt"):
        a.load_state_dict(bad)


def test_score_is_mean_relative_change_against_brute_force():
    torch.manual_seed(0)
    w1, w2 = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))
    w3 = torch.nn.Parameter(torch.randn(2, 2))
    old = [w.detach().clone() for w in (w1, w2, w3)]
    snap = WeightSnapshot([[w1, w2], [w3]], eps=1e-8)
    with torch.no_grad():
        for w in (w1, w2, w3):
            w.add_(torch.randn_like(w) * 0.01)
    got = snap.scores()
    ref = lambda pairs: (torch.cat([((n - o).abs() / (o.abs() + 1e-8)).flatten() for n, o in pairs])
                         .mean().item())
    torch.testing.assert_close(got[0], ref([(w1.detach(), old[0]), (w2.detach(), old[1])]),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(got[1], ref([(w3.detach(), old[2])]), rtol=1e-5, atol=0)


def test_score_is_nan_and_inf_safe():
    z = torch.nn.Parameter(torch.zeros(4))  # zero weight: no division by zero
    n = torch.nn.Parameter(torch.ones(4))
    snap = WeightSnapshot([[z], [n]])
    with torch.no_grad():
        z.add_(1e-3)
        n.fill_(float("nan"))
    s = snap.scores()
    assert all(math.isfinite(x) for x in s)
    assert s[0] > 0 and s[1] == 0.0
