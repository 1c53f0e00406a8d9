"""LayerFreezer: in a session (plain PyTorch, no Lightning), and its own
moments (decide, apply, snapshot, record) as unit tests."""

import math

import pytest
import torch

from slimfit import SlimFitConfig
from slimfit import CheckpointMismatchError, NonFiniteError, SlimFitError
from slimfit import LayerFreezer, SessionConfig, SlimFitSession
from slimfit.freezing.scores import SCORES

from models import BERT, each_case


def train_steps(case, model, opt, steps, **freezing):
    """``steps`` session steps; returns the freezer and, per step, whether every
    frozen tensor stayed bit-identical."""
    session = SlimFitSession(model, SessionConfig(freezing=SlimFitConfig(**freezing))).start(opt)
    freezer, batch = session.freezer, case.batch(model)
    frozen_ok = []
    for _ in range(steps):
        frozen = session.decide()
        before = [p.detach().clone() for i in frozen for p in freezer.units[i].params]
        session.step(lambda: case.loss(model, batch), frozen=frozen)
        after = [p for i in frozen for p in freezer.units[i].params]
        frozen_ok.append(all(torch.equal(a, b) for a, b in zip(before, after)))
    session.stop()
    return freezer, frozen_ok


@each_case()
def test_every_family_trains_with_freezing(case):
    model = case.factory()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    freezer, ok = train_steps(case, model, opt, 6, freeze_rate=0.8, seed=0)
    assert all(ok)
    assert all(len(f) == math.floor(0.8 * len(freezer.units)) for f in freezer.history.frozen_sets())
    assert sum(s is not None for s in freezer.scheduler.scores) >= min(
        len(freezer.units), 6 * (len(freezer.units) - freezer.num_frozen))


def test_zero_lr_step_is_not_a_measurement():
    model = BERT.factory()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    freezer, _ = train_steps(BERT, model, opt, 1, freeze_rate=0.5)
    assert freezer.last_stats["measured"] == 0.0
    assert freezer.scheduler.scores == [None] * len(freezer.units)


@pytest.mark.parametrize("skipped", [True, False])
def test_skipped_step_flag_is_respected(skipped):
    """A real backward and a real step move the trained weights; flagged as
    skipped (the grad scaler's verdict) the step records no score, unflagged
    the same step does (so ignoring the flag would be caught)."""
    model = BERT.factory()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = LayerFreezer(model, freeze_rate=0.5)
    freezer.apply(freezer.decide())
    BERT.loss(model, BERT.batch(model)).backward()
    freezer.snapshot(opt)
    opt.step()
    stats = freezer.record(skipped=skipped)
    measured = [s is not None for s in freezer.scheduler.scores]
    assert stats["measured"] == float(not skipped)
    assert not any(measured) if skipped else sum(measured) == len(freezer.units) - freezer.num_frozen


def test_state_round_trip_and_mismatch():
    model = BERT.factory()
    a = LayerFreezer(model, freeze_rate=0.5, seed=1)
    a.apply(a.decide())
    a.snapshot()
    a.record()
    a.restore()  # everything trainable again, as in a fresh process
    b = LayerFreezer(model, freeze_rate=0.5, seed=1)
    b.load_state_dict(a.state_dict())
    assert a.decide() == b.decide()
    c = LayerFreezer(model, freeze_rate=0.5, exclude=["pooler.dense.weight"])
    with pytest.raises(CheckpointMismatchError, match="another model"):
        c.load_state_dict(a.state_dict())
    with pytest.raises(CheckpointMismatchError, match="not a SlimFit state"):
        c.load_state_dict({"weights": 1})


def test_misuse_is_reported():
    model = BERT.factory()
    f = LayerFreezer(model, freeze_rate=0.5)
    with pytest.raises(SlimFitError, match="before apply"):
        f.snapshot()
    with pytest.raises(SlimFitError, match="exactly"):
        f.apply([0])
    with pytest.raises(SlimFitError, match="either config"):
        LayerFreezer(model, SlimFitConfig(), freeze_rate=0.5)


@pytest.mark.parametrize("kw,match", [
    ({"max_frozen_age": 0}, "max_frozen_age"), ({"seed": 1.5}, "seed must be an int"),
    ({"groups": "(.*)"}, "wrap it in a list"), ({"score_eps": 0}, "score_eps")])
def test_config_validation(kw, match):
    with pytest.raises(SlimFitError, match=match):
        SlimFitConfig(**kw)


