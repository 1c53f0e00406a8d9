"""Frozen-weight convolutions save no input (slimfit.compression.frozen_conv)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimfit import SlimFitConfig
from slimfit.compression.frozen_conv import FrozenConvRouter
from slimfit.memory import SavedTensorTracker
from slimfit import SessionConfig, SlimFitSession

from models import hf_vit, image_batch, timm_vit

CONVS = [
    (nn.Conv1d(3, 6, 3, stride=2, padding=1), (2, 3, 17)),
    (nn.Conv2d(3, 8, 4, stride=4), (2, 3, 16, 16)),                        # a patch embedding
    (nn.Conv2d(4, 8, 3, padding=(1, 2), dilation=(1, 2), groups=2), (2, 4, 9, 11)),
    (nn.Conv3d(2, 4, (1, 3, 3), padding=1), (2, 2, 3, 6, 6)),
    (nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), (3, 9, 9)),  # unbatched, F.pad first
]


def _conv_input_numel(conv, shape) -> int:
    """Elements of what F.conv*d receives (padded first unless padding_mode is zeros)."""
    if conv.padding_mode == "zeros":
        return torch.Size(shape).numel()
    pad = conv._reversed_padding_repeated_twice
    spatial = [n + pad[2 * i] + pad[2 * i + 1] for i, n in enumerate(reversed(shape[-len(pad) // 2:]))]
    return torch.Size([*shape[:-len(spatial)], *reversed(spatial)]).numel()


def _step(conv, x, grad_input: bool):
    x = x.clone().requires_grad_(grad_input)
    conv.zero_grad(set_to_none=True)
    with SavedTensorTracker(conv) as tr:
        conv(x).square().sum().backward()
    return conv.bias.grad.clone(), (x.grad.clone() if grad_input else None), tr.peak


@pytest.mark.parametrize("grad_input", [False, True])
@pytest.mark.parametrize("conv,shape", CONVS)
def test_frozen_weight_conv_keeps_gradients_and_saves_no_input(conv, shape, grad_input):
    torch.manual_seed(0)
    x = torch.randn(shape)
    conv.weight.requires_grad_(False)
    gb, gx, plain_bytes = _step(conv, x, grad_input)
    router = FrozenConvRouter(conv).install()
    try:
        gb2, gx2, routed_bytes = _step(conv, x, grad_input)
    finally:
        router.remove()
        conv.weight.requires_grad_(True)
    torch.testing.assert_close(gb2, gb, rtol=1e-5, atol=1e-5)   # only the bias add is reordered
    if grad_input:
        torch.testing.assert_close(gx2, gx, rtol=1e-5, atol=1e-5)
    # both keep what square() saves (the output); only the plain op keeps the input
    assert plain_bytes - routed_bytes == _conv_input_numel(conv, shape) * 4


@pytest.mark.parametrize("grad_input", [False, True])
def test_frozen_weight_conv_under_bf16_autocast_matches_the_plain_op(grad_input):
    torch.manual_seed(0)
    conv, x = nn.Conv2d(3, 8, 4, stride=4), torch.randn(2, 3, 16, 16)
    conv.weight.requires_grad_(False)

    def run():
        xi = x.clone().requires_grad_(grad_input)
        conv.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(xi)
        y.float().square().sum().backward()
        return y.dtype, conv.bias.grad.clone(), (xi.grad.clone() if grad_input else None)

    plain = run()
    router = FrozenConvRouter(conv).install()
    try:
        routed = run()
    finally:
        router.remove()
    assert routed[0] == plain[0] == torch.bfloat16
    torch.testing.assert_close(routed[1], plain[1], rtol=2e-2, atol=1e-2)  # bf16 rounding
    if grad_input:
        assert routed[2].dtype == plain[2].dtype == torch.float32
        torch.testing.assert_close(routed[2], plain[2], rtol=2e-2, atol=1e-2)


def test_trained_weight_runs_the_plain_op():
    torch.manual_seed(0)
    conv, x = nn.Conv2d(3, 8, 4, stride=4), torch.randn(2, 3, 16, 16)
    with SavedTensorTracker(conv) as tr:
        conv(x).sum().backward()
    plain = (tr.peak, conv.weight.grad.clone())
    conv.zero_grad(set_to_none=True)
    router = FrozenConvRouter(conv).install()
    with SavedTensorTracker(conv) as tr:
        conv(x).sum().backward()
    router.remove()
    assert tr.peak == plain[0] == x.numel() * 4       # the pixels, for the weight gradient
    assert torch.equal(conv.weight.grad, plain[1])


def test_remove_leaves_nothing_behind():
    conv = nn.Conv2d(3, 8, 4, stride=4)
    conv.weight.requires_grad_(False)
    router = FrozenConvRouter(conv).install()
    router.remove()
    assert not conv._forward_pre_hooks and not conv._forward_hooks
    with SavedTensorTracker(conv) as tr:
        conv(torch.randn(2, 3, 16, 16)).sum().backward()
    assert tr.peak == 2 * 3 * 16 * 16 * 4               # the plain op again


@pytest.mark.parametrize("build", [hf_vit, timm_vit], ids=["hf_vit", "timm_vit"])
def test_session_vit_patch_embedding_keeps_no_pixels_when_frozen(build):
    torch.manual_seed(0)
    model = build()
    batch = image_batch(model, n=4)
    pixels = batch["pixel_values"]
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    conv.weight.requires_grad_(False)               # as the freezer leaves it in most steps

    def saved_by_conv(session):
        model.zero_grad(set_to_none=True)
        with SavedTensorTracker(model) as tr:
            out = model(pixels)
            logits = out.logits if hasattr(out, "logits") else out
            logits.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return sum(v for k, v in tr.peak_by_module.items() if conv is model.get_submodule(k)), grads

    plain, g_plain = saved_by_conv(None)
    session = SlimFitSession(model, SessionConfig(freezing=SlimFitConfig(freeze_rate=0.5)))
    session.start(torch.optim.SGD(model.parameters(), lr=0.0))
    try:
        routed, g_routed = saved_by_conv(session)
    finally:
        session.stop()
    assert plain == pixels.numel() * 4 and routed == 0
    assert g_plain.keys() == g_routed.keys()
    for name in g_plain:
        torch.testing.assert_close(g_routed[name], g_plain[name], rtol=1e-4, atol=1e-6)
