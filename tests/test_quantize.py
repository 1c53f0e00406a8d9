"""Quantizers against a brute-force reference, and exact round trips."""

import pytest
import torch

from slimfit.compression.quantize import dequantize, pack_bool, quantize, topk_prune, topk_restore, unpack_bool


def reference_codes(x, bits, group):
    """Element-by-element affine quantization, the slow obvious way."""
    flat = x.reshape(-1).float().tolist()
    gs = x.shape[-1] if group is None else group
    levels = 2 ** bits - 1
    codes, zeros, scales = [], [], []
    for start in range(0, len(flat), gs):
        g = flat[start:start + gs]
        g = g + [0.0] * (gs - len(g))
        lo, hi = min(g), max(g)
        scale = (hi - lo) / levels if hi > lo else 1.0
        zeros.append(lo)
        scales.append(scale)
        codes += [min(max(round((torch.tensor(v) - lo).item() / scale), 0), levels) for v in g]
    return codes, zeros, scales


def unpacked(q):
    c = q.codes
    if q.bits == 4:
        c = torch.stack([c & 15, c >> 4], 1).view(-1)
    return c[: q.zero.shape[0] * q.group_size].tolist()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [None, 5, 16])
@pytest.mark.parametrize("shape", [(3, 16), (2, 3, 7), (13,)])
def test_codes_match_brute_force(bits, group, shape):
    x = torch.randn(*shape) * 3
    q = quantize(x, bits=bits, group_size=group)
    codes, zeros, scales = reference_codes(x, bits, group)
    got = unpacked(q)
    # float rounding of (x - lo) / scale may land either side of .5 in rare cases
    assert sum(a != b for a, b in zip(got, codes)) <= max(1, len(codes) // 200)
    assert all(abs(a - b) <= 1 for a, b in zip(got, codes))
    torch.testing.assert_close(q.zero.view(-1), torch.tensor(zeros))
    torch.testing.assert_close(q.scale.view(-1), torch.tensor(scales))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_exact_on_grid_and_bounded_off_grid(bits, dtype):
    levels = 2 ** bits - 1
    grid = (torch.randint(0, levels + 1, (4, 33)).float() * 0.25 - 1.0)
    grid[:, 0], grid[:, 1] = -1.0, -1.0 + 0.25 * levels  # pin each row's range to the grid
    x = grid.to(dtype)
    assert torch.equal(dequantize(quantize(x, bits=bits)), x)
    y = torch.randn(4, 33, dtype=dtype)
    q = quantize(y, bits=bits)
    err = (dequantize(q).float() - y.float()).abs()
    assert dequantize(q).dtype == dtype and dequantize(q).shape == y.shape
    assert (err <= q.scale * 0.5 + 1e-2 * (dtype == torch.bfloat16) + 1e-6).all()


def test_int4_odd_element_count_and_size():
    x = torch.randn(7, 3)  # 21 elements
    q = quantize(x, bits=4, group_size=4)
    assert q.codes.numel() == 12  # 24 padded codes, two per byte
    assert dequantize(q).shape == x.shape


def test_stochastic_rounding_is_unbiased():
    x = torch.full((1, 20000), 0.3)
    x[0, 0], x[0, 1] = 0.0, 1.0
    g = torch.Generator().manual_seed(0)
    deq = dequantize(quantize(x, bits=4, stochastic=True, generator=g))
    assert abs(deq[0, 2:].mean().item() - 0.3) < 2e-3
    vals = deq[0, 2:]
    near = lambda v: (vals - v).abs() < 1e-6
    assert (near(4 / 15) | near(5 / 15)).all()  # only the two neighbouring grid points


def test_bool_pack_round_trip():
    m = torch.rand(3, 5, 7) > 0.5
    packed, shape = pack_bool(m)
    assert packed.numel() == 14 and torch.equal(unpack_bool(packed, shape), m)


def test_topk_keeps_largest_centred_values():
    x = torch.randn(6, 40)
    t = topk_prune(x, 0.25)
    r = topk_restore(t)
    c = x - x.mean(1, keepdim=True)
    kept = (r - x).abs() < 1e-5
    assert (kept.sum(1) >= 10).all()
    thresh = c.abs().topk(10, dim=1).values[:, -1:]
    assert torch.equal(kept, c.abs() >= thresh)


@pytest.mark.parametrize("bad", [3, 16, 0])
def test_unsupported_bits(bad):
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize(torch.randn(4), bits=bad)
