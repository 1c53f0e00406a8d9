"""The SlimFit callback on a tiny BERT: exact frozen counts, frozen tensors
bit-identical across the step for every supported optimizer, gradient
accumulation, resume, visibility, and clear refusals."""

import math
import pathlib
import shutil
import subprocess

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from slimfit.callbacks import SlimFit
from slimfit.callbacks.checks import check_strategy
from slimfit import (CheckpointMismatchError, SelectionError, ShortBudgetWarning, SlimFitError,
                     UnsupportedSetupError)

from conftest import lit_module, no_dropout_lit, token_loader, trainer


class StepSpy(pl.Callback):
    """Placed after SlimFit: checks each optimizer step from the outside."""

    def __init__(self):
        self.frozen_per_batch, self.violations, self.moved = [], [], []
        self.groups_before = None

    def on_train_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        self.groups_before = [[id(p) for p in g["params"]] for g in opt.param_groups]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.frozen_per_batch.append(frozenset(
            n for n, p in pl_module.named_parameters() if not p.requires_grad))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = dict(pl_module.named_parameters())
        self._frozen = {n: p.detach().clone() for n, p in params.items() if not p.requires_grad}
        self._trained = {n: p.detach().clone() for n, p in params.items() if p.requires_grad}
        self.violations += [n for n in self._frozen if params[n].grad is not None]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not hasattr(self, "_frozen"):
            return  # micro-batch without an optimizer step
        params = dict(pl_module.named_parameters())
        self.violations += [n for n, v in self._frozen.items() if not torch.equal(v, params[n])]
        self.moved.append(sum(not torch.equal(v, params[n]) for n, v in self._trained.items()))
        opt = trainer.optimizers[0]
        assert [[id(p) for p in g["params"]] for g in opt.param_groups] == self.groups_before
        del self._frozen, self._trained


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "adamw8bit"])
def test_exact_frozen_count_and_frozen_tensors_bit_identical(tmp_path, optimizer):
    sf, spy = SlimFit(freeze_rate=0.9), StepSpy()
    lit = lit_module(optimizer=optimizer, lr=1e-2)
    trainer(tmp_path, max_steps=12, callbacks=[sf, spy]).fit(lit, token_loader(n=48))
    t = len(sf.freezer.units)
    assert t == 21  # 22 candidates; the new classifier head is always trained
    k = math.floor(0.9 * t)
    assert all(len(f) == k for f in spy.frozen_per_batch)  # initial pass included
    assert spy.violations == []  # no frozen grad, no frozen tensor moved (weight decay on)
    assert all(m > 0 for m in spy.moved)  # the trained tensors did move
    assert sf.freezer.scheduler.initial_pass_done  # 21 units, 3 trained per step: 7 steps
    assert all(p.requires_grad for p in lit.parameters())  # restored after fit


def test_a_bytes_rate_keeps_every_step_within_its_budget(tmp_path):
    sf, spy = SlimFit(freeze_rate=0.7, rate_of="bytes"), StepSpy()
    lit = lit_module(lr=1e-2)
    trainer(tmp_path, max_steps=10, callbacks=[sf, spy]).fit(lit, token_loader(n=40))
    params, f = dict(lit.named_parameters()), sf.freezer
    candidates = {n for u in f.units for n in u.param_names}
    size = {n: params[n].numel() * params[n].element_size() for n in candidates}
    trained = [sum(size[n] for n in candidates - frozen) for frozen in spy.frozen_per_batch]
    assert all(0 < b <= f.scheduler.trained_bytes_budget for b in trained)
    assert spy.violations == []


def test_gradient_accumulation_decides_per_optimizer_step(tmp_path):
    sf, spy = SlimFit(freeze_rate=0.8), StepSpy()
    trainer(tmp_path, max_steps=4, accumulate_grad_batches=3, callbacks=[sf, spy]).fit(
        lit_module(), token_loader(n=48))
    f = spy.frozen_per_batch
    assert len(f) == 12 and len(sf.freezer.history) == 4
    for s in range(4):
        assert f[3 * s] == f[3 * s + 1] == f[3 * s + 2]
    assert len(set(f[::3])) > 1


