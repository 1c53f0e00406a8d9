"""The study evidence the library reads (prices, short budgets): the shipped
file equals what the study's own code computes from its recorded runs, each
price comes from an arm that runs the setting it prices, and the logic over
the figures errs towards a larger price and towards warning."""

import json

import pytest
from hydra import compose, initialize_config_dir

from slimfit.evidence import BudgetRun, Evidence, Price, expected_price
from slimfit.experiments import fidelity
from slimfit.experiments.fidelity import evidence as study
from slimfit.experiments.train import CONFIG_DIR
from slimfit.freezing.scheduler import InterLayerScheduler

SHIPPED = Evidence.default()


def test_the_shipped_file_is_the_study_recomputed():
    assert json.loads(study.EVIDENCE.read_text()) == study.build(fidelity.load()).to_dict()
    assert SHIPPED == study.build(fidelity.load()) and SHIPPED.prices and SHIPPED.budget_runs


@pytest.mark.parametrize("key", sorted(study.PRICE_ARMS))
def test_each_price_comes_from_an_arm_that_runs_its_setting(key):
    """The arm behind the (freeze rate, compression) price composes to that rate
    and compression (a relabelled or edited arm cannot price another setting)."""
    arm = study.PRICE_ARMS[key]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=fidelity_movie", "output_dir=/tmp/unused",
                                          *fidelity.ARMS[arm].overrides])
    assert (cfg.slimfit.freeze_rate, cfg.slimfit.compression is not None) == key
    assert SHIPPED.prices[key].arm == arm


def test_the_budget_runs_are_every_run_of_the_defaults_at_any_length():
    """Every run of a budget arm on the first study's tasks (the policy study's
    tasks report separately, so their runs never enter the prices)."""
    runs = fidelity.load()
    recorded = {(r["task"], r["arm"], r["seed"]) for r in runs
                if r["arm"] in study.BUDGET_ARMS and r["task"] not in fidelity.POLICY_TASKS}
    assert recorded == {(r.task, r.arm, r.seed) for r in SHIPPED.budget_runs}


def test_without_evidence_prices_are_unknown_and_no_run_is_short():
    none = Evidence()
    gap, note = none.expected_price(0.9, True)
    assert gap == 0.0 and note.startswith("not measured")
    assert none.short_budget_note(10, 5, 50) is None
    assert none.expected_price(0.0, False) == (0.0, "exact")


def test_full_fine_tuning_is_free_and_measured_points_are_exact():
    assert expected_price(0.0, False) == (0.0, "exact")
    for (rate, comp), price in SHIPPED.prices.items():
        gap, note = SHIPPED.expected_price(rate, comp)
        # the measured mean, unless a lower rate of the same setting measured a larger loss
        lower = [p.gap for (r, c), p in SHIPPED.prices.items() if c == comp and r < rate]
        assert gap == pytest.approx(min(0.0, price.gap, *lower)) and note.startswith("measured")
        if gap < min(0.0, price.gap):
            assert "never priced cheaper" in note


def test_a_measured_gain_is_priced_zero_and_said():
    ev = Evidence(prices={(0.9, True): Price(0.25, 9, "slimfit", "all")})
    gap, note = ev.expected_price(0.9, True)
    assert gap == 0.0 and "mean +0.25: no loss measured" in note and "9 paired" in note


@pytest.mark.parametrize("compression", [False, True])
def test_more_freezing_never_looks_cheaper(compression):
    gaps = [SHIPPED.expected_price(i / 100, compression)[0] for i in range(0, 100)]
    assert all(b <= a + 1e-9 for a, b in zip(gaps, gaps[1:])), gaps


def test_compression_adds_its_own_price_where_measured_both_ways():
    ev = Evidence(prices={(0.9, False): Price(-0.4, 3, "a", "t"), (0.9, True): Price(-0.7, 3, "b", "t")},
                  compression=Price(-0.3, 3, "a", "t"))
    assert ev.compression_price() == pytest.approx(-0.3)
    assert ev.expected_price(0.45, False)[0] == pytest.approx(-0.2)
    assert ev.expected_price(0.45, True)[0] == pytest.approx(-0.5)
    assert ev.expected_price(0.0, True)[0] == pytest.approx(-0.3)
    assert ev.expected_price(0.0, False) == (0.0, "exact")


