"""Optimizer-state offload: exact updates, complete checkpoints, honest ledger."""

import pytest
import torch

from slimfit.callbacks import MemoryMonitor, SlimFit
from slimfit.freezer import LayerFreezer
from slimfit.ledger import measure_step
from slimfit.offload import OptimizerStateOffloader

from conftest import lit_module, make_optimizer, token_loader, trainer
from models import hf_bert


def train(optimizer_name, offload, steps=8):
    torch.manual_seed(0)
    model = hf_bert().eval()  # no dropout: two runs must be comparable bit for bit
    opt = make_optimizer(optimizer_name, model.parameters(), lr=1e-2)
    f = LayerFreezer(model, freeze_rate=0.8, seed=0)
    off = OptimizerStateOffloader(opt, [u.params for u in f.units]) if offload else None
    g = torch.Generator().manual_seed(0)
    reports = []
    for _ in range(steps):
        frozen = f.decide()
        f.apply(frozen)
        if off:
            off.sync(frozen)
        x = torch.randint(0, 128, (4, 12), generator=g)
        y = torch.randint(0, 2, (4,), generator=g)

        def fb():
            model(input_ids=x, labels=y).loss.backward()
            if off:
                off.before_optimizer_step()
            f.before_optimizer_step(opt)

        reports.append(measure_step(model, opt, fb, off.host_storage_keys() if off else None))
        f.after_optimizer_step()
    if off:
        off.restore_all()
    return model, opt, reports, off


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "adamw8bit"])
def test_offloaded_training_is_bit_exact(optimizer):
    m0, o0, r0, _ = train(optimizer, offload=False)
    m1, o1, r1, off = train(optimizer, offload=True)
    for (n, a), b in zip(m0.named_parameters(), m1.parameters()):
        assert torch.equal(a, b), n
    for p0, p1 in zip(m0.parameters(), m1.parameters()):
        s0, s1 = o0.state.get(p0, {}), o1.state.get(p1, {})
        assert s0.keys() == s1.keys()
        for k in s0:
            assert torch.equal(torch.as_tensor(s0[k]), torch.as_tensor(s1[k])), k
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
    assert not sf.offloader.offloaded_units


def test_offload_options_are_checked():
    with pytest.raises(TypeError, match="offload_optimizer_state must be a bool"):
        SlimFit(offload_optimizer_state="yes")