def test_frozen_layers_save_memory_in_a_real_step(tmp_path):
    """Gradients of frozen tensors are never allocated."""
    from slimfit.callbacks import MemoryMonitor
    mon = MemoryMonitor(every_n_steps=1)
    sf = SlimFit(freeze_rate=0.9)
    lit = lit_module()
    trainer(tmp_path, max_steps=2, callbacks=[sf, mon]).fit(lit, token_loader())
    full = 4 * sum(p.numel() for p in lit.parameters())
    assert all(r.gradients < 0.5 * full for _, r in mon.history)




def test_a_run_too_short_for_its_rate_warns_once_naming_the_fix(tmp_path):
    with pytest.warns(ShortBudgetWarning) as rec:
        trainer(tmp_path, max_steps=4, callbacks=[SlimFit(freeze_rate=0.9)]).fit(
            lit_module(), token_loader())
    notes = [str(w.message) for w in rec if issubclass(w.category, ShortBudgetWarning)]
    assert len(notes) == 1  # 21 units, 3 trained per step: each trains ~0.6 times
    assert "21 candidate units about 0.6 times" in notes[0] and "train >= " in notes[0]


def test_a_run_long_enough_for_its_rate_does_not_warn(tmp_path, recwarn):
    from slimfit.evidence import short_budget_note
    steps = next(n for n in range(1, 200) if short_budget_note(n, 11, 21) is None)  # r=0.5
    trainer(tmp_path, max_steps=steps, callbacks=[SlimFit(freeze_rate=0.5)]).fit(
        lit_module(), token_loader(n=4 * steps))
    assert not [w for w in recwarn if issubclass(w.category, ShortBudgetWarning)]


