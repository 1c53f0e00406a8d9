"""MemoryMonitor: measures the steps it is asked to, costs nothing between them,
and writes its files at the end."""

import csv

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from slimfit.callbacks import MemoryMonitor, SlimFit
from slimfit import SlimFitSession, measure_step

from conftest import lit_module, token_loader, trainer


class HookSpy(pl.Callback):
    """Records, per training batch, whether any forward hook is installed."""

    def __init__(self):
        self.hooked = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # runs after MemoryMonitor's own on_train_batch_start (callback order)
        self.hooked.append(any(m._forward_hooks for m in pl_module.modules()))


def test_measures_every_n_steps_and_removes_hooks_between(tmp_path):
    mon, spy = MemoryMonitor(every_n_steps=3), HookSpy()
    lit = lit_module()
    tr = trainer(tmp_path, max_steps=7, callbacks=[mon, spy],
                 logger=CSVLogger(tmp_path, name="csv"))
    tr.fit(lit, token_loader())
    assert [s for s, _ in mon.history] == [0, 3, 6]
    assert spy.hooked == [True, False, False, True, False, False, True]
    assert not mon.measuring
    last = mon.history[-1][1]
    n_params = sum(p.numel() for p in lit.parameters())
    assert last.parameters == 4 * n_params
    assert last.gradients == 4 * n_params
    assert last.optimizer_state >= 8 * n_params  # AdamW: two fp32 moments
    assert last.activations > 0
    for key in ("layers_csv", "layers_md", "steps_csv", "plot"):
        assert mon.files[key].exists()
    assert mon.files["plot"].read_bytes()[:4] == b"\x89PNG"
    with open(mon.files["steps_csv"]) as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [0, 3, 6]
    logged = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "memory/activations" in logged and "memory/total" in logged


#: every figure of a step's report; ``total`` sums the first four
FIGURES = ("parameters", "gradients", "optimizer_state", "activations", "buffers",
           "offloaded_optimizer_state", "total")


def figures(report):
    return {f: getattr(report, f) for f in FIGURES}


@pytest.mark.parametrize("freezing", [False, True], ids=["full", "slimfit"])
def test_callback_agrees_with_plain_ledger(tmp_path, freezing):
    """Each step the Lightning monitor measures has the figures of the same step
    run outside Lightning and measured by the ledger (``measure_step``, or the
    session's ``step(measure=True)`` under SlimFit): every category and the
    total, optimizer state included, at the first step (state created) and the
    later ones (state carried over)."""
    batches = list(token_loader(n=12, batch_size=4))  # 3 optimizer steps
    torch.manual_seed(0)
    lit = lit_module(optimizer="adamw")
    torch.manual_seed(0)
    ref = lit_module(optimizer="adamw")  # the same initial weights
    mon = MemoryMonitor(every_n_steps=1)
    sf = SlimFit(freeze_rate=0.5, seed=0) if freezing else None
    trainer(tmp_path, max_steps=len(batches), callbacks=[sf, mon] if sf else [mon]).fit(
        lit, token_loader(n=12, batch_size=4))
    assert [s for s, _ in mon.history] == list(range(len(batches)))

    opt = ref.configure_optimizers()
    if freezing:  # the callback's session config on an identical model
        session = SlimFitSession(ref, sf.session.config).start(opt)
        expected = [session.step(lambda: ref.model(input_ids=x, labels=y).loss, measure=True)
                    for x, y in batches]
        assert session.freezer.history.frozen_sets() == sf.freezer.history.frozen_sets()
    else:
        expected = [measure_step(ref, opt,
                                 lambda: ref.model(input_ids=x, labels=y).loss.backward())
                    for x, y in batches]
    assert expected[0].optimizer_state > 0  # AdamW's moments are counted, not left out
    for (step, got), want in zip(mon.history, expected):
        assert figures(got) == figures(want), step


def test_gradient_accumulation_measures_one_optimizer_step(tmp_path):
    mon = MemoryMonitor(every_n_steps=2)
    trainer(tmp_path, max_steps=3, accumulate_grad_batches=2, callbacks=[mon]).fit(
        lit_module(), token_loader())
    assert [s for s, _ in mon.history] == [0, 2]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_rejects_bad_interval(bad):
    with pytest.raises(ValueError, match="every_n_steps must be a positive int"):
        MemoryMonitor(every_n_steps=bad)
