"""The core step object and the robustness gaps of issue 10: options survive
the budget planner, budgets on block-less models, non-finite losses, and a
resume in the middle of an epoch."""

import dataclasses
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from slimfit.callbacks import SlimFit
from slimfit import CompressionConfig
from slimfit import SlimFitConfig
from slimfit import SlimFitError
from slimfit import BudgetError, plan_for_budget
from slimfit import SessionConfig, SlimFitSession, StreamConfig

from conftest import LitClassifier, lit_module, no_dropout_lit, token_loader, trainer
import models


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-3)


# -- the session itself ----------------------------------------------------------------

def test_session_steps_freeze_exactly_and_stop_restores_everything():
    model = models.hf_bert()
    batch = models.text_batch(model)
    opt = adamw(model.parameters())
    session = SlimFitSession(model, SessionConfig(freezing=SlimFitConfig(freeze_rate=0.75),
                                                  compression=CompressionConfig()))
    with pytest.raises(SlimFitError, match="before start"):
        session.begin_step()
    session.start(opt).start(opt)  # idempotent
    assert session.compressor.installed
    k = math.floor(0.75 * len(session.units))
    for _ in range(4):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        frozen = session.begin_step()
        assert len(frozen) == k
        names = {n for i in frozen for n in session.units[i].param_names}
        assert all(not p.requires_grad for n, p in model.named_parameters() if n in names)
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        session.record_loss(loss)
        loss.backward()
        session.before_optimizer_step()
        opt.step()
        stats = session.end_step()
        assert stats["frozen_units"] == k
        after = dict(model.named_parameters())
        assert all(torch.equal(before[n], after[n]) for n in names)  # frozen: bit-identical
    session.stop()
    session.stop()  # idempotent
    assert all(p.requires_grad for p in model.parameters())
    assert not session.compressor.installed


def test_full_fine_tuning_session_trains_everything():
    model = models.hf_bert()
    batch = models.text_batch(model)
    session = SlimFitSession(model).start(adamw(model.parameters()))
    report = session.step(lambda: model(**batch).loss, measure=True)
    assert report.gradients == sum(4 * p.numel() for p in model.parameters())
    assert session.freezer is None and session.state_dict() == {}


def test_session_config_rejects_offload_without_freezing():
    with pytest.raises(SlimFitError, match="offload_optimizer_state=True .* needs freezing"):
        SessionConfig(offload_optimizer_state=True)
    with pytest.raises(SlimFitError, match="compression must be a CompressionConfig or None, got 'int8'"):
        SessionConfig(compression="int8")


# -- options survive the budget planner ---------------------------------------------------

def test_every_freezing_option_survives_memory_budget(tmp_path):
    """Planning used to rebuild the freezer from a keyword dict without
    ``score_eps``: the user's value was silently dropped. Every option other
    than the rate the plan chose must arrive as given."""
    options = dict(score_eps=0.25, max_frozen_age=3, lr_normalized=True, seed=7,
                   always_train=["classifier.weight"], exclude=r".*pooler.*")
    sf = SlimFit(memory_budget="1TiB", **options)
    trainer(tmp_path, max_steps=2, callbacks=[sf]).fit(lit_module(), token_loader(n=16))
    got = sf.session.freezer.config
    want = dataclasses.replace(SlimFitConfig(freeze_rate=0.9, **options),
                               freeze_rate=sf.plan.config.freezing.freeze_rate)
    assert got == want
    assert sf.plan.config.freezing == want


def test_compression_settings_survive_memory_budget():
    """A plan that compresses carries the user's CompressionConfig itself (not
    the defaults, not dropped); one that does not need it leaves it off."""
    model = models.hf_bert()
    batch = models.text_batch(model)
    comp = CompressionConfig(layernorm="topk", min_numel=7)
    base = SessionConfig(freezing=SlimFitConfig(score_eps=0.5), compression=comp)
    full = plan_for_budget(model, adamw, lambda: model(**batch).loss, 10**12, base=base)
    assert full.config.compression is None  # full fine-tuning fits: nothing lossy
    tight = plan_for_budget(model, adamw, lambda: model(**batch).loss,
                            int(full.expected_total * 0.5), base=base)
    assert tight.config.compression is comp, tight.describe()
    assert tight.config.freezing.score_eps == 0.5


# the 4-block BERT whose weights dominate (tests/test_planner.py "wide"): streaming helps
WIDE = models.case("hf-bert", layers=4, vocab=64, hidden=64, heads=4, intermediate=1024,
                   positions=16, batch=dict(n=2, seq=8))


