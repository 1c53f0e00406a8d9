"""LayerFreezer in a plain PyTorch loop (no Lightning)."""

import math

import pytest
import torch

from slimfit.config import SlimFitConfig
from slimfit.errors import CheckpointMismatchError, SlimFitError
from slimfit.freezer import LayerFreezer

from models import CASES, loss_fn


def train_steps(name, model, batch, freezer, opt, steps):
    frozen_ok = []
    for _ in range(steps):
        frozen = freezer.decide()
        freezer.apply(frozen)
        before = [p.detach().clone() for i in frozen for p in freezer.units[i].params]
        opt.zero_grad(set_to_none=True)
        loss_fn(name, model, batch).backward()
        freezer.before_optimizer_step()
        opt.step()
        freezer.after_optimizer_step()
        after = [p for i in frozen for p in freezer.units[i].params]
        frozen_ok.append(all(torch.equal(a, b) for a, b in zip(before, after)))
    return frozen_ok


@pytest.mark.parametrize("name,factory,batch_fn,_n", CASES, ids=[c[0] for c in CASES])
def test_every_family_trains_with_freezing(name, factory, batch_fn, _n):
    model = factory()
    freezer = LayerFreezer(model, freeze_rate=0.8, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ok = train_steps(name, model, batch_fn(model), freezer, opt, 6)
    assert all(ok)
    assert all(len(f) == math.floor(0.8 * len(freezer.units)) for f in freezer.history.frozen_sets())
    assert sum(s is not None for s in freezer.scheduler.scores) >= min(
        len(freezer.units), 6 * (len(freezer.units) - freezer.num_frozen))


def test_zero_lr_step_is_not_a_measurement():
    model = CASES[0][1]()
    batch = CASES[0][2](model)
    freezer = LayerFreezer(model, freeze_rate=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    train_steps("hf-bert", model, batch, freezer, opt, 1)
    assert freezer.last_stats["measured"] == 0.0
    assert freezer.scheduler.scores == [None] * len(freezer.units)


def test_skipped_step_flag_is_respected():
    model = CASES[0][1]()
    freezer = LayerFreezer(model, freeze_rate=0.5)
    freezer.apply(freezer.decide())
    freezer.before_optimizer_step()
    freezer.after_optimizer_step(skipped=True)
    assert freezer.scheduler.scores == [None] * len(freezer.units)


def test_state_round_trip_and_mismatch():
    model = CASES[0][1]()
    a = LayerFreezer(model, freeze_rate=0.5, seed=1)
    a.apply(a.decide())
    a.before_optimizer_step()
    a.after_optimizer_step()
    a.restore()  # everything trainable again, as in a fresh process
    b = LayerFreezer(model, freeze_rate=0.5, seed=1)
    b.load_state_dict(a.state_dict())
    assert a.decide() == b.decide()
    c = LayerFreezer(model, freeze_rate=0.5, exclude=["classifier.weight"])
    with pytest.raises(CheckpointMismatchError, match="another model"):
        c.load_state_dict(a.state_dict())
    with pytest.raises(CheckpointMismatchError, match="not a SlimFit state"):
        c.load_state_dict({"weights": 1})


def test_misuse_is_reported():
    model = CASES[0][1]()
    f = LayerFreezer(model, freeze_rate=0.5)
    with pytest.raises(SlimFitError, match="before apply"):
        f.before_optimizer_step()
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
        f = LayerFreezer(model, freeze_rate=0.0, lr_normalized=normalized)
        f.apply(f.decide())
        model(torch.randn(3, 4)).sum().backward()
        f.before_optimizer_step(opt)
        opt.step()
        f.after_optimizer_step()
        scores[normalized] = f.scheduler.scores
    torch.testing.assert_close(scores[True], [scores[False][0] / 0.5, scores[False][1] / 0.1])
    with pytest.raises(SlimFitError, match="needs before_optimizer_step\\(optimizer\\)"):
        f.apply(f.decide())
        f.before_optimizer_step()
