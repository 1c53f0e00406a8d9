"""The inter-layer scheduler, as pure logic over names and scores."""

import math

import pytest

from slimfit import CheckpointMismatchError, SlimFitConfig, SlimFitError
from slimfit.freezing.scheduler import InterLayerScheduler

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


# -- staleness and selection policies (issue 12) ---------------------------------------

def _policy(**kw):
    return InterLayerScheduler(NAMES, 0.8, seed=0, **kw)  # 2 of 10 trained per step


def _after_initial_pass(s):
    run(s, 5)  # every unit measured once: unit i scored (i + 1) / 10
    return s


def _varied(i, step):
    """Scores that reshuffle every step (with ties: 0.9 and 1.0 recur)."""
    return ((i * 7 + step * 3) % 11) / 10


# Frozen sets of 12 steps on NAMES, r = 0.7 (3 of 10 units trained per step), seed 4,
# scores _varied: recorded once from the scheduler as it stood (0.2.0), the reference
# since. Steps 0-2 are the initial pass (3 never measured units each); step 3 trains
# the last new unit (9) and then, in the paper's policy, the two top scores (1: 1.0,
# 2: 0.9); under SlimFitConfig's defaults (reserve_fraction=0.25: one reserved slot)
# the least recently trained unit (6, frozen 2 steps) and the top score (1). A change
# to the round robin, the reserved slot, top-k or the seeded tie-breaks changes a row.
PAPER_DECISIONS = [
    [0, 1, 2, 3, 4, 5, 9], [2, 3, 4, 6, 7, 8, 9], [0, 1, 5, 6, 7, 8, 9],  # initial pass
    [0, 3, 4, 5, 6, 7, 8], [0, 1, 2, 4, 5, 7, 8], [0, 2, 3, 4, 5, 7, 8],
    [1, 2, 3, 4, 6, 8, 9], [1, 2, 3, 4, 7, 8, 9], [1, 3, 4, 5, 7, 8, 9],
    [1, 3, 4, 5, 6, 7, 9], [1, 3, 4, 5, 6, 7, 9], [1, 2, 3, 4, 6, 7, 9],
]
CONFIG_DEFAULT_DECISIONS = [
    [0, 1, 2, 3, 4, 5, 9], [2, 3, 4, 6, 7, 8, 9], [0, 1, 5, 6, 7, 8, 9],  # initial pass
    [0, 2, 3, 4, 5, 7, 8], [0, 1, 3, 4, 5, 7, 9], [0, 1, 2, 3, 4, 5, 8],
    [2, 3, 4, 5, 6, 8, 9], [1, 2, 4, 6, 7, 8, 9], [1, 2, 5, 6, 7, 8, 9],
    [0, 1, 3, 5, 6, 7, 9], [0, 1, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 5, 7],
]


def _config_default_scheduler():
    """The scheduler as LayerFreezer builds it from SlimFitConfig's defaults."""
    c = SlimFitConfig(freeze_rate=0.7, seed=4)
    return InterLayerScheduler(NAMES, c.freeze_rate, seed=c.seed, max_frozen_age=c.max_frozen_age,
                               frozen_score_decay=c.frozen_score_decay, selection=c.selection,
                               reserve_fraction=c.reserve_fraction)


@pytest.mark.parametrize("build,expected", [
    (lambda: InterLayerScheduler(NAMES, 0.7, seed=4), PAPER_DECISIONS),
    (_config_default_scheduler, CONFIG_DEFAULT_DECISIONS),
], ids=["paper", "slimfit-config-defaults"])
def test_default_policy_decisions_are_unchanged(build, expected):
    """The scheduler's own defaults decide as the paper's scheduler, and
    SlimFitConfig's defaults as recorded: the same frozen set at every step."""
    assert run(build(), len(expected), _varied) == expected


def test_frozen_score_decay_brings_a_frozen_unit_back_on_its_own():
    """Paper: units 0..7 stay frozen forever behind 8 and 9 (fresh scores 0.9, 1.0).
    With d = 0.5 a stale score s counts as s / 0.5**age: unit 7 (0.8) outranks
    0.9 after one frozen step, unit 0 (0.1) after four."""
    s = _after_initial_pass(_policy(frozen_score_decay=0.5))
    trained = set()
    for _ in range(12):
        f = s.decide()
        trained |= set(range(10)) - set(f)
        assert len(f) == 8
        s.update(f, [0.9 if i == 8 else 1.0 if i == 9 else 0.05
                     for i in range(10) if i not in f])
    assert trained == set(range(10))
    eff = s.effective_scores()
    expected = [sc / 0.5 ** a for sc, a in zip(s.scores, s.ages)]
    assert eff == pytest.approx(expected)
    one = _policy(frozen_score_decay=1.0)  # d = 1: the paper's ranking
    assert run(_after_initial_pass(one), 5) == run(_after_initial_pass(_policy()), 5)


