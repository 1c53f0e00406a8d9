"""Exactness of the memory ledger against hand-computed byte counts."""

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from slimfit import SlimFitError
from slimfit import measure_step
from slimfit.memory import SavedTensorTracker

from models import hf_bert

F32 = 4


def mlp():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


N_PARAMS = 4 * 8 + 8 + 8 * 2 + 2  # 58


def step(model, x):
    return lambda: model(x).sum().backward()


def test_mlp_exact_bytes_sgd_momentum():
    m, x = mlp(), torch.randn(3, 4)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    r = measure_step(m, opt, step(m, x))
    assert r.parameters == N_PARAMS * F32
    assert r.gradients == N_PARAMS * F32
    assert r.optimizer_state == N_PARAMS * F32  # one momentum buffer per parameter
    # Saved for backward: Linear0's input x (3x4), ReLU's output (3x8), which
    # Linear2 saves again as its input (same storage: counted once). Weights
    # are parameters (weight.t() is a view of the parameter) and excluded.
    assert r.activations == (3 * 4 + 3 * 8) * F32
    assert r.total == 3 * N_PARAMS * F32 + 36 * F32
    assert r.per_module["0"].activations == 3 * 4 * F32
    assert r.per_module["1"].activations == 3 * 8 * F32
    assert r.per_module["2"].activations == 0
    assert r.per_module["0"].parameters == (32 + 8) * F32
    assert r.per_module["2"].optimizer_state == (16 + 2) * F32


def test_mlp_adamw_state_and_step_counters():
    m, x = mlp(), torch.randn(3, 4)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    r = measure_step(m, opt, step(m, x))
    # exp_avg + exp_avg_sq per parameter, plus one fp32 scalar `step` per tensor.
    assert r.optimizer_state == 2 * N_PARAMS * F32 + 4 * F32


def test_frozen_parameters_have_no_gradient_bytes():
    m, x = mlp(), torch.randn(3, 4)
    for p in m[0].parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    r = measure_step(m, opt, step(m, x))
    assert r.gradients == (16 + 2) * F32
    assert "0" not in r.per_module or r.per_module["0"].gradients == 0
    # Nothing upstream needs a gradient: x is not saved; ReLU's output
    # needs no grad either, but Linear2 saves it for its weight gradient.
    assert r.activations == 3 * 8 * F32


class TwoViews(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 8)

    def forward(self, x):
        h = self.lin(x)
        a, b = h[:, :4], h[:, 4:]
        return (a * b * a).sum()  # mul saves views of h, several times


def test_views_and_repeated_saves_count_once():
    m, x = TwoViews(), torch.randn(3, 4)
    r = measure_step(m, torch.optim.SGD(m.parameters(), lr=0.1), lambda: m(x).backward())
    h_bytes = 3 * 8 * F32
    prod_bytes = 3 * 4 * F32  # (a * b) is saved by the second mul
    assert r.activations == 3 * 4 * F32 + h_bytes + prod_bytes


def test_peak_is_live_bytes_not_sum_over_microbatches():
    m = mlp()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    one = measure_step(m, opt, step(m, torch.randn(3, 4))).activations

    def two_microbatches():
        for _ in range(2):
            m(torch.randn(3, 4)).sum().backward()

    assert measure_step(m, opt, two_microbatches).activations == one


def test_tracker_matches_independent_saved_tensor_count_on_bert():
    m = hf_bert()
    x = torch.randint(0, 128, (4, 16))
    y = torch.randint(0, 2, (4,))
    excluded = {t.untyped_storage().data_ptr() for t in [*m.parameters(), *m.buffers()]}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(input_ids=x, labels=y).loss.backward()
    m.zero_grad(set_to_none=True)
    opt = torch.optim.AdamW(m.parameters())
    r = measure_step(m, opt, lambda: m(input_ids=x, labels=y).loss.backward())
    assert r.activations == sum(seen.values())
    assert r.parameters == F32 * sum(p.numel() for p in m.parameters())
    assert sum(mb.activations for mb in r.per_module.values()) == r.activations
    assert sum(mb.parameters for mb in r.per_module.values()) == r.parameters
    # attention probabilities are attributed to the attention module that saved them
    assert r.grouped(depth=4)["bert.encoder.layer.0"].activations > 0


def test_bitsandbytes_8bit_state_counted_at_real_size():
    big = nn.Linear(256, 64, bias=False)  # 16384 elements: above min_8bit_size (4096)
    x = torch.randn(8, 256)
    r8 = measure_step(big, bnb.optim.AdamW8bit(big.parameters(), lr=1e-3), step(big, x))
    r32 = measure_step(big, torch.optim.AdamW(big.parameters(), lr=1e-3), step(big, x))
    n = big.weight.numel()
    assert r32.optimizer_state == 2 * n * F32 + F32
    # two uint8 moments (2 bytes/element) plus absmax scales and code tables
    assert 2 * n <= r8.optimizer_state < 0.3 * r32.optimizer_state


def test_hooks_removed_after_measurement():
    m = mlp()
    measure_step(m, torch.optim.SGD(m.parameters(), lr=0.1), step(m, torch.randn(3, 4)))
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())


def test_report_tables_render():
    m = mlp()
    r = measure_step(m, torch.optim.SGD(m.parameters(), lr=0.1), step(m, torch.randn(3, 4)))
    assert "| **total** |" in r.summary_table()
    assert r.module_table().count("\n") == len(r.per_module) + 1
    assert r.scalars()["memory/total"] == r.total


# -- bad input ---------------------------------------------------------------

def test_model_without_parameters_is_rejected():
    m = nn.ReLU()
    with pytest.raises(SlimFitError, match="has no parameters"):
        measure_step(m, torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1),
                     lambda: None)


def test_optimizer_of_another_model_is_rejected():
    m, other = mlp(), mlp()
    with pytest.raises(SlimFitError, match="does not own any parameter"):
        measure_step(m, torch.optim.SGD(other.parameters(), lr=0.1), step(m, torch.randn(3, 4)))


def test_optimizer_with_foreign_tensors_is_rejected():
    m = mlp()
    extra = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([*m.parameters(), extra], lr=0.1)
    with pytest.raises(SlimFitError, match="not parameters of Sequential"):
        measure_step(m, opt, step(m, torch.randn(3, 4)))


def test_step_without_backward_is_rejected():
    m = mlp()
    with pytest.raises(SlimFitError, match="must run the forward pass and call"):
        measure_step(m, torch.optim.SGD(m.parameters(), lr=0.1), lambda: m(torch.randn(3, 4)))


def test_tracker_cannot_nest():
    m = mlp()
    tr = SavedTensorTracker(m)
    with tr:
        with pytest.raises(SlimFitError, match="already active"):
            tr.__enter__()
