"""The freezer's policies (slimfit, LISA, BAdam) and where frozen units'
optimizer state lives (device, host, release): every policy freezes exactly
floor(r * t) units, keeps frozen weights bit-identical, decides the same on
every DDP rank, resumes to the same decisions, and keeps the device's
optimizer state to the trained units with host offload or release."""

import math

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from slimfit import (CheckpointMismatchError, SessionConfig, SlimFitConfig, SlimFitError,
                     SlimFitSession)
from slimfit.callbacks import SlimFit
from slimfit.freezing.policies import BAdamPolicy, LisaPolicy

from conftest import lit_module, no_dropout_lit, token_loader, trainer
import models
from models import BERT
from test_ddp import RankDump

POLICIES = [dict(policy="slimfit"), dict(policy="lisa", interval=3),
            dict(policy="badam", interval=2), dict(policy="badam", interval=2, order="random")]
IDS = ["slimfit", "lisa", "badam", "badam-random"]


# -- the policies as pure logic -------------------------------------------------------------

def test_lisa_keeps_a_uniform_sample_for_k_steps():
    p = LisaPolicy([f"u{i}" for i in range(20)], num_frozen=16, interval=5, seed=1)
    sets = []
    for _ in range(200):
        frozen = p.decide()
        assert len(frozen) == 16
        p.update(frozen, None)
        sets.append(frozenset(range(20)) - set(frozen))
    assert all(sets[i] == sets[i - i % 5] for i in range(200))  # changes only every 5 steps
    counts = [sum(u in s for s in sets[::5]) for u in range(20)]  # 40 samples of 4: 8 each
    assert min(counts) >= 2 and max(counts) <= 16 and p.initial_pass_done


@pytest.mark.parametrize("order, first_round", [("ascending", [[0, 1, 2], [3, 4, 5], [0, 1, 6]]),
                                                ("descending", [[0, 1, 6], [3, 4, 5], [0, 1, 2]])])
def test_badam_trains_blocks_of_consecutive_units_in_turn(order, first_round):
    p = BAdamPolicy([f"u{i}" for i in range(7)], num_frozen=4, interval=2, order=order)
    trained = []
    for _ in range(12):
        frozen = p.decide()
        p.update(frozen, None)
        trained.append(sorted(set(range(7)) - set(frozen)))
    assert trained[0::2][:3] == first_round and trained[0::2][3:] == first_round
    assert all(trained[i] == trained[i + 1] for i in range(0, 12, 2))  # K = 2 steps each


@pytest.mark.parametrize("order", ["ascending", "descending", "random"])
@pytest.mark.parametrize("interval, steps", [(5, 40), (5, 41), (4, 23), (50, 375), (100, 375),
                                             (41, 375)])