def test_reserve_fraction_gives_slots_to_the_least_recently_trained():
    s = InterLayerScheduler(NAMES, 0.6, seed=0, reserve_fraction=0.5)  # 4 trained, 2 reserved
    run(s, 3)
    for _ in range(10):
        oldest = sorted(range(10), key=lambda i: -s.ages[i])
        top_age = s.ages[oldest[0]]
        f = s.decide()
        assert len(f) == 6
        trained = set(range(10)) - set(f)
        assert {8, 9} <= trained  # the two top scores keep their slots
        assert any(s.ages[i] == top_age for i in trained)  # an oldest unit was trained
        s.update(f, [(i + 1) / 10 for i in sorted(trained)])
    assert max(s.ages) <= 3  # 8 units rotate through 2 reserved slots: none waits > 3 steps


def test_sampling_is_proportional_to_scores_and_deterministic():
    scores = [1.0] * 8 + [4.0, 4.0]
    counts = [0] * 10
    s = InterLayerScheduler(NAMES, 0.9, seed=3, selection="sample")  # 1 trained per step
    run(s, 10, lambda i, step: scores[i])
    steps = 4000
    for _ in range(steps):
        f = s.decide()
        (i,) = set(range(10)) - set(f)
        counts[i] += 1
        s.update(f, [scores[i]])
    # one draw in proportion to the scores: 1/16 each for units 0..7, 4/16 for 8 and 9
    for i in range(10):
        assert counts[i] / steps == pytest.approx(scores[i] / 16, abs=0.025)
    a, b = (InterLayerScheduler(NAMES, 0.8, seed=9, selection="sample") for _ in range(2))
    assert run(a, 30) == run(b, 30)
    assert run(InterLayerScheduler(NAMES, 0.8, seed=10, selection="sample"), 30) != \
        run(InterLayerScheduler(NAMES, 0.8, seed=9, selection="sample"), 30)


@pytest.mark.parametrize("rate", [0.5, 0.8, 0.9])
@pytest.mark.parametrize("kw", [{"selection": "sample"}, {"reserve_fraction": 0.5},
                                {"frozen_score_decay": 0.9, "max_frozen_age": 4},
                                {"selection": "sample", "reserve_fraction": 0.3,
                                 "frozen_score_decay": 0.95}])
def test_every_policy_freezes_exactly_floor_rt(rate, kw):
    s = InterLayerScheduler(NAMES, rate, seed=2, **kw)
    for f in run(s, 30, lambda i, step: ((i * 5 + step) % 7) / 7):
        assert len(f) == len(set(f)) == math.floor(rate * 10)


def test_policy_state_round_trip_continues_identically():
    kw = dict(selection="sample", reserve_fraction=0.25, frozen_score_decay=0.9)
    a = InterLayerScheduler(NAMES, 0.7, seed=5, **kw)
    run(a, 6)
    b = InterLayerScheduler(NAMES, 0.7, seed=99, **kw)
    b.load_state_dict(a.state_dict())
    assert run(a, 15) == run(b, 15)
    old = a.state_dict()  # a version-1 state written before these options existed loads
    for k in ("frozen_score_decay", "selection", "reserve_fraction"):
        del old[k]
    InterLayerScheduler(NAMES, 0.7).load_state_dict(old)  # ran as the paper: no warning
    with pytest.warns(UserWarning, match=r"saved with .*reserve_fraction=0.0 \(now 0.25\)"):
        InterLayerScheduler(NAMES, 0.7, **kw).load_state_dict(old)


def test_resuming_under_another_policy_says_so():
    saved = InterLayerScheduler(NAMES, 0.7, seed=1)  # top-k, as before reserve_fraction=0.25
    run(saved, 4)
    with pytest.warns(UserWarning, match=r"reserve_fraction=0.0 \(now 0.25\).*pass the saved"):
        InterLayerScheduler(NAMES, 0.7, reserve_fraction=0.25).load_state_dict(saved.state_dict())


def test_nan_never_enters_the_scheduler():
    s = InterLayerScheduler(NAMES, 0.5, seed=0)
    f = s.decide()
    with pytest.raises(SlimFitError, match="non-finite scores.*u"):
        s.update(f, [float("nan")] + [0.1] * 4)
    assert s.scores == [None] * 10
    bad = s.state_dict()
    bad["scores"][0] = float("inf")
    with pytest.raises(CheckpointMismatchError, match="non-finite"):
        s.load_state_dict(bad)


@pytest.mark.parametrize("kw,match", [({"frozen_score_decay": 0.0}, "frozen_score_decay"),
                                      ({"selection": "best"}, "selection"),
                                      ({"reserve_fraction": 1.0}, "reserve_fraction")])