def test_lr_normalized_scores_divide_by_the_step_learning_rate():
    torch.manual_seed(0)
    scores = {}
    for normalized in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.5},
                               {"params": model[1].parameters(), "lr": 0.1}])
        f = LayerFreezer(model, freeze_rate=0.0, lr_normalized=normalized, train_new_heads=False)
        f.apply(f.decide())
        model(torch.randn(3, 4)).sum().backward()
        f.snapshot(opt)
        opt.step()
        f.record()
        scores[normalized] = f.scheduler.scores
    torch.testing.assert_close(scores[True], [scores[False][0] / 0.5, scores[False][1] / 0.1])
    with pytest.raises(SlimFitError, match="needs snapshot\\(optimizer\\)"):
        f.apply(f.decide())
        f.snapshot()


# -- non-finite steps (issue 10) --------------------------------------------------------

class NaNWritingSGD(torch.optim.SGD):
    """Writes NaN into every parameter it updates at step ``bad_step``."""

    def __init__(self, params, bad_step):
        super().__init__(params, lr=1e-2)
        self.bad_step, self.n = bad_step, 0

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        if self.n == self.bad_step:
            for g in self.param_groups:
                for p in g["params"]:
                    if p.grad is not None:
                        p.fill_(float("nan"))
        self.n += 1


def run_with_nonfinite(freezer, model, opt, steps, nan_loss_at=None):
    """Train ``steps`` steps; at ``nan_loss_at`` the loss is multiplied by NaN.
    Returns the scheduler's scores after each step."""
    batch = BERT.batch(model)
    history = []
    for step in range(steps):
        freezer.apply(freezer.decide())
        opt.zero_grad(set_to_none=True)
        loss = BERT.loss(model, batch)
        if step == nan_loss_at:
            loss = loss * float("nan")
        loss.backward()
        freezer.snapshot(opt)
        opt.step()
        freezer.record(loss=loss.detach())
        history.append(list(freezer.scheduler.scores))
    return history


def test_nan_loss_warns_once_naming_the_step_and_records_no_scores():
    model = BERT.factory()
    freezer = LayerFreezer(model, freeze_rate=0.5, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match=r"non-finite loss/scores at step 3 \(the loss") as rec:
        scores = run_with_nonfinite(freezer, model, opt, 7, nan_loss_at=3)
    assert sum("non-finite" in str(w.message) for w in rec) == 1  # once, for steps 3..6
    assert scores[3:] == [scores[2]] * 4  # nothing recorded from step 3 on (weights are NaN)
    assert all(math.isfinite(s) for s in scores[-1] if s is not None)
    assert freezer.nonfinite_steps == [3, 4, 5, 6]
    assert len(freezer.history) == 7 and freezer.scheduler.step == 7  # ages, history advance
    assert freezer.last_stats["nonfinite"] == 1.0 and "[3, 4, 5, 6]" in freezer.summary()


def test_nan_loss_raises_naming_the_step():
    model = BERT.factory()
    freezer = LayerFreezer(model, freeze_rate=0.5, on_nonfinite="raise")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(NonFiniteError, match="step 2 .*the loss"):
        run_with_nonfinite(freezer, model, opt, 5, nan_loss_at=2)
    assert freezer.scheduler.step == 3 and freezer.frozen is None  # state consistent


def test_nonfinite_loss_flag_alone_is_enough():
    """A float loss or an "all micro-batches finite" bool tensor: the scores may be finite."""
    for flag in (float("inf"), torch.tensor(False)):
        model = BERT.factory()
        freezer = LayerFreezer(model, freeze_rate=0.5)
        freezer.apply(freezer.decide())
        BERT.loss(model, BERT.batch(model)).backward()
        freezer.snapshot()
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        with pytest.warns(UserWarning, match="step 0"):
            freezer.record(loss=flag)
        assert freezer.scheduler.scores == [None] * len(freezer.units)


@pytest.mark.parametrize("score", SCORES)
def test_optimizer_writing_nan_is_detected_by_every_score(score):
    model = BERT.factory()
    freezer = LayerFreezer(model, freeze_rate=0.5, seed=1, score=score)
    with pytest.warns(UserWarning, match=r"step 2 \(scores of \d+ unit"):
        scores = run_with_nonfinite(freezer, model, NaNWritingSGD(model.parameters(), 2), 4)
    assert scores[2] == scores[1] and freezer.nonfinite_steps[0] == 2
    with pytest.raises(NonFiniteError, match="step 2"):
        model = BERT.factory()
        f = LayerFreezer(model, freeze_rate=0.5, score=score, on_nonfinite="raise")
        run_with_nonfinite(f, model, NaNWritingSGD(model.parameters(), 2), 4)


