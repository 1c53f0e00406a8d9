"""Optimizer-state offload: exact updates, complete checkpoints, honest ledger."""

import contextlib

import pytest
import torch

from slimfit.callbacks import MemoryMonitor, SlimFit
from slimfit import SlimFitConfig
from slimfit import measure_step
from slimfit import ActivationOffloader, OptimizerStateOffloader
from slimfit import SessionConfig, SlimFitSession

from conftest import lit_module, make_optimizer, token_loader, trainer, assert_same_weights_and_state
from models import hf_bert, text_batch


def train(optimizer_name, offload, steps=8):
    torch.manual_seed(0)
    model = hf_bert().eval()  # no dropout: two runs must be comparable bit for bit
    opt = make_optimizer(optimizer_name, model.parameters(), lr=1e-2)
    session = SlimFitSession(model, SessionConfig(
        freezing=SlimFitConfig(freeze_rate=0.8, seed=0), offload_optimizer_state=offload))
    session.start(opt)
    g = torch.Generator().manual_seed(0)
    reports = []
    for _ in range(steps):
        batch = text_batch(model, generator=g)
        reports.append(session.step(lambda: model(**batch).loss, measure=True))
    off = session.part(OptimizerStateOffloader)
    session.stop()  # every offloaded state back with its parameter
    return model, opt, reports, off


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "adamw8bit"])
def test_offloaded_training_is_bit_exact(optimizer):
    m0, o0, r0, _ = train(optimizer, offload=False)
    m1, o1, r1, off = train(optimizer, offload=True)
    assert_same_weights_and_state(m0, o0, m1, o1)
    assert off.bytes_moved > 0


def test_ledger_splits_resident_and_host_state():
    _, _, plain, _ = train("adamw", offload=False)
    _, _, offl, off = train("adamw", offload=True)
    last0, last1 = plain[-1], offl[-1]
    assert last1.offloaded_optimizer_state > 0
    assert last1.optimizer_state + last1.offloaded_optimizer_state == last0.optimizer_state
    assert last1.optimizer_state < 0.5 * last0.optimizer_state  # only trained units resident
    assert last1.total < last0.total


def test_callback_offload_warns_without_cuda_trains_and_checkpoints(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the warning is for machines without CUDA")
    with pytest.warns(UserWarning, match="no CUDA device is available"):
        sf = SlimFit(freeze_rate=0.8, offload_optimizer_state=True)
    mon = MemoryMonitor(every_n_steps=5)
    lit = lit_module()
    trainer(tmp_path, max_steps=10, callbacks=[sf, mon]).fit(lit, token_loader(n=48))
    last = mon.history[-1][1]
    assert last.offloaded_optimizer_state > 0
    # after training every state is back with its parameter, none lost
    opt = lit.trainer.optimizers[0]
    assert all(len(opt.state[p]) == 3 for p in lit.parameters())
    assert not sf.session.part(OptimizerStateOffloader).offloaded_units


def test_offload_options_are_checked():
    with pytest.raises(TypeError, match="offload_optimizer_state must be a bool"):
        SlimFit(offload_optimizer_state="yes")


# -- saved activations in host memory ------------------------------------------------------


def host_offloader(model):
    """The offload path with host-to-host copies (this machine has no GPU)."""
    return ActivationOffloader(model, min_bytes=0, force_host_copy=True, pin_memory=False)


def _grads_with(offloader_factory, compress=False):
    from slimfit import ActivationCompressor
    torch.manual_seed(0)
    model = hf_bert().eval()
    comp = ActivationCompressor(model).install() if compress else None
    batch = text_batch(model)
    off = offloader_factory(model)
    with off if off is not None else contextlib.nullcontext():
        loss = model(**batch).loss
    loss.backward()
    if comp:
        comp.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, off, model


def test_activation_offload_is_exact_and_skips_the_weights():
    from slimfit.storage import is_parameter_or_view
    from slimfit.offload.activations import _Host

    class Recording(ActivationOffloader):
        def __init__(self, model):
            super().__init__(model, min_bytes=0, force_host_copy=True, pin_memory=False)
            self.seen = []  # (a weight or a view of one?, copied to the host?)

        def pack(self, t):
            out = super().pack(t)
            self.seen.append((is_parameter_or_view(t), isinstance(out, _Host)))
            return out

    ref, _, _ = _grads_with(lambda m: None)
    got, off, _ = _grads_with(Recording)
    for n in ref:
        assert torch.equal(ref[n], got[n]), n
    # save_on_cpu copies every weight a Linear saves, every step; these stay put
    assert any(w for w, _ in off.seen), "no weight was saved: the check below would be empty"
    assert not any(w and copied for w, copied in off.seen)
    assert off.copies == sum(copied for _, copied in off.seen) > 0


def test_activation_offload_moves_compressed_bytes_and_the_ledger_sees_none():
    plain = _grads_with(host_offloader)[1]
    packed = _grads_with(host_offloader, compress=True)[1]
    assert packed.bytes_moved < 0.75 * plain.bytes_moved  # compression happens before the copy
    model = hf_bert()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randint(0, 128, (4, 12))

    def step(offload):
        def fb():
            with host_offloader(model) if offload else contextlib.nullcontext():
                loss = model(input_ids=x, labels=torch.zeros(4, dtype=torch.long)).loss
            loss.backward()
        return measure_step(model, opt, fb).activations

    assert step(False) > 0 and step(True) == 0  # nothing saved stays on the "device"

    # the other order (offload entered first, the ledger inside it, as with
    # callbacks=[SlimFit(offload_activations=True), MemoryMonitor()]): the
    # offload still happens and the ledger still sees nothing left behind
    with host_offloader(model) as off:
        inside = measure_step(model, opt, lambda: model(
            input_ids=x, labels=torch.zeros(4, dtype=torch.long)).loss.backward()).activations
    assert inside == 0 and off.copies > 0


def test_ledger_inside_offload_keeps_gradients_exact():
    from slimfit.memory import SavedTensorTracker
    ref, _, _ = _grads_with(lambda m: None)

    class Both:  # offload entered first, the tracker inside it
        def __init__(self, m):
            self.off, self.tr = host_offloader(m), SavedTensorTracker(m)

        def __enter__(self):
            self.off.__enter__()
            self.tr.__enter__()

        def __exit__(self, *exc):
            self.tr.__exit__(*exc)
            self.off.__exit__(*exc)

    got, both, _ = _grads_with(Both)
    for n in ref:
        assert torch.equal(ref[n], got[n]), n
    assert both.off.copies > 0 and both.tr.peak == 0


def test_activation_offloader_rejects_bad_min_bytes():
    with pytest.raises(ValueError, match="min_bytes must be an int >= 0, got -1"):
        ActivationOffloader(min_bytes=-1)