def test_bad_policy_options_are_refused(kw, match):
    with pytest.raises(SlimFitError, match=match):
        InterLayerScheduler(NAMES, 0.5, **kw)


@pytest.mark.parametrize("n_train, expected", [(1, 0), (2, 1), (3, 1), (4, 1), (6, 1), (8, 2), (11, 2)])
def test_reserved_slots_never_round_a_positive_fraction_away(n_train, expected):
    # r = 0.95 on a 53-unit model trains 3 units: floor(0.25 * 3) = 0 would silently
    # turn the option off; one slot is reserved, and one always stays with the scores
    s = InterLayerScheduler(NAMES, 0.5, reserve_fraction=0.25)
    assert s.reserved_slots(n_train) == expected
    assert InterLayerScheduler(NAMES, 0.5).reserved_slots(n_train) == 0


def test_a_high_rate_still_rotates_the_reserved_slot():
    # 10 units at r = 0.8: 2 trained per step, floor(0.25 * 2) = 0, but one slot rotates
    s = InterLayerScheduler(NAMES, 0.8, seed=0, reserve_fraction=0.25)
    run(s, 40)  # unit 9 scores highest and keeps its slot; the others share the reserved one
    assert max(s.ages) <= 9
    plain = InterLayerScheduler(NAMES, 0.8, seed=0)
    run(plain, 40)
    assert max(plain.ages) > 20  # without it, top-k on fixed scores starves the rest


# -- rate_of="bytes": the rate a fraction of the bytes (issue 25: decoder units differ 40x) --

SIZES = [1000] + [100] * 20 + [400] * 5  # an "embedding", small and middle-sized units


@pytest.mark.parametrize("kw", [{}, {"reserve_fraction": 0.25}, {"selection": "sample"},
                                {"max_frozen_age": 6, "frozen_score_decay": 0.9}])
def test_bytes_rate_bounds_every_trained_set_and_starves_no_unit(kw):
    names = [f"u{i}" for i in range(len(SIZES))]
    s = InterLayerScheduler(names, 0.8, seed=4, unit_bytes=SIZES, **kw)
    assert s.trained_bytes_budget == 1000  # floor(0.2 * 5000), not 999 from float rounding
    last = {}
    for step, f in enumerate(run(s, 80, lambda i, step: ((i * 7 + step) % 11 + 1) / 11)):
        trained = [i for i in range(len(SIZES)) if i not in f]
        assert 0 < sum(SIZES[i] for i in trained) <= 1000
        assert s.check_frozen(f) is None
        last.update({i: step for i in trained})
    assert s.initial_pass_done
    if kw:  # reserved slots or staleness bring the 1000-byte unit back, not only the scores
        assert 80 - 1 - last[0] <= 26


def test_bytes_rate_with_equal_units_is_the_count_rate():
    by_bytes = InterLayerScheduler(NAMES, 0.7, seed=3, unit_bytes=[64] * 10)
    by_count = InterLayerScheduler(NAMES, 0.7, seed=3)
    for a, b in zip(run(by_bytes, 20), run(by_count, 20)):
        assert len(a) == len(b) == 7


def test_bytes_rate_refuses_a_unit_that_could_never_train():
    with pytest.raises(SlimFitError, match=r"unit 'u0' alone has 1000.*freeze_rate <= 0.8"):
        InterLayerScheduler([f"u{i}" for i in range(len(SIZES))], 0.9, unit_bytes=SIZES)
    with pytest.raises(SlimFitError, match="one size >= 0 per unit"):
        InterLayerScheduler(NAMES, 0.5, unit_bytes=[1, 2])


def test_bytes_rate_state_round_trip_and_a_changed_rate_of_is_said():
    names = [f"u{i}" for i in range(len(SIZES))]
    a = InterLayerScheduler(names, 0.8, seed=1, reserve_fraction=0.25, unit_bytes=SIZES)
    run(a, 7)
    b = InterLayerScheduler(names, 0.8, seed=2, reserve_fraction=0.25, unit_bytes=SIZES)
    b.load_state_dict(a.state_dict())
    assert run(a, 20) == run(b, 20)
    with pytest.warns(UserWarning, match=r"rate_of='bytes' \(now 'units'\)"):
        InterLayerScheduler(names, 0.8, reserve_fraction=0.25).load_state_dict(a.state_dict())


@pytest.mark.parametrize("kw,match", [
    ({"rate_of": "params"}, "rate_of must be one of 'units', 'bytes'.*got 'params'"),
    ({"rate_of": "bytes", "policy": "lisa"}, "rate_of='bytes' applies to policy='slimfit'"),
    ({"rate_of": "bytes", "trained_units": 3}, "trained_units=3 counts units")])
def test_bad_rate_of_is_refused(kw, match):
    with pytest.raises(SlimFitError, match=match):
        SlimFitConfig(**kw)
