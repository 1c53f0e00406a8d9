"""The budget planner: plans fit the budget on the ledger, bad budgets fail clearly."""

import pytest
import torch

from slimfit.evidence import Evidence
from slimfit import (BudgetError, CompressionConfig, SessionConfig, SlimFitConfig, SlimFitSession,
                     StreamConfig, parse_budget, plan_for_budget)

import models


# (id: model case), built from seed 0 in eval mode (no dropout)
CASES = {
    "bert": models.case("hf-bert", vocab=512, hidden=64, heads=4, intermediate=256,
                        batch=dict(n=16, seq=48)),
    "vit": models.case("hf-vit", patch=4, hidden=64, heads=4, intermediate=256, labels=10,
                       batch=dict(n=16)),
    # weights dominate (4 wide blocks, tiny batch): the case for weight streaming
    "wide": models.case("hf-bert", layers=4, vocab=64, hidden=64, heads=4, intermediate=1024,
                        positions=16, batch=dict(n=2, seq=8)),
}


def build(name):
    """The model of case ``name`` and its first batch (generator seed 0)."""
    case = CASES[name]
    model = case.build().eval()
    return model, case.batch(model, generator=torch.Generator().manual_seed(0))


def cand(rate, compression=False, offload_optimizer_state=False, stream_weights=False):
    """A configuration the planner may try (``candidates=[...]``)."""
    return SessionConfig(freezing=SlimFitConfig(freeze_rate=rate),
                         compression=CompressionConfig() if compression else None,
                         offload_optimizer_state=offload_optimizer_state,
                         stream=StreamConfig() if stream_weights else None)


def rate(config):
    return config.freezing.freeze_rate


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-3)


def run_plan(model, plan, batch_fn, steps):
    """Train with the plan's configuration; return the ledger totals per step."""
    session = SlimFitSession(model, plan.config).start(adamw(model.parameters()))
    g = torch.Generator().manual_seed(1)
    totals = []
    for _ in range(steps):
        batch = batch_fn(g)
        totals.append(session.step(lambda: model(**batch).loss, measure=True).total)
    session.stop()
    return totals


@pytest.mark.parametrize("name", ["bert", "vit", "wide"])
def test_plans_respect_the_budget_on_the_ledger(name):
    model, batch = build(name)
    loss = lambda: model(**batch).loss  # noqa: E731
    full = plan_for_budget(model, adamw, loss, 10**12, candidates=[cand(0.0)])
    seen = set()
    streamed_k = set()
    for frac in (1.2, 0.75, 0.55, 0.4, 0.35, 0.3, 0.25):
        budget = int(full.expected_total * frac)
        try:
            plan = plan_for_budget(model, adamw, loss, budget)
        except BudgetError:
            continue
        seen.add(plan.label())
        assert plan.expected_total <= budget
        model_copy = build(name)[0]
        model_copy.load_state_dict(model.state_dict())
        # enough steps for every unit to be trained once (steady-state optimizer
        # state): 22 units (38 for "wide"), at r=0.95 two are trained per step
        totals = run_plan(model_copy, plan, lambda g: CASES[name].batch(model_copy, generator=g),
                          steps=20 if name == "wide" else 13)
        assert max(totals) <= budget, (plan.describe(), max(totals), budget)
        if plan.stream:
            streamed_k.add(plan.stream[0])
    assert len(seen) >= 3, seen  # several budgets, several different plans
    if name == "wide":  # weights dominate: tight budgets stream them rather than freeze more
        assert streamed_k, seen


