"""Static-activation compression: gradient fidelity on every model family,
real memory savings on the ledger, and clear refusals."""


import contextlib

import pytest
import torch
from torch.nn.functional import cosine_similarity

from slimfit import ActivationCompressor, CompressionConfig, Treatment
from slimfit import SelectionError, SlimFitError
from slimfit.memory import SavedTensorTracker

from models import BERT, PlainNet, each_case, hf_bert


def grads_and_peak(model, batch, comp=None, case=BERT):
    model.zero_grad(set_to_none=True)
    with SavedTensorTracker(model) as tr:
        if comp is not None:
            with comp:
                case.loss(model, batch).backward()
        else:
            case.loss(model, batch).backward()
    return {n: p.grad.detach().double().flatten().clone()
            for n, p in model.named_parameters() if p.grad is not None}, tr.peak


def min_cosine(exact, approx):
    big = max(g.norm().item() for g in exact.values())
    # tensors whose exact gradient is numerically zero (e.g. key biases: softmax
    # is shift-invariant) have no direction to compare
    return min(cosine_similarity(exact[n], approx[n], dim=0).item()
               for n in exact if exact[n].norm().item() > 1e-4 * big)


@each_case()
def test_gradient_fidelity_and_fewer_saved_bytes(case):
    model = case.build().eval()  # no dropout: both passes compute the same function
    if case.name == "timm-vit":
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False  # eager attention, so it is compressed too
    batch = case.batch(model)
    exact, peak0 = grads_and_peak(model, batch, case=case)
    comp = ActivationCompressor(model, CompressionConfig(min_numel=0))
    approx, peak1 = grads_and_peak(model, batch, comp, case=case)
    assert min_cosine(exact, approx) >= 0.99
    assert peak1 < peak0
    if case.name != "plain":
        assert comp.preview()["attention"] and comp.preview()["gelu"]
    assert not comp.installed and all(not m._forward_pre_hooks for m in model.modules())


def test_medium_bert_saved_activations_shrink_at_least_3x():
    torch.manual_seed(0)
    m = hf_bert(vocab=256, hidden=128, intermediate=512, positions=512).eval()
    for p in m.parameters():  # freezing removes the dynamic activations: statics remain
        p.requires_grad_(p.dim() < 2 or "classifier" in str(p.shape))
    m.classifier.weight.requires_grad_(True)
    batch = {"input_ids": torch.randint(0, 256, (4, 64)), "labels": torch.tensor([0, 1, 0, 1])}
    exact, peak0 = grads_and_peak(m, batch)
    approx, peak1 = grads_and_peak(m, batch, ActivationCompressor(m))
    assert peak0 / peak1 >= 3.0, (peak0, peak1)
    assert min_cosine(exact, approx) >= 0.99


def bert_and_batch():
    """The default BERT without dropout and a batch drawn after it from the global seed."""
    torch.manual_seed(0)
    m = hf_bert().eval()
    return m, {"input_ids": torch.randint(0, 128, (4, 12)), "labels": torch.tensor([0, 1, 0, 1])}


def test_layernorm_topk_alternative_runs_and_is_less_faithful_than_int8():
    m, b = bert_and_batch()
    exact, _ = grads_and_peak(m, b)
    only_ln = dict(attention="none", gelu="none", ffn_down_input="none", dropout_mask=False,
                   min_numel=0)
    int8, _ = grads_and_peak(m, b, ActivationCompressor(
        m, CompressionConfig(layernorm="int8", **only_ln)))
    topk, _ = grads_and_peak(m, b, ActivationCompressor(
        m, CompressionConfig(layernorm=Treatment(method="topk", topk_fraction=0.1), **only_ln)))
    assert min_cosine(exact, int8) > min_cosine(exact, topk)


def test_bf16_autocast():
    m, b = bert_and_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exact, _ = grads_and_peak(m, b)
        approx, _ = grads_and_peak(m, b, ActivationCompressor(m, CompressionConfig(min_numel=0)))
    assert min_cosine(exact, approx) >= 0.98