def test_a_measured_gain_from_compression_is_not_a_discount():
    prices = {(0.9, False): Price(-0.4, 3, "a", "t")}
    assert Evidence(prices=prices, compression=Price(0.55, 1, "a", "t")).compression_price() == 0.0
    bare = Evidence(prices=prices)
    assert bare.compression_price() is None
    assert "not measured yet" in bare.expected_price(0.6, True)[1]


def test_compression_alone_says_its_price_is_inferred_until_measured():
    prices = {k: v for k, v in SHIPPED.prices.items() if k != (0.0, True)}
    gap, note = Evidence(prices=prices, compression=SHIPPED.compression).expected_price(0.0, True)
    assert gap <= 0.0 and note.startswith("inferred")


def test_measured_compression_alone_starts_the_compression_curve():
    ev = Evidence(prices={(0.0, True): Price(-0.3, 1, "c", "t"), (0.9, True): Price(0.1, 9, "s", "all")})
    assert ev.expected_price(0.0, True) == (-0.3, "measured: t, 1 paired run(s)")
    assert ev.expected_price(0.45, True)[0] == pytest.approx(-0.3)
    gap, note = ev.expected_price(0.9, True)  # the +0.1 mean is priced as the rate below it
    assert gap == pytest.approx(-0.3) and "never priced cheaper" in note and "+0.10" in note


def test_a_rate_beyond_the_measured_ones_says_it_is_extrapolated():
    top = max(rate for rate, _ in SHIPPED.prices)
    assert "extrapolated beyond" in SHIPPED.expected_price(min(0.99, top + 0.02), True)[1]
    assert SHIPPED.expected_price(top / 2, True)[1].startswith(("interpolated", "inferred"))


# -- short budgets ---------------------------------------------------------------------------------

def _runs(*runs):
    """Evidence of runs given as (updates per unit, gap)."""
    return Evidence(budget_runs=tuple(BudgetRun("t", "a", i, u, g) for i, (u, g) in enumerate(runs)))


def test_short_budget_note_warns_below_the_first_count_past_the_last_loss():
    # lost 5 points at 6 updates per unit, within a point at 13 and 30; a loss at 2 too
    ev = _runs((2, -9.0), (6, -5.0), (13, -0.3), (30, 0.2))
    units, trained = 50, 5  # 0.1 of the units per step
    assert ev.short_budget_note(130, trained, units) is None        # 13 updates: as measured
    note = ev.short_budget_note(100, trained, units)                # 10: between 6 and 13
    assert note is not None and "about 10.0 times" in note and "lost 5.00 points" in note
    assert "at 6.0 updates per unit" in note and "every run from 13.0 on" in note
    assert "train >= 130 steps" in note


def test_short_budget_note_suggests_a_rate_that_reaches_the_count():
    ev = _runs((6, -5.0), (13, -0.3))
    units, trained, steps = 53, 6, 80
    note = ev.short_budget_note(steps, trained, units)
    rate = float(note.split("freeze_rate <= ")[1].split(" ")[0])
    at_rate = InterLayerScheduler([f"u{i}" for i in range(units)], rate).num_trained
    assert steps * at_rate / units >= 13.0                 # the suggestion is enough ...
    higher = InterLayerScheduler([f"u{i}" for i in range(units)], rate + 0.02).num_trained
    assert steps * higher / units < 13.0 or higher == at_rate  # ... and not needlessly low


def test_short_budget_note_is_silent_when_it_cannot_know_or_nothing_is_frozen():
    ev = _runs((6, -5.0), (13, -0.3))
    assert ev.short_budget_note(float("inf"), 5, 50) is None   # open-ended run
    assert ev.short_budget_note(10, 50, 50) is None            # every unit trains every step
    assert _runs((6, -0.5), (13, -0.3)).short_budget_note(10, 5, 50) is None  # no loss past a point
    assert _runs((6, -0.5), (13, -3.0)).short_budget_note(10, 5, 50) is None  # no count enough
    assert "compression alone (freeze_rate=0.0)" in ev.short_budget_note(5, 5, 50)  # too few steps


def test_another_evidence_file_is_read_from_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "evidence.json"
    path.write_text(json.dumps(_runs((6, -5.0), (13, -0.3)).to_dict()))
    monkeypatch.setenv("SLIMFIT_EVIDENCE", str(path))
    Evidence.default.cache_clear()
    try:
        assert Evidence.default().budget_runs[0].updates == 6
    finally:
        Evidence.default.cache_clear()