def test_planner_restores_the_weights():
    model, batch = build("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan_for_budget(model, adamw, lambda: model(**batch).loss, "10GiB")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_budget_below_any_plan_is_a_clear_error():
    model, batch = build("bert")
    with pytest.raises(BudgetError, match="no SlimFit configuration fits a budget of 1.00 MiB: "
                                          "the smallest expected peak is"):
        plan_for_budget(model, adamw, lambda: model(**batch).loss, "1MiB")


@pytest.mark.parametrize("text,expected", [("12GiB", 12 * 2**30), ("800 MiB", 800 * 2**20),
                                           ("16GB", 16 * 10**9), ("1.5G", 1_500_000_000),
                                           (4096, 4096)])
def test_parse_budget(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("bad", ["twelve gigs", "12 parsecs", "-3GiB", "0", True, ""])
def test_bad_budgets(bad):
    with pytest.raises(BudgetError):
        parse_budget(bad)


def test_slimfit_callback_with_memory_budget(tmp_path):
    from conftest import lit_module, token_loader, trainer
    from slimfit.callbacks import MemoryMonitor, SlimFit

    lit = lit_module(lr=1e-2)
    x, y = next(iter(token_loader(n=64, batch_size=8)))
    full = plan_for_budget(lit, adamw, lambda: lit.model(input_ids=x, labels=y).loss, "1TiB")
    budget = int(full.expected_total * 0.5)  # below compression alone: freezing must help
    sf, mon = SlimFit(memory_budget=budget), MemoryMonitor(every_n_steps=1)
    trainer(tmp_path, max_steps=14, callbacks=[sf, mon]).fit(lit, token_loader(n=128, batch_size=8))
    assert sf.plan is not None and rate(sf.plan.config) > 0
    assert sf.plan.expected_total <= budget
    assert max(r.total for _, r in mon.history) <= budget


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert-base", "vit-b16"])
def test_plans_respect_the_budget_for_full_size_configs(name):
    """BERT-base and ViT-B/16 as configured (random init; short sequence / small
    images to keep the run to about a minute), at budgets from 80% to 15% of full
    fine-tuning: every plan's ledger peak over real steps stays within it."""
    from slimfit.experiments.bench_cases import build_case
    case = build_case(name, 2, seq_len=32, image_size=64)
    model, batch, loss = case.model, case.batch, case.loss
    full = plan_for_budget(model, adamw, loss, 10**13, candidates=[cand(0.0)])
    plans = []
    for frac in (0.8, 0.6, 0.4, 0.3, 0.2, 0.15):
        budget = int(full.expected_total * frac)
        try:
            plan = plan_for_budget(model, adamw, loss, budget)
        except BudgetError:
            continue
        plans.append(plan.label())
        assert plan.expected_total <= budget
        steps = 1 + int(1 / (1 - rate(plan.config)) + 0.5)  # every unit trained once
        # a fresh model from the same seed: the planner restored its weights anyway
        fresh = build_case(name, 2, seq_len=32, image_size=64).model
        totals = run_plan(fresh, plan, lambda _g: batch, steps)  # HF models: labels in batch
        assert max(totals) <= budget, (plan.describe(), max(totals), budget)
    # at this small shape weights and optimizer state dominate: the plans jump from
    # optimizer-state offload to weight streaming as the budget tightens
    assert len(set(plans)) >= 2, plans
    assert any("weight streaming" in p for p in plans), plans


# -- accuracy first: exact techniques before freezing, the lowest rate that fits --------------

def _fits(model, loss, budget, cand):
    try:
        plan_for_budget(model, adamw, loss, budget, candidates=[cand])
        return True
    except BudgetError:
        return False


@pytest.mark.parametrize("name", ["bert", "wide"])
def test_plan_is_the_least_lossy_that_fits(name):
    """Under each budget the plan freezes as few units as any configuration
    that fits with its compression choice: one unit fewer does not fit even
    with every exact technique on; streaming only where offload alone does not
    fit; the printed price is the table's."""
    model, batch = build(name)
    loss = lambda: model(**batch).loss  # noqa: E731
    full = plan_for_budget(model, adamw, loss, 10**12, candidates=[cand(0.0)])
    n = len(SlimFitSession(model, plan_for_budget(model, adamw, loss, 1 << 40).config).units)
    rates = set()
    for frac in (0.7, 0.5, 0.4, 0.3):
        budget = int(full.expected_total * frac)
        try:
            plan = plan_for_budget(model, adamw, loss, budget)
        except BudgetError:
            continue
        c = plan.config
        k = int(rate(c) * n)
        rates.add(round(rate(c), 4))
        # the printed price is the study's for the plan's own rate and compression
        gap, source = Evidence.default().expected_price(rate(c), c.compression is not None)
        assert plan.price == (gap, source)
        assert f"expected accuracy price {gap:+.2f} points vs full fine-tuning ({source})" \
            in plan.describe()
        if k == 0:
            continue
        everything = dict(offload_optimizer_state=True, stream_weights=name == "wide")
        fewer = cand((k - 1 + 1e-6) / n if k > 1 else 0.0, compression=c.compression is not None,
                     **everything)
        assert not _fits(model, loss, budget, fewer), (plan.describe(), fewer)
        # the exact techniques the plan uses are all needed at its rate
        if c.stream is not None:
            assert not _fits(model, loss, budget, cand(
                rate(c), compression=c.compression is not None, offload_optimizer_state=True))
    # a continuous search: a plan freezes at a rate other than the paper's 0.8 / 0.9 / 0.95
    assert any(0 < r < 1 and r not in {0.8, 0.9, 0.95} for r in rates), rates


def _measured_losses():
    """The study's measured settings whose price is their own mean gap: a loss
    (gap < 0) no lower rate of the same setting measured as larger (more
    freezing is never priced cheaper than less)."""
    prices = Evidence.default().prices
    return [(r, comp, p) for (r, comp), p in sorted(prices.items())
            if p.gap < 0 and all(q.gap >= p.gap for (r2, c2), q in prices.items()
                                 if c2 == comp and r2 < r)]


def test_a_plan_at_a_measured_rate_prints_the_measured_price():
    """A plan at a rate the study measured prints that measurement: its gap as
    the table has it, and where it was measured."""
    model, batch = build("bert")
    loss = lambda: model(**batch).loss  # noqa: E731
    measured = _measured_losses()
    assert measured  # the shipped evidence holds such a setting
    for r, comp, price in measured:
        plan = plan_for_budget(model, adamw, loss, 1 << 40, candidates=[cand(r, compression=comp)])
        assert (rate(plan.config), plan.config.compression is not None) == (r, comp)
        assert plan.price[0] == price.gap, (r, comp, plan.price, price)
        where = "all tasks" if price.task == "all" else price.task
        assert (f"expected accuracy price {price.gap:+.2f} points vs full fine-tuning (measured: "
                f"{where}, {price.runs} paired run(s))") in plan.describe()


def test_exact_techniques_come_before_more_freezing():
    """The old ladder froze at r=0.8 (lossy) before trying optimizer-state
    offload (exact); where offload alone makes a lower rate fit, the plan uses it."""
    model, batch = build("bert")
    loss = lambda: model(**batch).loss  # noqa: E731
    full = plan_for_budget(model, adamw, loss, 10**12, candidates=[cand(0.0)])
    budget = int(full.expected_total * 0.4)
    plan = plan_for_budget(model, adamw, loss, budget)
    assert plan.config.offload_optimizer_state
    assert not _fits(model, loss, budget, cand(rate(plan.config),
                                              compression=plan.config.compression is not None))
    text = plan.describe()
    assert "expected accuracy price" in text and "points vs full fine-tuning" in text


def test_activation_scale_plans_for_a_larger_batch():
    """Planning batch 16 from a batch-4 calibration step (scale 4) gives about
    the activations measured at batch 16 (they are linear in the batch)."""
    model, _ = build("bert")
    small, large = (CASES["bert"].batch(model, n=n, generator=torch.Generator().manual_seed(0))
                    for n in (4, 16))
    full = [cand(0.0)]
    at4 = plan_for_budget(model, adamw, lambda: model(**small).loss, 1 << 40, full,
                          activation_scale=4.0)
    at16 = plan_for_budget(model, adamw, lambda: model(**large).loss, 1 << 40, full)
    a4, a16 = at4.expected["activations"], at16.expected["activations"]
    assert abs(a4 - a16) / a16 < 0.05, (a4, a16)
    # on the line through batches 2 and 4 (same frozen set): the same, or closer
    tiny = CASES["bert"].batch(model, n=2, generator=torch.Generator().manual_seed(0))
    fit = plan_for_budget(model, adamw, lambda: model(**small).loss, 1 << 40, full,
                          activation_scale=4.0, small_batch=(lambda: model(**tiny).loss, 0.5))
    assert abs(fit.expected["activations"] - a16) <= abs(a4 - a16) + 0.01 * a16
    with pytest.raises(BudgetError, match="small_batch must be"):
        plan_for_budget(model, adamw, lambda: model(**small).loss, "1GiB",
                        small_batch=(lambda: 0, 2.0))
    with pytest.raises(BudgetError, match="activation_scale must be a positive number"):
        plan_for_budget(model, adamw, lambda: model(**small).loss, "1GiB", activation_scale=0)
    with pytest.raises(BudgetError, match=r"max_freeze_rate must be in \[0, 1\)"):
        plan_for_budget(model, adamw, lambda: model(**small).loss, "1GiB", max_freeze_rate=1.0)


def test_worst_trained_set_counts_distinct_inputs_and_only_linears_as_measured():
    from slimfit.planning.calibration import _worst_dynamic
    # units: q, k, v of block 0 share input 0; fc1 of blocks 0-1 (inputs 1, 2);
    # a LayerNorm (input 3, saved whether or not its weight trains)
    inputs = [(0, 100, True), (0, 100, True), (0, 100, True), (1, 100, True), (2, 100, True),
              (3, 100, False)]
    # three units train: the worst set saves three distinct inputs (300), not
    # q, k, v together (100) as a ranking by bytes alone would pick on the tie
    assert _worst_dynamic(inputs, frozen=[0, 1, 2], n_train=3) == 300 - 200
    # the measured step trained q and the LayerNorm: only q's input was surely saved
    assert _worst_dynamic(inputs, frozen=[1, 2, 3, 4], n_train=2) == 200 - 100
    # by bytes: q, k, v weigh 10 each, the fc1s 40, the norm 1; a budget of 30 weight
    # bytes covers the norm's input (1), q/k/v's shared one once (10) and 19/40 of an
    # fc1's: 247.5 (the fractional knapsack, an upper bound), below the count's 400
    sizes = [10, 10, 10, 40, 40, 1]
    assert _worst_dynamic(inputs, [0, 1, 2, 3, 4, 5], 6, sizes, budget=30) == 248
    assert _worst_dynamic(inputs, [0, 1, 2, 3, 4, 5], 2, sizes, budget=10**6) == 200


def test_unit_inputs_record_linears_and_skip_norms_that_save_their_input_anyway():
    from slimfit.planning.calibration import _unit_inputs
    from slimfit.selection import select_units
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    units = select_units(model).units
    with _unit_inputs(model, units) as seen:
        model(torch.randn(4, 8))
    by_name = dict(zip((u.name for u in units), seen))
    assert by_name["0.weight"][1:] == (4 * 8 * 4, True)
    assert by_name["2.weight"][1:] == (4 * 8 * 4, True)
    assert by_name["1.weight"] == (None, 0, False)  # LayerNorm with a trainable bias: static


def test_a_plan_keeps_the_users_policy_and_says_its_price_is_the_score_policys():
    """The planner never switches policy (the policy study found the score policy
    closest to full fine-tuning); a user's LISA or BAdam survives planning, and
    the price printed is marked as measured under the score policy."""
    model, batch = build("bert")
    loss = lambda: model(**batch).loss  # noqa: E731
    base = SessionConfig(freezing=SlimFitConfig(policy="lisa", interval=5))
    plan = plan_for_budget(model, adamw, loss, 1 << 40, base=base, candidates=[cand(0.9)])
    assert plan.config.freezing.policy == "lisa" and plan.config.freezing.interval == 5
    assert "measured with policy='slimfit'" in plan.price[1]
    assert "policy='lisa' further from full fine-tuning" in plan.describe()
    plain = plan_for_budget(model, adamw, loss, 1 << 40, candidates=[cand(0.9)])
    assert "measured with policy" not in plain.price[1]


def test_a_bytes_rate_bounds_gradients_by_the_rate_and_the_run_stays_under_the_plan():
    # the word embedding (512 x 64) is 8x a 64 x 64 projection: counted in units, the
    # largest trained set at r = 0.7 holds it and the other biggest units; in bytes,
    # at most 30% of the candidates' bytes train
    model, batch = build("bert")
    loss = lambda: model(**batch).loss  # noqa: E731
    plans = {of: plan_for_budget(model, adamw, loss, 10**12, candidates=[cand(0.7)],
                                 base=SessionConfig(freezing=SlimFitConfig(rate_of=of)))
             for of in ("units", "bytes")}
    assert plans["bytes"].config.freezing.rate_of == "bytes"  # the user's choice is kept
    session = SlimFitSession(model, plans["bytes"].config)
    budget = session.freezer.scheduler.trained_bytes_budget
    candidates = sum(p.numel() * 4 for p in session.freezer.parameters())
    always = sum(p.numel() * 4 for p in model.parameters()) - candidates
    assert plans["bytes"].expected["gradients"] <= always + budget
    assert plans["bytes"].expected["gradients"] < 0.8 * plans["units"].expected["gradients"]
    copy = build("bert")[0]
    copy.load_state_dict(model.state_dict())
    totals = run_plan(copy, plans["bytes"], lambda g: CASES["bert"].batch(copy, generator=g), 14)
    assert max(totals) <= plans["bytes"].expected_total


def test_the_planner_never_tries_a_bytes_rate_at_which_a_unit_could_never_train():
    model, batch = build("bert")
    loss = lambda: model(**batch).loss  # noqa: E731
    full = plan_for_budget(model, adamw, loss, 10**12, candidates=[cand(0.0)])
    base = SessionConfig(freezing=SlimFitConfig(freeze_rate=0.5, rate_of="bytes"))
    plan = plan_for_budget(model, adamw, loss, int(full.expected_total * 0.36), base=base)
    assert plan.config.freezing.freeze_rate > 0.5, plan.describe()
    assert plan.config.freezing.rate_of == "bytes"
    assert "not of the bytes" in plan.price[1]
    SlimFitSession(model, plan.config)  # a rate every unit can train under