def test_stream_settings_survive_memory_budget():
    """At one rate, a budget the stream-free configuration fits (its measured
    peak) gives a plan without streaming; one byte less gives the streaming
    one, with the user's units and pinning (k and k' are the planner's)."""
    model = WIDE.build().eval()
    batch = WIDE.batch(model, generator=torch.Generator().manual_seed(0))
    loss = lambda: model(**batch).loss  # noqa: E731
    units = [f"bert.encoder.layer.{i}" for i in (1, 2, 3)]  # not the default (all four)
    base = SessionConfig(freezing=SlimFitConfig(score_eps=0.5),
                         stream=StreamConfig(units=units, pin_memory=False))
    freeze = SessionConfig(freezing=SlimFitConfig(freeze_rate=0.9), offload_optimizer_state=True)
    # a default StreamConfig in a candidate only says "stream": the options are base's
    candidates = [freeze, dataclasses.replace(freeze, stream=StreamConfig())]
    stream_free = plan_for_budget(model, adamw, loss, 10**12, candidates=candidates[:1], base=base)
    budget = stream_free.expected_total  # measured: the stream-free configuration fits exactly

    not_needed = plan_for_budget(model, adamw, loss, budget, candidates=candidates, base=base)
    assert not_needed.stream is None and not_needed.config.stream is None

    needed = plan_for_budget(model, adamw, loss, budget - 1, candidates=candidates, base=base)
    assert needed.expected_total <= budget - 1
    s = needed.config.stream
    assert s is not None and (s.units, s.pin_memory) == (units, False), needed.describe()
    assert 0 <= s.prefetch < s.resident <= len(units)
    assert needed.config.freezing.score_eps == 0.5


# -- budgets on models without repeated blocks -----------------------------------------------

def test_budget_on_a_model_without_blocks_gives_a_plan_or_a_budget_error():
    """Weight streaming needs a list of repeated blocks; the planner must not
    offer it to a model without one (it used to fail with SelectionError), even
    under a budget that needs its most capable exact techniques."""
    model = models.PlainNet()
    x = torch.randint(0, 16, (4, 6))
    y = torch.randint(0, 2, (4,))
    loss = lambda: torch.nn.functional.cross_entropy(model(x), y)  # noqa: E731
    with pytest.raises(BudgetError, match="smallest expected peak is"):
        plan_for_budget(model, adamw, loss, 1)
    full = plan_for_budget(model, adamw, loss, "1GiB")
    assert full.label() == "full fine-tuning"
    # one byte below full fine-tuning's measured peak: the search freezes, and tries
    # every exact technique it may use (optimizer-state offload; never streaming)
    budget = full.expected_total - 1
    plan = plan_for_budget(model, adamw, loss, budget)
    assert plan.expected_total <= budget and plan.config.freezing.freeze_rate > 0
    tried = [label for label, _ in plan.tried]
    assert any("optimizer-state offload" in t for t in tried), tried
    assert not any("weight streaming" in t for t in tried), tried
    assert plan.stream is None and plan.config.stream is None


def test_callback_budget_on_a_model_without_blocks_is_a_budget_error(tmp_path):
    class PlainLit(LitClassifier):
        def training_step(self, batch, _idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x % 16), y)

    with pytest.raises(BudgetError, match="no SlimFit configuration fits a budget of 1 B"):
        trainer(tmp_path, max_steps=1, callbacks=[SlimFit(memory_budget=1)]).fit(
            PlainLit(models.PlainNet()), token_loader(n=8))


# -- non-finite losses ---------------------------------------------------------------------

class NaNAt(LitClassifier):
    """The loss is NaN at optimizer step ``at`` (every weight then moves by NaN
    under AdamW: the classic silent corruption)."""

    def __init__(self, at):
        super().__init__(lr=1e-3)
        self.at = at

    def training_step(self, batch, idx):
        loss = super().training_step(batch, idx)
        return loss * float("nan") if self.global_step == self.at else loss


def test_nonfinite_loss_warns_once_naming_the_step_and_records_no_scores(tmp_path):
    sf = SlimFit(freeze_rate=0.5)
    seen = {}

    class Spy(pl.Callback):  # placed after SlimFit: reads the scores each step starts with
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen[trainer.global_step] = list(sf.freezer.scheduler.scores)

    with pytest.warns(UserWarning, match="non-finite.*step 2") as record:
        trainer(tmp_path, max_steps=6, callbacks=[sf, Spy()]).fit(NaNAt(at=2), token_loader(n=32))
    assert sum("non-finite" in str(w.message) for w in record) == 1  # once, not every step
    assert seen[3] == seen[2]  # step 2's scores were not recorded


def test_nonfinite_loss_can_raise(tmp_path):
    sf = SlimFit(freeze_rate=0.5, on_nonfinite="raise")
    with pytest.raises(SlimFitError, match="step 1"):
        trainer(tmp_path, max_steps=4, callbacks=[sf]).fit(NaNAt(at=1), token_loader(n=32))


# -- resume in the middle of an epoch -----------------------------------------------------------