def test_skipped_step_is_not_read_and_not_warned(recwarn):
    model = BERT.factory()
    freezer = LayerFreezer(model, freeze_rate=0.5)
    freezer.apply(freezer.decide())
    freezer.snapshot()
    freezer.record(skipped=True, loss=torch.tensor(float("inf")))  # AMP overflow
    assert not [w for w in recwarn if "non-finite" in str(w.message)]
    assert freezer.nonfinite_steps == []


# -- options of the fidelity study (issue 12) ---------------------------------------------

@pytest.mark.parametrize("kw", [{"score": s} for s in SCORES] + [
    {"selection": "sample", "reserve_fraction": 0.3, "frozen_score_decay": 0.9}])
def test_every_score_and_policy_trains_with_exact_frozen_counts(kw):
    model = BERT.factory()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    freezer, ok = train_steps(BERT, model, opt, 12, freeze_rate=0.8, seed=0, **kw)
    assert all(ok)
    k = math.floor(0.8 * len(freezer.units))
    assert all(len(f) == k for f in freezer.history.frozen_sets())
    assert freezer.scheduler.initial_pass_done
    assert all(s > 0 and math.isfinite(s) for s in freezer.scheduler.scores)


def test_the_default_reserves_a_slot_and_says_how_many():
    freezer = LayerFreezer(BERT.factory(), freeze_rate=0.9, seed=0)
    assert freezer.config.reserve_fraction == 0.25  # the fidelity study's choice
    n_train = len(freezer.units) - freezer.num_frozen
    assert f"1 of the {n_train} trained slots reserved" in freezer.describe()
    topk = LayerFreezer(BERT.factory(), freeze_rate=0.9, seed=0, reserve_fraction=0.0)
    assert "reserved" not in topk.describe()


def test_embedding_tables_are_scored_over_used_rows():
    model = BERT.factory()
    f = LayerFreezer(model, freeze_rate=0.0, score="update_norm")
    word = "bert.embeddings.word_embeddings.weight"
    assert id(dict(model.named_parameters())[word]) in f._tables
    assert not any(id(p) in f._tables for p in model.bert.encoder.parameters())


@pytest.mark.parametrize("kw,match", [
    ({"score": "adam"}, "score must be one of 'paper', 'update_norm', 'grad_norm', 'fisher'"),
    ({"on_nonfinite": "ignore"}, "on_nonfinite must be one of 'warn', 'raise', got 'ignore'"),
    ({"selection": "top"}, "selection must be one of 'topk', 'sample'"),
    ({"train_new_heads": 1}, "train_new_heads must be a bool, got 1"),
    ({"frozen_score_decay": 0.0}, r"frozen_score_decay must be None or a number in \(0, 1\]"),
    ({"frozen_score_decay": 1.5}, "got 1.5"),
    ({"reserve_fraction": 1.0}, r"reserve_fraction must be a number in \[0, 1\), got 1.0"),
    ({"reserve_fraction": float("nan")}, "reserve_fraction"),
    ({"score": "grad_norm", "lr_normalized": True}, "lr_normalized=True.*'grad_norm'")])
def test_new_options_are_validated(kw, match):
    with pytest.raises(SlimFitError, match=match):
        SlimFitConfig(**kw)


def test_a_bytes_rate_trains_within_its_budget_and_resumes_identically():
    model = BERT.factory()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    freezer, ok = train_steps(BERT, model, opt, 12, freeze_rate=0.6, rate_of="bytes", seed=0)
    assert all(ok)
    sizes = [sum(p.numel() * p.element_size() for p in u.params) for u in freezer.units]
    budget = freezer.scheduler.trained_bytes_budget
    assert budget == int(0.4 * sum(sizes))
    index = {n: i for i, n in enumerate(freezer.names)}
    trained_sets = [set(range(len(sizes))) - {index[n] for n in f}
                    for f in freezer.history.frozen_sets()]
    assert all(0 < sum(sizes[i] for i in t) <= budget for t in trained_sets)
    assert len({len(t) for t in trained_sets}) > 1  # the count follows the units' sizes
    assert "freeze rate 0.6 of the bytes (at most" in freezer.describe()
    resumed = LayerFreezer(model, freeze_rate=0.6, rate_of="bytes", seed=7)
    resumed.load_state_dict(freezer.state_dict())
    assert [resumed.decide() for _ in range(5)] == [freezer.decide() for _ in range(5)]
    with pytest.raises(SlimFitError, match=r"trained units hold \d+ bytes, above the step's budget"):
        freezer.apply([])
