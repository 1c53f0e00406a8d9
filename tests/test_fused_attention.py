"""Compression inside fused attention (``F.scaled_dot_product_attention``
routed through ``slimfit.compression.fused_attention``) and DeBERTa-v2's disentangled
attention: gradient fidelity on every family, the same dropout mask as the
exact run, no T x T tensor saved, fewer saved bytes, clean fallbacks and
nothing left behind."""

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.functional import cosine_similarity

from slimfit import ActivationCompressor, CompressionConfig
from slimfit.compression.detect import attention_kernel, is_attention
from slimfit.memory import SavedTensorTracker

from models import PlainNet


# ----------------------------------------------------------------------------
# Tiny models with a choice of attention kernel and dropout
# ----------------------------------------------------------------------------


def hf_bert_sdpa(p=0.0, seq=64, hidden=32, heads=2, attn="sdpa"):
    from transformers import BertConfig, BertForSequenceClassification
    return BertForSequenceClassification(BertConfig(
        vocab_size=128, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
        intermediate_size=2 * hidden, max_position_embeddings=seq, attn_implementation=attn,
        hidden_dropout_prob=p, attention_probs_dropout_prob=p))


def hf_roberta_sdpa(p=0.0):
    from transformers import RobertaConfig, RobertaForSequenceClassification
    return RobertaForSequenceClassification(RobertaConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=72, attn_implementation="sdpa",
        hidden_dropout_prob=p, attention_probs_dropout_prob=p))


def hf_vit_sdpa(p=0.0):
    from transformers import ViTConfig, ViTForImageClassification
    return ViTForImageClassification(ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=3, attn_implementation="sdpa",
        hidden_dropout_prob=p, attention_probs_dropout_prob=p))


def timm_vit_fused(p=0.0):
    import timm
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                          depth=2, num_classes=3, attn_drop_rate=p, proj_drop_rate=p)
    for mod in m.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = True  # whatever TIMM_FUSED_ATTN says
    return m


def deberta_v2(p=0.0):
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification
    return DebertaV2ForSequenceClassification(DebertaV2Config(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=p,
        attention_probs_dropout_prob=p))


def deberta_v3_like(p=0.0):
    """DeBERTa-v3's settings: relative (disentangled c2p + p2c) attention."""
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification
    return DebertaV2ForSequenceClassification(DebertaV2Config(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=p,
        attention_probs_dropout_prob=p, relative_attention=True, pos_att_type=["p2c", "c2p"],
        position_buckets=16, norm_rel_ebd="layer_norm", share_att_key=True))


def text_batch(n=4, seq=16, pad=5):
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[1::2, seq - pad:] = 0  # padding on every other row
    return {"input_ids": torch.randint(0, 128, (n, seq), generator=g), "attention_mask": mask,
            "labels": torch.randint(0, 2, (n,), generator=g)}


def image_batch(n=4):
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(n, 3, 32, 32, generator=g),
            "labels": torch.randint(0, 3, (n,), generator=g)}


def loss_of(name, model, batch):
    if name == "timm-vit":
        return F.cross_entropy(model(batch["pixel_values"]), batch["labels"])
    return model(**batch).loss


# (name, factory(p), batch, kernel the attention modules use)
FAMILIES = [
    ("hf-bert-sdpa", hf_bert_sdpa, text_batch, "sdpa"),
    ("hf-roberta-sdpa", hf_roberta_sdpa, text_batch, "sdpa"),
    ("hf-vit-sdpa", hf_vit_sdpa, image_batch, "sdpa"),
    ("timm-vit", timm_vit_fused, image_batch, "sdpa"),
    ("deberta-v2", deberta_v2, text_batch, "eager"),
    ("deberta-v3-like", deberta_v3_like, text_batch, "eager"),
]