def test_fused_attention_is_detected_and_compressed(recwarn):
    """SDPA attention is compressed now (tests/test_fused_attention.py); only
    kernels that bypass F.scaled_dot_product_attention are left alone."""
    m = hf_bert(attn="sdpa", positions=512)
    comp = ActivationCompressor(m)
    assert not [w for w in recwarn if "attention" in str(w.message)]
    names = ["bert.encoder.layer.0.attention.self", "bert.encoder.layer.1.attention.self"]
    assert comp.preview()["attention"] == names == comp.preview()["fused_attention"]
    assert comp.preview()["skipped"] == []
    assert "2 SDPA (q, k, v per token and head" in comp.describe()
    m.config._attn_implementation = "flash_attention_2"  # a kernel outside torch
    with pytest.warns(UserWarning, match="leaves 2 attention module.*'flash_attention_2'"):
        comp = ActivationCompressor(m)
    assert comp.preview()["attention"] == [] and len(comp.preview()["skipped"]) == 2


def test_compiled_model_is_refused():
    with pytest.raises(SlimFitError, match="torch.compile"):
        ActivationCompressor(torch.compile(hf_bert()))


@pytest.mark.parametrize("kw,match", [
    ({"gelu": "int2"}, "unsupported activation treatment 'int2'"),
    ({"attention": {"method": "int8", "group_size": 0}}, "group_size"),
    ({"gelu": "topk"}, "only defined for layernorm"),
    ({"modules": {"softmax": ".*"}}, "unknown kind 'softmax'"),
])
def test_bad_config(kw, match):
    with pytest.raises(SlimFitError, match=match):
        CompressionConfig(**kw)


def test_pattern_matching_no_module_and_missing_kind():
    with pytest.raises(SelectionError, match="modules\\['gelu'\\].*matched no module"):
        ActivationCompressor(hf_bert(), CompressionConfig(modules={"gelu": r".*\.act_fn"}))
    with pytest.warns(UserWarning, match="has no module of kind \\['attention', 'gelu'\\]"):
        ActivationCompressor(PlainNet())


def test_yaml_style_mapping_config():
    cfg = CompressionConfig(gelu={"method": "int8", "group_size": 128}, layernorm="topk")
    assert cfg.gelu == Treatment(method="int8", group_size=128) and cfg.layernorm.method == "topk"


def _compile_encoder(model):
    model.bert.encoder = torch.compile(model.bert.encoder)  # lazy: compiles on first call
    return model


def _compile_layer_in_place(model):
    model.bert.encoder.layer[1].compile()  # sets _compiled_call_impl, keeps the module
    return model


@pytest.mark.parametrize("compile_part,name", [
    (_compile_encoder, "'bert.encoder'"),
    (_compile_layer_in_place, "'bert.encoder.layer.1'"),
])
def test_model_with_a_compiled_submodule_is_refused(compile_part, name):
    """A compiled module anywhere inside the model is refused like a compiled
    model, and the message names that module."""
    with pytest.raises(SlimFitError, match=f"torch.compile'd submodule\\(s\\) {name}: activation "
                                           "compression uses saved-tensor hooks"):
        ActivationCompressor(compile_part(hf_bert()))


class _ClsHead(torch.nn.Module):
    """Encoder output -> classifier on the first token, as ViT and BERT heads do:
    the Linear saves the view ``h[:, 0]`` of the whole sequence output."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(32, 32)
        self.norm = torch.nn.LayerNorm(32)
        self.head = torch.nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.norm(self.body(x))[:, 0])


def test_narrow_view_saved_as_a_copy_frees_its_base_exactly():
    torch.manual_seed(0)
    model = _ClsHead()
    model.body.weight.requires_grad_(False)
    model.norm.weight.requires_grad_(False)
    x = torch.randn(4, 512, 32)  # the sequence output is 4 x 512 x 32 fp32 = 256 KiB

    def run(comp):
        model.zero_grad(set_to_none=True)
        with SavedTensorTracker(model) as tr, comp:
            model(x).square().sum().backward()
        return model.head.weight.grad.clone(), tr.peak_by_module.get("head", 0)

    off = CompressionConfig(attention="none", gelu="none", layernorm="none", ffn_down_input="none")
    exact, head_before = run(contextlib.nullcontext())
    compact, head_after = run(ActivationCompressor(model, off))
    assert torch.equal(exact, compact)          # exact: the same values restored
    assert head_before == 4 * 512 * 32 * 4      # the whole base, for 4 rows of it
    assert head_after == 4 * 32 * 4             # the rows alone
