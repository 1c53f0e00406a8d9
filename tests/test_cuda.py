"""The CUDA paths the CPU tests cannot reach: pinned host buffers and copies
on side streams (optimizer-state offload, activation offload, weight
streaming with prefetch) keep training bit-exact, and the ledger reads the
allocator's peak. The CPU versions are in test_offload.py, test_stream.py and
test_ledger.py; these are skipped without CUDA (``pytest -m gpu`` selects them)."""

import contextlib

import pytest
import torch

from slimfit import (ActivationOffloader, OptimizerStateOffloader, SessionConfig, SlimFitConfig,
                     SlimFitSession, StreamConfig, measure_step)

from slimfit.offload.activations import _Host

from conftest import make_optimizer, assert_same_weights_and_state
import models

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")


def on_cuda(batch):
    return {k: v.to(CUDA) for k, v in batch.items()}


def assert_same_state(a, b):
    """Two state dicts hold the same tensors bit for bit (compared on the host: an
    evicted streamed weight's entry is its host master)."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].cpu(), b[k].cpu()), k


# -- optimizer state of frozen units in pinned host memory ---------------------------------

def offload_run(offload, steps=8):
    """SlimFit r=0.8 with AdamW on CUDA; per step, the state tensors of the frozen
    units as (device type, pinned) and the ledger's report."""
    torch.manual_seed(0)
    model = models.hf_bert().eval().to(CUDA)  # no dropout: two runs comparable bit for bit
    opt = make_optimizer("adamw", model.parameters(), lr=1e-2)
    session = SlimFitSession(model, SessionConfig(
        freezing=SlimFitConfig(freeze_rate=0.8, seed=0), offload_optimizer_state=offload))
    session.start(opt)
    off = session.part(OptimizerStateOffloader)
    g = torch.Generator().manual_seed(0)
    reports, placement = [], []
    for _ in range(steps):
        batch = on_cuda(models.text_batch(model, generator=g))
        frozen = session.decide()
        reports.append(session.step(lambda: model(**batch).loss, measure=True, frozen=frozen))
        if off is not None:
            assert off.offloaded_units == set(frozen)
        # the optimizer's own tensors (numel > 1: the scalar step counters stay put)
        for i, unit in enumerate(session.units):
            for p in unit.params:
                for v in opt.state.get(p, {}).values():
                    if torch.is_tensor(v) and v.numel() > 1:
                        placement.append((i in frozen, v.device.type, v.is_pinned()))
    session.stop()  # every offloaded state back with its parameter
    torch.cuda.synchronize()
    return model, opt, reports, off, placement


def test_optimizer_state_offload_on_cuda_is_bit_exact_and_pinned():
    m0, o0, r0, _, _ = offload_run(offload=False)
    m1, o1, r1, off, placement = offload_run(offload=True)
    assert_same_weights_and_state(m0, o0, m1, o1)
    assert off.pin_memory and off.bytes_moved > 0
    # while frozen, a unit's state is in page-locked host memory; while trained, on the GPU
    frozen = [(dev, pinned) for is_frozen, dev, pinned in placement if is_frozen]
    trained = [(dev, pinned) for is_frozen, dev, pinned in placement if not is_frozen]
    assert frozen and set(frozen) == {("cpu", True)}
    assert trained and {dev for dev, _ in trained} == {"cuda"}
    # after the run every state is back on the GPU, none lost
    assert all(v.is_cuda for s in o1.state.values() for v in s.values()
               if torch.is_tensor(v) and v.numel() > 1)
    # the ledger reports the host-held state apart from the device total
    last0, last1 = r0[-1], r1[-1]
    assert last1.offloaded_optimizer_state > 0
    assert last1.optimizer_state + last1.offloaded_optimizer_state == last0.optimizer_state
    assert last1.total < last0.total


# -- saved activations in pinned host memory, copied on a side stream ------------------------

class Recording(ActivationOffloader):
    """Records, per tensor moved to the host: (pinned buffer, asynchronous copy)."""

    def __init__(self, model):
        super().__init__(model, min_bytes=0)  # every saved activation of a tiny model moves
        self.moved = []

    def pack(self, t):
        out = super().pack(t)
        if isinstance(out, _Host):
            # copied: the CUDA event the D2H copy recorded on the side stream (non_blocking)
            self.moved.append((out.host.is_pinned(), out.copied is not None))
        return out