def grads(name, model, batch, seed, comp=None, autocast=False):
    """Parameter gradients of one forward/backward from RNG seed ``seed``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if comp is not None:
            with comp:
                loss = loss_of(name, model, batch)
        else:
            loss = loss_of(name, model, batch)
    loss.backward()
    return {n: p.grad.detach().double().flatten().clone()
            for n, p in model.named_parameters() if p.grad is not None}


def min_cosine(exact, approx):
    big = max(g.norm().item() for g in exact.values())
    return min(cosine_similarity(exact[n], approx[n], dim=0).item()
               for n in exact if exact[n].norm().item() > 1e-4 * big)


# ----------------------------------------------------------------------------
# Fidelity on every family
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("name,factory,batch_fn,kernel", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_gradients_match_the_exact_run(name, factory, batch_fn, kernel, p, autocast):
    """Gradients of the compressed path have cosine >= 0.99 with those of the
    exact run from the same RNG seed (dropout: the same masks)."""
    torch.manual_seed(0)
    model = factory(p).train(p > 0)
    batch = batch_fn()
    comp = ActivationCompressor(model, CompressionConfig(min_numel=0))
    attn = comp.preview()["attention"]
    assert attn and comp.preview()["skipped"] == []
    assert all(attention_kernel(model.get_submodule(n)) == kernel for n in attn)
    assert comp.preview()["fused_attention"] == (attn if kernel == "sdpa" else [])
    exact = grads(name, model, batch, seed=1, autocast=autocast)
    approx = grads(name, model, batch, seed=1, comp=comp, autocast=autocast)
    assert min_cosine(exact, approx) >= 0.99
    assert comp.sdpa.routed == (len(attn) if kernel == "sdpa" else 0)


def test_deberta_disentangled_attention_is_compressed():
    """DisentangledSelfAttention is an attention core, and what it saves (Q,
    K, the mask, probabilities, dropout mask, V) is stored quantized or
    bit-packed: its share of the saved bytes shrinks more than 3x."""
    torch.manual_seed(0)
    model = deberta_v3_like(0.1).train()
    names = [n for n, m in model.named_modules() if type(m).__name__ == "DisentangledSelfAttention"]
    assert len(names) == 2 and all(is_attention(model.get_submodule(n)) for n in names)
    for n, p in model.named_parameters():  # static activations only (as with SlimFit r=0.9)
        p.requires_grad_(p.dim() < 2 or n.startswith("classifier"))
    batch = text_batch(n=8, seq=48, pad=10)

    def attention_bytes(comp):
        torch.manual_seed(1)
        with SavedTensorTracker(model) as tr:
            with comp if comp is not None else contextlib.nullcontext():
                loss = loss_of("deberta", model, batch)
            loss.backward()
        return sum(v for k, v in tr.peak_by_module.items()  # with the attention's dropout
                   if any(k == n or k.startswith(n + ".") for n in names))

    comp = ActivationCompressor(model, CompressionConfig(min_numel=0))
    assert comp.preview()["attention"] == names
    raw, packed = attention_bytes(None), attention_bytes(comp)
    assert packed * 3 <= raw, (raw, packed)


# ----------------------------------------------------------------------------
# What is saved
# ----------------------------------------------------------------------------


def _installed(comp):
    """``comp`` as a context manager, or nothing to install."""
    return comp if comp is not None else contextlib.nullcontext()


def saved_shapes(model, batch, comp=None):
    """Shapes of every tensor handed to the hooks outside SlimFit's scopes."""
    shapes = []

    def pack(t):
        shapes.append((tuple(t.shape), t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _installed(comp):
        loss = loss_of("hf", model, batch)
    loss.backward()
    return shapes


def test_no_t_by_t_tensor_is_saved_on_the_fused_path():
    """With attention dropout (the CPU falls back to the math kernel, which
    saves the T x T probabilities), a padding mask and T = 512: nothing saved
    has two trailing T dims, nor as many elements as one bit-packed T x T map
    per sequence."""
    T, B = 512, 2
    torch.manual_seed(0)
    model = hf_bert_sdpa(0.1, seq=T, hidden=16).train()  # saved rows (16, 32 wide) << T / 8
    batch = text_batch(n=B, seq=T, pad=100)
    limit = B * T * T // 8

    def t_by_t(shapes):
        return [s for s, n in shapes if s[-2:] == (T, T) or n >= limit]

    assert t_by_t(saved_shapes(model, batch))  # the plain op does save them
    eager = hf_bert_sdpa(0.1, seq=T, hidden=16, attn="eager").train()
    assert t_by_t(saved_shapes(eager, batch, ActivationCompressor(eager)))  # so does eager
    comp = ActivationCompressor(model, CompressionConfig(min_numel=0))
    assert t_by_t(saved_shapes(model, batch, comp)) == []
    assert comp.sdpa.routed == 2


def test_saved_bytes_of_bert_sdpa_shrink():
    """Static activations (weights frozen): compression inside SDPA saves much
    less than no compression, and less than leaving SDPA alone (the old
    behaviour: every other kind compressed)."""
    torch.manual_seed(0)
    model = hf_bert_sdpa(0.1, seq=128, hidden=64, heads=4).train()
    for n, p in model.named_parameters():
        p.requires_grad_(p.dim() < 2 or n.startswith("classifier"))
    batch = text_batch(n=4, seq=128, pad=30)

    def peak(comp):
        with SavedTensorTracker(model) as tr:
            with _installed(comp):
                loss = loss_of("hf", model, batch)
            loss.backward()
        return tr.peak

    plain = peak(None)
    before = peak(ActivationCompressor(model, CompressionConfig(attention="none")))
    now = peak(ActivationCompressor(model))
    assert now * 4 <= plain, (plain, before, now)
    assert now * 1.5 <= before, (plain, before, now)


# ----------------------------------------------------------------------------
# The routed function on its own: GQA, causal, masks, the dropout mask
# ----------------------------------------------------------------------------


class TinyGQAAttention(nn.Module):
    """4 query heads sharing 2 key/value heads, causal, like a decoder."""

    def __init__(self, d=32, hq=4, hkv=2):
        super().__init__()
        self.hq, self.hkv, self.hd = hq, hkv, d // hq
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, hkv * self.hd)
        self.v_proj = nn.Linear(d, hkv * self.hd)
        self.o_proj = nn.Linear(d, d)
        self.p = 0.0

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.hq, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.hkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.hkv, self.hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                           dropout_p=self.p if self.training else 0.0)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gqa_causal_call_matches_exact_gradients(p):
    torch.manual_seed(0)
    model = nn.Sequential(TinyGQAAttention())
    model[0].p = p
    x = torch.randn(3, 24, 32, requires_grad=True)

    def run(comp=None):
        model.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(5)
        with comp if comp is not None else contextlib.nullcontext():
            y = model(x)
        y.square().sum().backward()
        out = {n: p.grad.flatten().clone() for n, p in model.named_parameters()}
        return {**out, "x": x.grad.flatten().clone()}, torch.rand(1)

    exact, rng_after_exact = run()
    with pytest.warns(UserWarning, match="no module of kind"):
        comp = ActivationCompressor(model, CompressionConfig(min_numel=0))
    approx, rng_after = run(comp)
    assert comp.sdpa.routed == 1
    assert min_cosine(exact, approx) >= 0.999
    assert torch.equal(rng_after, rng_after_exact)  # backward put the RNG state back