class ResumableLoader(torch.utils.data.DataLoader):
    """A DataLoader Lightning can resume mid-epoch (``state_dict`` interface):
    it skips the batches the interrupted epoch already consumed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._done = self._skip = 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self._done = 0
        for i, b in enumerate(super().__iter__()):
            if i >= skip:
                self._done = i + 1
                yield b

    def state_dict(self):
        return {"done": self._done}

    def load_state_dict(self, state):
        self._skip = state["done"]


def loader():
    base = token_loader(n=32, batch_size=4)  # 8 batches per epoch
    return ResumableLoader(base.dataset, batch_size=4, shuffle=False)


def test_mid_epoch_resume_gives_the_same_decisions_and_weights(tmp_path):
    full = SlimFit(freeze_rate=0.75, seed=5)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    ref = no_dropout_lit()
    trainer(tmp_path / "a", max_steps=12, callbacks=[full, ckpt], enable_checkpointing=True).fit(
        ref, loader())
    mid = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"  # 3 of the epoch's 8 batches done
    assert mid.exists(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())

    resumed = SlimFit(freeze_rate=0.75, seed=5)
    lit = no_dropout_lit(seed=1)  # other initial weights: everything must come from the checkpoint
    trainer(tmp_path / "b", max_steps=12, callbacks=[resumed]).fit(lit, loader(), ckpt_path=str(mid))
    assert resumed.freezer.history.steps == list(range(12))
    assert resumed.freezer.history.frozen_sets() == full.freezer.history.frozen_sets()
    assert resumed.freezer.scheduler.scores == full.freezer.scheduler.scores
    for (n, a), b in zip(ref.named_parameters(), lit.parameters()):
        assert torch.equal(a, b), n


# -- determinism ------------------------------------------------------------------------

def test_two_identical_runs_are_bit_identical(tmp_path):
    """Same seed, same machine, same thread count: SlimFit with compression and
    dropout on trains to the same weights and decisions, so a demo's figures
    reproduce exactly (across CPUs, vector kernels may round differently)."""
    def run(sub):
        pl.seed_everything(0, verbose=False)
        lit = lit_module(lr=1e-2)  # tiny BERT with dropout
        sf = SlimFit(freeze_rate=0.75, compression=True)
        trainer(tmp_path / sub, max_steps=6, callbacks=[sf]).fit(lit, token_loader(n=32))
        return lit, sf.freezer.history.frozen_sets()

    a, fa = run("a")
    b, fb = run("b")
    assert fa == fb
    for (n, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), n


# -- trained_lr_scale ------------------------------------------------------------------

@pytest.mark.parametrize("score", ["paper", "grad_norm"])
def test_trained_lr_scale_multiplies_the_step_of_trained_units_only(score):
    """With SGD, scale s on the trained candidate units equals their learning
    rate times s; frozen units do not move; always-trained tensors (biases,
    the new head) keep the optimizer's rate."""
    torch.manual_seed(0)
    base = models.hf_bert()
    batch = models.text_batch(base, generator=torch.Generator().manual_seed(0))
    runs = {}
    for s in (1.0, 3.0):
        model = models.hf_bert().eval()  # no dropout: both runs see the same gradients
        model.load_state_dict(base.state_dict())
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        session = SlimFitSession(model, SessionConfig(freezing=SlimFitConfig(
            freeze_rate=0.5, trained_lr_scale=s, score=score)))
        session.start(torch.optim.SGD(model.parameters(), lr=0.1))
        frozen = session.decide()
        session.step(lambda: model(**batch).loss, frozen=frozen)
        names = dict((id(p), n) for n, p in model.named_parameters())
        unit_of = {names[id(p)]: i for i, u in enumerate(session.units) for p in u.params}
        runs[s] = ({n: p.detach() - before[n] for n, p in model.named_parameters()},
                   unit_of, set(frozen))
        session.stop()
    (d1, unit_of, frozen), (d3, _, frozen3) = runs[1.0], runs[3.0]
    assert frozen == frozen3
    checked = set()
    for n in d1:
        if n in unit_of and unit_of[n] in frozen:
            assert d3[n].abs().max() == 0, n
        elif n in unit_of:
            torch.testing.assert_close(d3[n], 3 * d1[n], rtol=1e-4, atol=1e-7)
            checked.add("trained")
        else:
            torch.testing.assert_close(d3[n], d1[n], msg=n)
            checked.add("always trained")
    assert checked == {"trained", "always trained"}


def test_trained_lr_scale_auto_and_bad_values():
    assert SlimFitConfig(freeze_rate=0.9, trained_lr_scale="auto").lr_scale(0.1) == \
        pytest.approx(10 ** 0.5)
    # LISA and BAdam keep the optimizer's step (their papers'), a set trains K steps in a row
    assert SlimFitConfig(policy="lisa").lr_scale(0.1) == SlimFitConfig(policy="badam").lr_scale(0.1) == 1.0
    assert SlimFitConfig(policy="lisa", trained_lr_scale=2.0).lr_scale(0.1) == 2.0
    for bad in (0, -1.0, "fast", True, float("inf")):
        with pytest.raises(SlimFitError, match="trained_lr_scale must be a positive"):
            SlimFitConfig(trained_lr_scale=bad)
