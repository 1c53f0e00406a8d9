"""The accuracy-price table the planner uses: it equals the fidelity study's
committed results, and its interpolation errs towards a larger price."""

import json
import pathlib
import statistics

import pytest

from slimfit.accuracy_price import MEASURED, expected_price

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "results" / "fidelity.jsonl"


def _rows():
    """{(task, arm, seed): recorded run} of the committed study."""
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    return {(r["task"], r["arm"], r["seed"]): r for r in rows}


def _accuracies():
    """{(task, arm, seed): validation accuracy} of the committed study."""
    return {key: r["val_acc"] for key, r in _rows().items()}


def _paired_gaps(task, arm, against="full"):
    acc = _accuracies()
    return [100 * (v - acc[(t, against, s)]) for (t, a, s), v in acc.items()
            if task in (t, "all") and a == arm and (t, against, s) in acc]


@pytest.mark.parametrize("key", sorted(MEASURED))
def test_table_equals_the_committed_study(key):
    price = MEASURED[key]
    assert price.against == "full"
    gaps = _paired_gaps(price.task, price.arm)
    assert len(gaps) == price.runs, (key, gaps)
    assert price.gap == pytest.approx(statistics.mean(gaps), abs=0.005), (key, gaps)


def test_full_fine_tuning_is_free_and_measured_points_are_exact():
    assert expected_price(0.0, False) == (0.0, "exact")
    for (rate, comp), price in MEASURED.items():
        gap, note = expected_price(rate, comp)
        # the measured mean, unless a lower rate of the same setting measured a larger loss
        lower = [p.gap for (r, c), p in MEASURED.items() if c == comp and r < rate]
        assert gap == pytest.approx(min(0.0, price.gap, *lower)) and note.startswith("measured")
        if gap < min(0.0, price.gap):
            assert "never priced cheaper" in note


def test_a_measured_gain_is_priced_zero_and_said(monkeypatch):
    from slimfit import accuracy_price as ap
    monkeypatch.setattr(ap, "MEASURED", {(0.9, True): ap.Price(0.25, 9, "slimfit", "all")})
    gap, note = ap.expected_price(0.9, True)
    assert gap == 0.0 and "mean +0.25: no loss measured" in note and "9 paired" in note


@pytest.mark.parametrize("compression", [False, True])
def test_more_freezing_never_looks_cheaper(compression):
    rates = [i / 100 for i in range(0, 100)]
    gaps = [expected_price(r, compression)[0] for r in rates]
    assert all(b <= a + 1e-9 for a, b in zip(gaps, gaps[1:])), gaps


def test_compression_price_equals_the_same_seed_pairs_of_the_study():
    from slimfit.accuracy_price import COMPRESSION
    diffs = _paired_gaps(COMPRESSION.task, COMPRESSION.arm, COMPRESSION.against)
    assert len(diffs) == COMPRESSION.runs
    assert COMPRESSION.gap == pytest.approx(statistics.mean(diffs), abs=0.005)


def test_compression_adds_its_own_price_where_measured_both_ways(monkeypatch):
    from slimfit import accuracy_price as ap
    table = {(0.9, False): ap.Price(-0.4, 3, "a", "t"), (0.9, True): ap.Price(-0.7, 3, "b", "t")}
    monkeypatch.setattr(ap, "MEASURED", table)
    monkeypatch.setattr(ap, "COMPRESSION", ap.Price(-0.3, 3, "a", "t"))
    assert ap.compression_price() == pytest.approx(-0.3)
    assert ap.expected_price(0.45, False)[0] == pytest.approx(-0.2)
    assert ap.expected_price(0.45, True)[0] == pytest.approx(-0.5)
    assert ap.expected_price(0.0, True)[0] == pytest.approx(-0.3)
    assert ap.expected_price(0.0, False) == (0.0, "exact")


def test_a_measured_gain_from_compression_is_not_a_discount(monkeypatch):
    from slimfit import accuracy_price as ap
    monkeypatch.setattr(ap, "COMPRESSION", ap.Price(0.55, 1, "a", "t"))
    assert ap.compression_price() == 0.0
    monkeypatch.setattr(ap, "COMPRESSION", None)
    assert ap.compression_price() is None
    assert "not measured yet" in ap.expected_price(0.6, True)[1]


def test_compression_alone_says_its_price_is_inferred_until_measured(monkeypatch):
    from slimfit import accuracy_price as ap
    monkeypatch.setattr(ap, "MEASURED", {k: v for k, v in MEASURED.items() if k != (0.0, True)})
    gap, note = ap.expected_price(0.0, True)
    assert gap <= 0.0 and note.startswith("inferred")