class Core(nn.Module):
    """Attention on given q, k, v, selected by name."""

    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.kw)


class Holder(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.core = Core(**kw)
        self.ln = nn.LayerNorm(4)  # so a LayerNorm exists: only "gelu" reported missing

    def forward(self, *a):
        return self.core(*a)


def _on_grid(*shape):
    """Values the per-row int8 quantizer stores exactly: k / 64, each row
    spanning the full 0..255 code range."""
    x = torch.randint(0, 256, shape).float()
    x[..., 0], x[..., 1] = 0.0, 255.0
    return (x / 64).requires_grad_()


def _attention_compressor(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no GELU in these toy models
        return ActivationCompressor(model, CompressionConfig(
            min_numel=0, modules={"attention": ["core"]}, **kw))


@pytest.mark.parametrize("mask_kind", ["none", "padding", "causal+padding", "float"])
def test_dropout_mask_in_backward_is_the_forwards(mask_kind):
    """On operands the quantizer stores exactly, the compressed route gives the
    exact run's output and gradients bit for bit under dropout 0.5: the
    recompute drew the same dropout mask as the forward (and as the exact run)."""
    torch.manual_seed(0)
    B, H, T, D = 2, 3, 20, 8
    q, k, v = _on_grid(B, H, T, D), _on_grid(B, H, T, D), _on_grid(B, H, T, D)
    keep = torch.ones(B, 1, T, T, dtype=torch.bool)
    keep[1, ..., 15:] = False  # padded keys
    mask = {"none": None, "padding": keep,
            "causal+padding": keep & torch.ones(T, T, dtype=torch.bool).tril(),
            "float": torch.zeros(B, 1, T, T).masked_fill(~keep, float("-inf"))}[mask_kind]
    model = Holder(dropout_p=0.5)
    g = torch.randn(B, H, T, D)

    def run(comp=None):
        for t in (q, k, v):
            t.grad = None
        torch.manual_seed(7)
        if comp is not None:
            with comp:
                out = model(q, k, v, mask)
        else:
            out = model(q, k, v, mask)
        out.backward(g)
        return out.detach(), [t.grad.clone() for t in (q, k, v)]

    out0, g0 = run()
    comp = _attention_compressor(model)
    out1, g1 = run(comp)
    assert comp.sdpa.routed == 1
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_composes_with_activation_offload():
    """The compressed q, k, v go to the hooks outside SlimFit's scopes
    (activation offload here): the offloader moves int8 pieces, and the
    gradients are those of compression alone, bit for bit."""
    from slimfit import ActivationOffloader
    torch.manual_seed(0)
    model = hf_bert_sdpa(0.1).train()
    batch = text_batch()
    comp = ActivationCompressor(model, CompressionConfig(min_numel=0))
    ref = grads("hf", model, batch, seed=1, comp=comp)
    moved = []

    class Recording(ActivationOffloader):
        def pack(self, t):
            moved.append(t.dtype)
            return super().pack(t)

    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with Recording(model, min_bytes=0, force_host_copy=True, pin_memory=False), comp:
        loss = loss_of("hf", model, batch)
    loss.backward()
    assert comp.sdpa.routed == 4 and torch.uint8 in moved
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double().flatten(), ref[n], rtol=0, atol=0)


def test_padding_mask_is_saved_as_one_row_shared_by_layers():
    """A (B, 1, T, S) padding mask is saved as (B, 1, 1, S), one storage for
    every layer."""
    torch.manual_seed(0)
    model = hf_bert_sdpa(0.0).train()
    comp = ActivationCompressor(model, CompressionConfig(min_numel=0))
    masks = []

    def pack(t):
        if t.dtype == torch.bool:
            masks.append(t)
        return t

    batch = text_batch()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), comp:
        loss = loss_of("hf", model, batch)
    loss.backward()
    assert [tuple(m.shape) for m in masks] == [(4, 1, 1, 16)] * 2
    assert masks[0].untyped_storage().data_ptr() == masks[1].untyped_storage().data_ptr()