def test_resume_continues_with_the_same_decisions(tmp_path):
    full = SlimFit(freeze_rate=0.9, seed=3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    trainer(tmp_path / "a", max_steps=8, callbacks=[full, ckpt], enable_checkpointing=True).fit(
        no_dropout_lit(), token_loader(n=16))
    mid = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    assert mid.exists(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())

    resumed = SlimFit(freeze_rate=0.9, seed=3)
    trainer(tmp_path / "b", max_steps=8, callbacks=[resumed]).fit(
        no_dropout_lit(seed=1), token_loader(n=16), ckpt_path=str(mid))
    assert resumed.freezer.history.steps == list(range(8))
    assert resumed.freezer.history.frozen_sets() == full.freezer.history.frozen_sets()
    assert resumed.freezer.scheduler.scores == full.freezer.scheduler.scores


def test_resume_with_another_unit_set_is_rejected(tmp_path):
    """Same weights, different selection: the saved scores belong to other units."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer(tmp_path / "a", max_steps=2, callbacks=[SlimFit(0.5), ckpt],
            enable_checkpointing=True).fit(no_dropout_lit(), token_loader(n=16))
    path = next((tmp_path / "ckpt").iterdir())
    sf = SlimFit(0.5, groups=[r"(.*attention\.self)\.(query|key|value)\.weight"])
    with pytest.raises(CheckpointMismatchError, match="another model.*attention.self"):
        trainer(tmp_path / "b", max_steps=4, callbacks=[sf]).fit(
            no_dropout_lit(), token_loader(n=16), ckpt_path=str(path))


def test_logs_heatmap_and_summary(tmp_path):
    sf = SlimFit(freeze_rate=0.75)
    logger = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, max_steps=6, callbacks=[sf], logger=logger, log_every_n_steps=1).fit(
        lit_module(), token_loader())
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "slimfit/frozen_fraction" in metrics and "slimfit/score_median" in metrics
    assert sf.files["heatmap"].read_bytes()[:4] == b"\x89PNG"
    assert sf.freezer.history.matrix().shape == (21, 6)
    summary = sf.freezer.summary()
    assert "frozen per step" in summary and "bert.embeddings.word_embeddings.weight" in summary
    rows = sf.freezer.history.summary()
    assert sum(r["frozen_steps"] for r in rows) == 6 * math.floor(0.75 * 21)


def test_wandb_logger_receives_heatmap(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger
    monkeypatch.setenv("WANDB_MODE", "offline")
    logged = {}
    monkeypatch.setattr(WandbLogger, "log_image",
                        lambda self, key, images, step=None, **kw: logged.setdefault(key, images))
    wb = WandbLogger(save_dir=str(tmp_path), project="slimfit-test", offline=True)
    trainer(tmp_path, max_steps=2, callbacks=[SlimFit(0.5)], logger=wb).fit(lit_module(), token_loader())
    wb.experiment.finish()
    assert "slimfit/freeze_heatmap" in logged


# -- bad input -------------------------------------------------------------------

@pytest.mark.parametrize("rate", [1.0, -0.1, float("nan"), "0.9", True, 1.5])
def test_freeze_rate_outside_unit_interval(rate):
    with pytest.raises(SlimFitError, match="freeze_rate must be a number in \\[0, 1\\)"):
        SlimFit(freeze_rate=rate)


def test_pattern_matching_nothing_fails_at_setup(tmp_path):
    with pytest.raises(SelectionError, match="always_train=.*matched no parameter"):
        trainer(tmp_path, max_steps=1, callbacks=[SlimFit(0.5, always_train=["head.weight"])]).fit(
            lit_module(), token_loader())


def test_model_without_candidates_fails_at_setup(tmp_path):
    with pytest.raises(SelectionError, match="no candidate layers"):
        trainer(tmp_path, max_steps=1, callbacks=[SlimFit(0.5, exclude=r".*")]).fit(
            lit_module(), token_loader())


def test_unsupported_strategies_are_refused():
    with pytest.raises(UnsupportedSetupError, match="does not support strategy FSDPStrategy"):
        check_strategy(FSDPStrategy())
    with pytest.raises(UnsupportedSetupError, match="ddp_find_unused_parameters_true"):
        check_strategy(DDPStrategy())
    with pytest.raises(UnsupportedSetupError, match="static_graph"):
        check_strategy(DDPStrategy(find_unused_parameters=True, static_graph=True))
    check_strategy(DDPStrategy(find_unused_parameters=True))


def test_candidate_missing_from_optimizer_is_refused(tmp_path):
    lit = lit_module()
    lit.configure_optimizers = lambda: torch.optim.SGD(lit.model.classifier.parameters(), lr=0.1)
    with pytest.raises(UnsupportedSetupError, match="not in the optimizer"):
        trainer(tmp_path, max_steps=1, callbacks=[SlimFit(0.5)]).fit(lit, token_loader())


def test_bf16_autocast_keeps_frozen_tensors_bit_identical(tmp_path):
    sf, spy = SlimFit(freeze_rate=0.9), StepSpy()
    trainer(tmp_path, max_steps=4, precision="bf16-mixed", callbacks=[sf, spy]).fit(
        lit_module(lr=1e-2), token_loader())
    assert spy.violations == [] and all(m > 0 for m in spy.moved)
    assert len(sf.freezer.history) == 4


# -- where the files go -------------------------------------------------------------------

REPO = pathlib.Path(__file__).resolve().parent.parent
SOURCE = ("slimfit", "callbacks")  # the package source in the checkout


def _source_files():
    """Every file under the package source but bytecode caches (ignored by git or not)."""
    return {p for d in SOURCE for p in (REPO / d).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def _git_status():
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", *SOURCE],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs the git checkout")
def test_run_in_the_repository_root_writes_nothing_into_the_package(monkeypatch):
    """No logger, no default_root_dir, started in the repository root: Lightning's
    root is the working directory, so ``<root>/slimfit``, the callback's default
    directory, is the package source. The heatmap and summary go elsewhere; the
    source gains no file."""
    monkeypatch.chdir(REPO)
    leftovers = [REPO / "slimfit_output", REPO / "lightning_logs"]
    existed = {p for p in leftovers if p.exists()}
    files, status = _source_files(), _git_status()  # others may be editing the source now
    sf = SlimFit(freeze_rate=0.5)
    try:
        pl.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0,
                   callbacks=[sf]).fit(lit_module(), token_loader(n=12))
        assert sorted(_source_files() - files) == []
        assert _git_status() == status
        heatmap = sf.files["heatmap"].resolve()
        assert heatmap.is_file()
        assert not any(heatmap.is_relative_to(REPO / d) for d in SOURCE), heatmap
    finally:
        for p in leftovers:
            if p not in existed and p.exists():
                shutil.rmtree(p)
        for p in sf.driver.files.values():  # what the callback wrote, were it into the source
            if p.resolve() not in files and any(p.resolve().is_relative_to(REPO / d)
                                                for d in SOURCE):
                p.unlink(missing_ok=True)