def test_measured_compression_alone_starts_the_compression_curve(monkeypatch):
    from slimfit import accuracy_price as ap
    monkeypatch.setattr(ap, "MEASURED", {(0.0, True): ap.Price(-0.3, 1, "c", "t"),
                                         (0.9, True): ap.Price(0.1, 9, "s", "all")})
    assert ap.expected_price(0.0, True) == (-0.3, "measured: t, 1 paired run(s)")
    assert ap.expected_price(0.45, True)[0] == pytest.approx(-0.3)
    gap, note = ap.expected_price(0.9, True)  # the +0.1 mean is priced as the rate below it
    assert gap == pytest.approx(-0.3) and "never priced cheaper" in note and "+0.10" in note


def test_a_rate_beyond_the_measured_ones_says_it_is_extrapolated():
    top = max(rate for rate, _ in MEASURED)
    assert "extrapolated beyond" in expected_price(min(0.99, top + 0.02), True)[1]
    assert expected_price(top / 2, True)[1].startswith(("interpolated", "inferred"))


# -- short budgets ---------------------------------------------------------------------------------

@pytest.mark.parametrize("run", __import__("slimfit.accuracy_price", fromlist=["x"]).BUDGET_RUNS,
                         ids=lambda r: f"{r.task}/{r.arm}/seed{r.seed}")
def test_budget_runs_equal_the_committed_study(run):
    from slimfit.experiments.fidelity import reference
    rows = _rows()
    mine, full = rows[(run.task, run.arm, run.seed)], rows[(run.task, reference(run.arm), run.seed)]
    assert mine["steps"] == run.steps == full["steps"]
    assert run.gap == pytest.approx(100 * (mine["val_acc"] - full["val_acc"]), abs=0.005)


def test_every_run_of_the_defaults_at_any_budget_is_in_the_table():
    from slimfit.accuracy_price import BUDGET_RUNS
    arms = ("slimfit", "slimfit-0.2ep", "slimfit-1ep")
    recorded = {(t, a, s) for (t, a, s) in _rows() if a in arms}
    assert recorded == {(r.task, r.arm, r.seed) for r in BUDGET_RUNS}


def _table(monkeypatch, *runs):
    from slimfit import accuracy_price as ap
    monkeypatch.setattr(ap, "STUDY_TRAINED", (1, 10))  # updates per unit = steps / 10
    monkeypatch.setattr(ap, "BUDGET_RUNS", tuple(ap.BudgetRun("t", "a", i, s, g)
                                                 for i, (s, g) in enumerate(runs)))
    return ap


def test_short_budget_note_warns_below_the_first_count_past_the_last_loss(monkeypatch):
    # lost 5 points at 6 updates per unit, within a point at 13 and 30; a loss at 2 too
    ap = _table(monkeypatch, (20, -9.0), (60, -5.0), (130, -0.3), (300, 0.2))
    units, trained = 50, 5  # 0.1 of the units per step
    assert ap.short_budget_note(130, trained, units) is None        # 13 updates: as measured
    note = ap.short_budget_note(100, trained, units)                # 10: between 6 and 13
    assert note is not None and "about 10.0 times" in note and "lost 5.00 points" in note
    assert "at 6.0 updates per unit" in note and "every run from 13.0 on" in note
    assert "train >= 130 steps" in note


def test_short_budget_note_suggests_a_rate_that_reaches_the_count(monkeypatch):
    from slimfit.scheduler import InterLayerScheduler
    ap = _table(monkeypatch, (60, -5.0), (130, -0.3))
    units, trained, steps = 53, 6, 80
    note = ap.short_budget_note(steps, trained, units)
    rate = float(note.split("freeze_rate <= ")[1].split(" ")[0])
    at_rate = InterLayerScheduler([f"u{i}" for i in range(units)], rate).num_trained
    assert steps * at_rate / units >= 13.0                 # the suggestion is enough ...
    higher = InterLayerScheduler([f"u{i}" for i in range(units)], rate + 0.02).num_trained
    assert steps * higher / units < 13.0 or higher == at_rate  # ... and not needlessly low


def test_short_budget_note_is_silent_when_it_cannot_know_or_nothing_is_frozen(monkeypatch):
    ap = _table(monkeypatch, (60, -5.0), (130, -0.3))
    assert ap.short_budget_note(float("inf"), 5, 50) is None   # open-ended run
    assert ap.short_budget_note(10, 50, 50) is None            # every unit trains every step
    ap = _table(monkeypatch, (60, -0.5), (130, -0.3))
    assert ap.short_budget_note(10, 5, 50) is None             # no measured loss past a point
    ap = _table(monkeypatch, (60, -0.5), (130, -3.0))
    assert ap.short_budget_note(10, 5, 50) is None             # no count measured to be enough
    note = _table(monkeypatch, (60, -5.0), (130, -0.3)).short_budget_note(5, 5, 50)
    assert "compression alone (freeze_rate=0.0)" in note       # too few steps for any rate