def test_badam_warns_exactly_when_a_run_leaves_blocks_untrained(order, interval, steps):
    names = [f"u{i}" for i in range(53)]  # MiniLM's count: 9 blocks of 6 at r = 0.9
    p = BAdamPolicy(names, num_frozen=47, interval=interval, order=order, seed=1)
    note = p.run_note(steps)
    active = set()  # the blocks that trained in some step
    for _ in range(steps):
        frozen = p.decide()
        p.update(frozen, None)
        active.add(frozenset(set(range(53)) - set(frozen)))
    untrained = [b for b in p.blocks if frozenset(b) not in active]
    if not untrained:
        assert note is None
    else:
        assert f"{len(untrained)} of the {len(p.blocks)} blocks would never train" in note
        assert f"interval <= {steps // len(p.blocks)}" in note
        if order != "random":  # it names where they start
            assert all(repr(names[b[0]]) in note for b in untrained[:4])
    fixed = BAdamPolicy(names, num_frozen=47, interval=max(1, steps // len(p.blocks)), order=order)
    assert fixed.run_note(steps) is None  # the advice works
    assert p.run_note(float("inf")) is None  # an open-ended run has no length


def test_badam_run_shorter_than_its_blocks_is_told_no_interval_helps():
    p = BAdamPolicy([f"u{i}" for i in range(53)], num_frozen=47, interval=1)  # 9 blocks
    note = p.run_note(5)
    assert "4 of the 9 blocks would never train" in note
    assert "Even interval 1 reaches only 5 blocks: train at least 9 steps" in note
    assert "Set interval" not in note


def test_badam_random_order_visits_every_block_once_a_round():
    p = BAdamPolicy([f"u{i}" for i in range(9)], num_frozen=6, interval=1, order="random", seed=3)
    seen = []
    for _ in range(6):
        frozen = p.decide()
        p.update(frozen, None)
        seen.append(tuple(sorted(set(range(9)) - set(frozen))))
    assert sorted(seen[:3]) == sorted(seen[3:]) == [(0, 1, 2), (3, 4, 5), (6, 7, 8)]
    assert seen[:3] != [(0, 1, 2), (3, 4, 5), (6, 7, 8)] or seen[3:] != seen[:3]  # shuffled


@pytest.mark.parametrize("kw, match", [
    (dict(policy="lisa2"), "policy must be one of 'slimfit', 'lisa', 'badam'"),
    (dict(policy="lisa", interval=0), "interval must be None or an int >= 1"),
    (dict(interval=5), "interval=5 applies to policy='lisa' or 'badam'"),
    (dict(policy="badam", order="zigzag"), "order must be one of"),
    (dict(policy="lisa", order="random"), "applies to policy='badam' only"),
    (dict(trained_units=0), "trained_units must be None"),
])
def test_bad_policy_options_are_refused(kw, match):
    with pytest.raises(SlimFitError, match=match):
        SlimFitConfig(**kw)


def test_trained_units_sets_lisa_gamma_and_is_checked_against_the_model():
    model = BERT.build()
    sess = SlimFitSession(model, SessionConfig(freezing=SlimFitConfig(policy="lisa", trained_units=3)))
    assert len(sess.units) - sess.freezer.num_frozen == 3
    with pytest.raises(SlimFitError, match="trained_units=99 but the model has"):
        SlimFitSession(model, SessionConfig(freezing=SlimFitConfig(trained_units=99)))


# -- in a session ---------------------------------------------------------------------------

#: wide enough that biases and the new head (always trained) are a small part, as in real models
WIDE = models.case("hf-bert", layers=4, hidden=128, heads=4, intermediate=512, vocab=256,
                   positions=32)


def _train(policy, steps=8, optimizer_state="device", rate=0.8, case=BERT):
    model = case.build().eval()  # no dropout
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sess = SlimFitSession(model, SessionConfig(
        freezing=SlimFitConfig(freeze_rate=rate, seed=0, **policy),
        optimizer_state=optimizer_state)).start(opt)
    batch, ok, reports = case.batch(model), [], []
    for _ in range(steps):
        frozen = sess.decide()
        before = [p.detach().clone() for i in frozen for p in sess.units[i].params]
        rep = sess.step(lambda: case.loss(model, batch), frozen=frozen, measure=True)
        # the state of what trained in this step (requires_grad as the step applied it);
        # of a frozen unit, only AdamW's scalar step count stays on the device (4 bytes)
        rep.trained_state = sum(v.numel() * v.element_size() for p in model.parameters()
                                for v in opt.state.get(p, {}).values()
                                if torch.is_tensor(v) and (p.requires_grad or v.numel() == 1))
        reports.append(rep)
        ok.append(all(torch.equal(a, p) for a, p in
                      zip(before, (p for i in frozen for p in sess.units[i].params))))
    return sess, ok, reports


@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
def test_every_policy_freezes_exactly_and_keeps_frozen_weights(policy):
    sess, ok, _ = _train(policy)
    k = math.floor(0.8 * len(sess.units))
    assert all(ok)
    assert all(len(s) == k for s in sess.freezer.history.frozen_sets())
    distinct = {frozenset(s) for s in sess.freezer.history.frozen_sets()}
    assert len(distinct) > 1  # the set rotates


@pytest.mark.parametrize("policy", POLICIES, ids=IDS)
def test_device_optimizer_state_is_the_trained_units_only_with_host_offload(policy):
    """With host offload or release the device holds, at every step, exactly the
    optimizer state of what trains in that step (the ledger); at r = 0.9 that is
    on average at most 15% of full fine-tuning's (a step that trains the largest
    units holds more: here up to ~20%)."""
    steps = 30  # past the first rotations: most units have state by then
    _, _, plain = _train(policy, steps=steps, rate=0.9, case=WIDE)
    _, _, host = _train(policy, steps=steps, rate=0.9, optimizer_state="host", case=WIDE)
    _, _, rel = _train(policy, steps=steps, rate=0.9, optimizer_state="release", case=WIDE)
    full_state = 8 * sum(p.numel() for p in WIDE.build().parameters())  # AdamW: two fp32 moments
    for reports in (host, rel):
        assert all(r.optimizer_state == r.trained_state for r in reports)
        mean = sum(r.optimizer_state for r in reports[10:]) / len(reports[10:])
        assert mean <= 0.15 * full_state, (mean / full_state)
    assert all(h.optimizer_state + h.offloaded_optimizer_state == p.optimizer_state
               for h, p in zip(host, plain))  # nothing lost, the rest in host memory
    assert all(r.offloaded_optimizer_state == 0 for r in rel)  # released: kept nowhere


def test_host_offload_is_exact_and_release_is_not():
    policy = dict(policy="badam", interval=2)
    ref, _, _ = _train(policy, steps=10)
    host, _, _ = _train(policy, steps=10, optimizer_state="host")
    rel, _, _ = _train(policy, steps=10, optimizer_state="release")
    for (n, a), b, c in zip(ref.model.named_parameters(), host.model.parameters(),
                            rel.model.parameters()):
        assert torch.equal(a, b), n
    assert any(not torch.equal(a, c) for a, c in zip(ref.model.parameters(), rel.model.parameters()))


def test_release_and_host_offload_together_are_refused():
    with pytest.raises(SlimFitError, match="choose one"):
        SessionConfig(freezing=SlimFitConfig(), offload_optimizer_state=True,
                      optimizer_state="release")
    with pytest.raises(SlimFitError, match="optimizer_state must be one of"):
        SessionConfig(freezing=SlimFitConfig(), optimizer_state="disk")


# -- Lightning: resume and DDP --------------------------------------------------------------

@pytest.mark.parametrize("policy", POLICIES[1:], ids=IDS[1:])
def test_resume_continues_with_the_same_decisions(tmp_path, policy):
    full = SlimFit(freeze_rate=0.9, seed=3, **policy)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    trainer(tmp_path / "a", max_steps=10, callbacks=[full, ckpt], enable_checkpointing=True).fit(
        no_dropout_lit(), token_loader(n=40))
    mid = tmp_path / "ckpt" / "epoch=0-step=5.ckpt"
    resumed = SlimFit(freeze_rate=0.9, seed=3, **policy)
    trainer(tmp_path / "b", max_steps=10, callbacks=[resumed]).fit(
        no_dropout_lit(seed=1), token_loader(n=40), ckpt_path=str(mid))
    assert resumed.freezer.history.steps == list(range(10))
    assert resumed.freezer.history.frozen_sets() == full.freezer.history.frozen_sets()
    other = SlimFit(freeze_rate=0.9, seed=3)  # the score policy cannot continue a LISA run
    with pytest.raises(CheckpointMismatchError, match=f"policy {policy['policy']!r}"):
        trainer(tmp_path / "c", max_steps=10, callbacks=[other]).fit(
            no_dropout_lit(), token_loader(n=40), ckpt_path=str(mid))


@pytest.mark.parametrize("policy", [POLICIES[1], POLICIES[3]], ids=["lisa", "badam-random"])
def test_two_ranks_stay_identical(tmp_path, policy, fresh_master_port):
    sf = SlimFit(freeze_rate=0.9, seed=0, **policy)
    tr = trainer(tmp_path, max_steps=8, accelerator="cpu", devices=2,
                 strategy="ddp_spawn_find_unused_parameters_true",
                 callbacks=[sf, RankDump(tmp_path, sf)])
    tr.fit(lit_module(lr=1e-2), token_loader(n=64, batch_size=4))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["history"] == r1["history"] and len(r0["history"]) == 8
    for k, v in r0["params"].items():
        assert torch.equal(v, r1["params"][k]), k


def test_the_callback_warns_when_a_badam_run_leaves_blocks_untrained(tmp_path):
    from slimfit import ShortBudgetWarning
    with pytest.warns(ShortBudgetWarning) as rec:  # 21 units at r = 0.5: 2 blocks of 11
        trainer(tmp_path, max_steps=4, callbacks=[SlimFit(freeze_rate=0.5, policy="badam",
                                                          interval=5)]).fit(
            lit_module(), token_loader())
    notes = [str(w.message) for w in rec if "badam" in str(w.message)]
    assert len(notes) == 1 and "1 of the 2 blocks would never train" in notes[0]
    assert "interval <= 2" in notes[0]