# ----------------------------------------------------------------------------
# Fallbacks, models without attention, nothing left behind
# ----------------------------------------------------------------------------


def test_unsupported_call_falls_back_and_warns_once():
    """A learned bias passed as attn_mask (it requires grad) is not taken by
    the route: the call runs the plain op, exactly, with one warning."""
    torch.manual_seed(0)
    B, H, T, D = 2, 2, 12, 8
    bias = nn.Parameter(torch.randn(1, H, T, T))
    model = Holder()
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    exact = torch.autograd.grad(model(q, k, v, bias).sum(), (q, k, v, bias))
    comp = _attention_compressor(model)
    with comp:
        with pytest.warns(UserWarning, match="attn_mask that requires grad.*run uncompressed"):
            out = model(q, k, v, bias)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the second call is silent
            out2 = model(q, k, v, bias)
    approx = torch.autograd.grad(out.sum() + 0 * out2.sum(), (q, k, v, bias))
    for a, b in zip(approx, exact):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert comp.sdpa.routed == 0
    assert any("requires grad" in s for s in comp.preview()["skipped"])


def test_no_grad_call_runs_the_plain_op():
    model = Holder()
    comp = _attention_compressor(model)
    q = torch.randn(1, 2, 8, 4)
    with comp, torch.no_grad():
        torch.testing.assert_close(model(q, q, q), F.scaled_dot_product_attention(q, q, q),
                                   rtol=0, atol=0)
    assert comp.sdpa.routed == 0


def test_model_without_attention_is_fine():
    model = PlainNet()
    with pytest.warns(UserWarning, match="no module of kind \\['attention', 'gelu'\\]"):
        comp = ActivationCompressor(model, CompressionConfig(min_numel=0))
    assert comp.preview()["fused_attention"] == [] and comp.preview()["skipped"] == []
    with comp:
        model(torch.randint(0, 16, (4, 6))).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_nothing_global_is_left_behind():
    """After remove() (or an exception inside the attention module) calls of
    F.scaled_dot_product_attention are the plain op, and no hook remains."""
    torch.manual_seed(0)
    model = hf_bert_sdpa(0.0)
    plain_fn = torch.nn.functional.scaled_dot_product_attention
    comp = ActivationCompressor(model, CompressionConfig(min_numel=0))
    with comp:
        loss_of("hf", model, text_batch()).backward()
    assert comp.sdpa.routed == 2
    assert torch.nn.functional.scaled_dot_product_attention is plain_fn
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    out = F.scaled_dot_product_attention(q, q, q)
    assert "CompressedSDPA" not in type(out.grad_fn).__name__
    loss_of("hf", model, text_batch()).backward()
    assert comp.sdpa.routed == 2  # not routed once removed

    class Boom(Core):
        def forward(self, *a):
            super().forward(*a)
            raise RuntimeError("boom")

    holder = Holder()
    holder.core = Boom()
    comp = _attention_compressor(holder)
    with comp, pytest.raises(RuntimeError, match="boom"):
        holder(q, q, q)
    assert comp.sdpa.routed == 1
    out = F.scaled_dot_product_attention(q, q, q)
    assert "CompressedSDPA" not in type(out.grad_fn).__name__
    from slimfit.hooks import top_saved_tensors_hooks
    assert top_saved_tensors_hooks() is None