def activation_grads(offload):
    torch.manual_seed(0)
    model = models.hf_bert().eval().to(CUDA)
    batch = on_cuda(models.text_batch(model))
    off = Recording(model) if offload else None
    with off if off is not None else contextlib.nullcontext():
        loss = model(**batch).loss
    loss.backward()
    torch.cuda.synchronize()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, off


def test_activation_offload_on_cuda_is_bit_exact_with_pinned_async_copies():
    ref, _ = activation_grads(offload=False)
    got, off = activation_grads(offload=True)
    assert ref.keys() == got.keys()
    for n in ref:
        assert torch.equal(ref[n], got[n]), n
    assert off.active and off.pin_memory
    assert off.copies == len(off.moved) > 0 and off.bytes_moved > 0
    assert all(pinned and asynchronous for pinned, asynchronous in off.moved)


# -- weight streaming with prefetch on a side stream -----------------------------------------

STREAM_CASE = models.case("hf-bert", layers=4)


def stream_run(stream, steps=6):
    """SlimFit r=0.8 on CUDA, streaming or not; losses, final state, the streamer and
    the units resident (sampled after each unit's forward and after each step)."""
    model = STREAM_CASE.build().eval().to(CUDA)
    opt = make_optimizer("adamw", model.parameters(), lr=1e-2)
    session = SlimFitSession(model, SessionConfig(
        freezing=SlimFitConfig(freeze_rate=0.8, seed=0), stream=stream)).start(opt)
    st = session.streamer
    residency = []
    if st is not None:
        for u in st.units:  # registered after the streamer's hooks: runs once the unit computed
            u.module.register_forward_hook(lambda *_: residency.append(st.resident_units()))
    batch = on_cuda(STREAM_CASE.batch(model))
    losses = []

    def loss_fn():
        loss = STREAM_CASE.loss(model, batch)
        losses.append(loss.detach())
        return loss

    for _ in range(steps):
        session.step(loss_fn)
        if st is not None:
            residency.append(st.resident_units())
    torch.cuda.synchronize()
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return [x.item() for x in losses], state, st, residency


@pytest.mark.parametrize("k,kp", [(1, 0), (2, 1)])
def test_weight_streaming_on_cuda_is_bit_identical_and_prefetches(k, kp):
    ref_losses, ref_state, _, _ = stream_run(None)
    losses, state, st, residency = stream_run(StreamConfig(resident=k, prefetch=kp))
    assert losses == ref_losses  # exactly
    assert_same_state(state, ref_state)
    assert residency and max(residency) <= k  # never more than k blocks resident
    assert st.stats["bytes_in"] > 0 and st.stats["write_backs"] > 0  # weights really moved
    masters = [t.master for u in st.units for t in u.tensors]
    assert masters and all(m.is_pinned() for m in masters)  # pinned by default on CUDA
    if kp > 0:  # most uses find their unit already prefetched (hit rate, as logged)
        assert st.overlap() > 0.5, st.stats
    else:
        assert st.stats["on_demand"] > st.stats["hits"]


# -- the ledger reads the allocator's peak -----------------------------------------------------

def test_ledger_reports_the_cuda_allocator_peak():
    torch.manual_seed(0)
    model = models.hf_bert().to(CUDA)
    opt = make_optimizer("adamw", model.parameters())
    batch = on_cuda(models.text_batch(model))
    report = measure_step(model, opt, lambda: model(**batch).loss.backward())
    assert report.cuda is not None
    # at optimizer.step() every weight and every gradient is allocated at once
    assert report.cuda.max_allocated >= report.parameters + report.gradients > 0
    assert report.cuda.max_reserved >= report.cuda.max_allocated
    assert report.scalars()["memory/cuda_max_allocated"] == report.cuda.max_allocated
    # a model on the CPU has no allocator figures, CUDA or not
    cpu = models.hf_bert()
    cpu_opt = make_optimizer("adamw", cpu.parameters())
    cpu_batch = models.text_batch(cpu)
    assert measure_step(cpu, cpu_opt, lambda: cpu(**cpu_batch).loss.backward()).cuda is None
