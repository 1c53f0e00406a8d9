"""Decoder LLMs: the chunked LM loss equals the model's own loss and
gradients (fp32, frozen and trainable heads, tied embeddings, ignore_index,
shifted labels), compression of decoder blocks keeps every trainable
tensor's gradient within cosine 0.99 in fp32 and under bf16 autocast, no
half-precision weight copy is kept under autocast, the freezer and streaming
find decoder stacks, and bad setups are refused or fall back, said."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.functional import cosine_similarity

import slimfit
from slimfit import SessionConfig, SlimFitError, SlimFitSession, UnsupportedSetupError
from slimfit.experiments.zoo import decoder, lm_batch
from slimfit.memory.tracker import SavedTensorTracker
from slimfit.offload.stream_config import default_stream_units

CAUSAL = ["llama", "qwen2", "mistral", "gemma", "phi3", "gpt2"]
ALL = CAUSAL + ["t5", "bart"]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*loss_type=None.*")
        yield


def _grads(model, batch, config=None, bf16=False):
    model.zero_grad(set_to_none=True)
    session = SlimFitSession(model, config).start(torch.optim.SGD(model.parameters(), lr=0.0)) \
        if config is not None else None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(**batch)
    out.loss.backward()
    if session is not None:
        session.stop()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# -- the chunked loss -------------------------------------------------------------------------

@pytest.mark.parametrize("bias, trainable", [(False, True), (True, True), (False, False)])
def test_chunked_cross_entropy_equals_the_unchunked_loss(bias, trainable):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 97, bias=bias)
    head.weight.requires_grad_(trainable)
    h = torch.randn(3, 11, 16, requires_grad=True)
    labels = torch.randint(0, 97, (3, 11))
    labels[0, 3:6] = -100
    wrt = [h] + [p for p in head.parameters() if p.requires_grad]
    ref = F.cross_entropy(head(h)[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1))
    got = slimfit.chunked_cross_entropy(h, head, labels, chunk_size=5)
    torch.testing.assert_close(got, ref)
    for a, b in zip(torch.autograd.grad(got, wrt), torch.autograd.grad(ref, wrt)):
        torch.testing.assert_close(a, b)
    # transformers' gradient-accumulation convention: a sum divided by the batch's items
    items = torch.tensor(40.0)
    ref_sum = F.cross_entropy(head(h)[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1),
                              reduction="sum") / items
    torch.testing.assert_close(slimfit.chunked_cross_entropy(h, head, labels, chunk_size=4,
                                                             num_items_in_batch=items), ref_sum)


@pytest.mark.parametrize("family", CAUSAL)
def test_chunked_loss_equals_the_models_own_loss_and_gradients(family):
    torch.manual_seed(0)
    model = decoder(family).eval()  # no dropout
    batch = lm_batch(model)
    batch["labels"][0, :5] = -100
    if family == "llama":  # a frozen head too
        model.lm_head.weight.requires_grad_(False)
    ref, g_ref = _grads(model, batch)
    got, g = _grads(model, batch, SessionConfig(chunked_loss=7))
    torch.testing.assert_close(got.loss, ref.loss)
    assert got.logits is None and g.keys() == g_ref.keys()
    for n in g_ref:
        torch.testing.assert_close(g[n], g_ref[n], msg=n)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (family in ("qwen2", "gpt2", "gemma"))
    with torch.no_grad():  # evaluation and generation run the model as it is
        assert model(**batch).logits.shape[-1] == model.config.vocab_size


def test_chunked_loss_keeps_no_logits_for_backward():
    torch.manual_seed(0)
    model = decoder("llama", vocab=4000).eval()
    batch = lm_batch(model, n=2, seq=32)

    def saved(config):
        session = SlimFitSession(model, config).start(torch.optim.SGD(model.parameters(), lr=0))
        with SavedTensorTracker(model) as tracker:
            loss = model(**batch).loss
        tracker.finalize()
        loss.backward()
        session.stop()
        return tracker.peak

    logits_bytes = 2 * 32 * 4000 * 4  # the fp32 log-softmax cross-entropy keeps: gone
    kept = 2 * 32 * (4 + 8)  # in its place: one fp32 log-sum-exp and one int64 target a token
    assert saved(SessionConfig()) - saved(SessionConfig(chunked_loss=True)) >= logits_bytes - kept


def test_chunked_loss_falls_back_and_says_so_without_labels():
    model = decoder("llama")
    session = SlimFitSession(model, SessionConfig(chunked_loss=True)).start(
        torch.optim.SGD(model.parameters(), lr=0.0))
    batch = lm_batch(model)
    with pytest.warns(UserWarning, match="called without labels in training"):
        logits = model(input_ids=batch["input_ids"]).logits
    assert logits.shape[-1] == model.config.vocab_size  # computed in full, as asked
    session.stop()
    assert "forward" not in model.lm_head.__dict__ and "_loss_function" not in model.__dict__


def test_chunked_loss_refuses_what_it_cannot_chunk():
    from slimfit.experiments.zoo import hf_bert
    with pytest.raises(SlimFitError, match="chunked_cross_entropy"):
        SlimFitSession(hf_bert(), SessionConfig(chunked_loss=True))
    with pytest.raises(SlimFitError, match="chunked_loss must be a bool or a chunk size"):
        SessionConfig(chunked_loss=0)
    import bitsandbytes as bnb
    model = decoder("llama")
    model.lm_head = bnb.nn.Linear4bit(64, model.config.vocab_size, bias=False)
    session = SlimFitSession(model, SessionConfig(chunked_loss=True))
    with pytest.raises(UnsupportedSetupError, match="quantized weight"):
        session.start(torch.optim.SGD([p for p in model.parameters() if p.is_floating_point()],
                                      lr=0.1))


# -- compression of decoder blocks ------------------------------------------------------------

@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family,mlp", [(f, "int8") for f in ALL] + [
    ("llama", "int4"), ("phi3", "int4")])  # the decoder bench's lean runs: 4-bit SwiGLU operands
def test_compressed_decoders_keep_gradient_fidelity(family, mlp, bf16):
    """Every trainable tensor's gradient with compression (every saved tensor
    treated: min_numel=0) against the uncompressed step: cosine >= 0.99."""
    torch.manual_seed(0)
    model = decoder(family).eval()
    batch = lm_batch(model)
    _, ref = _grads(model, batch, bf16=bf16)
    treat = {} if mlp == "int8" else {"mlp": slimfit.compression.config.Treatment(
        method="int4", group_size=32)}
    comp = SessionConfig(compression=slimfit.CompressionConfig(min_numel=0, **treat),
                         chunked_loss=family in CAUSAL)
    _, got = _grads(model, batch, comp, bf16=bf16)
    big = max(g.norm() for g in ref.values())
    for n, g in ref.items():
        if g.norm() > 1e-4 * big:
            cos = cosine_similarity(g.double().flatten(), got[n].double().flatten(), dim=0)
            assert cos >= 0.99, (n, float(cos))


def test_decoder_kinds_are_found_by_operation():
    from slimfit.compression.detect import detect_kinds
    counts = {f: {k: len(v) for k, v in detect_kinds(decoder(f)).items()} for f in ALL}
    assert counts["llama"]["attention"] == counts["llama"]["mlp"] == 2   # gate/up/down MLPs
    assert counts["llama"]["layernorm"] == 5                            # RMSNorms
    assert counts["phi3"]["mlp"] == 2                                   # fused gate_up_proj
    assert counts["gpt2"]["attention"] == 2 and counts["gpt2"]["linear_input"] == 7  # Conv1D
    assert counts["t5"]["mlp"] == 4 and counts["t5"]["attention"] >= 6  # gated wi_0/wi_1


def test_bf16_autocast_keeps_no_half_precision_weight_copies():
    """Under autocast, saving a Linear's cast weight costs its bf16 bytes per
    step; with compression the weight is cast again in backward instead: the
    saved bytes fall by at least every weight's bf16 copy."""
    torch.manual_seed(0)
    model = decoder("qwen2", hidden=128, intermediate=256, vocab=2000).eval()
    batch = lm_batch(model, seq=8)

    def saved(config):
        session = SlimFitSession(model, config).start(torch.optim.SGD(model.parameters(), lr=0))
        with SavedTensorTracker(model) as tracker, torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        tracker.finalize()
        loss.backward()
        session.stop()
        return tracker.peak

    weights = sum(2 * m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    none = slimfit.CompressionConfig(**{k: "none" for k in ("attention", "mlp", "gelu", "layernorm",
                                                            "ffn_down_input", "linear_input")},
                                     dropout_mask=False)
    assert saved(SessionConfig()) - saved(SessionConfig(compression=none)) >= weights


# -- the freezer, streaming and the planner on decoder stacks ---------------------------------

def test_decoder_stacks_are_found_for_streaming_and_freezing():
    assert default_stream_units(decoder("llama", layers=3)) == [f"model.layers.{i}" for i in range(3)]
    assert default_stream_units(decoder("t5", layers=2)) == [
        "encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"]
    qwen = decoder("qwen2")  # tied embeddings: one unit, trained as one
    units = slimfit.preview(qwen)["units"]
    assert "model.embed_tokens.weight" in units and "lm_head.weight" not in units


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_streamed_and_offloaded_decoders_train_bit_identically(family):
    def run(config):
        torch.manual_seed(0)
        model = decoder(family, layers=3).eval()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        session = SlimFitSession(model, config).start(opt)
        batch = lm_batch(model)
        for _ in range(4):
            session.step(lambda: model(**batch).loss)
        session.stop()
        return model.state_dict()

    freezing = slimfit.SlimFitConfig(freeze_rate=0.8, seed=0)
    ref = run(SessionConfig(freezing=freezing))
    got = run(SessionConfig(freezing=freezing, offload_optimizer_state=True,
                            stream=slimfit.StreamConfig(resident=1, prefetch=0)))
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_the_step_bench_measures_a_bytes_rate_at_the_full_depth_budget(monkeypatch):
    """Under rate_of="bytes" each shallow model trains the full-depth model's
    bytes per step: gradients and optimizer state are the same at every
    depth, so the line through two depths is flat for them."""
    import dataclasses
    from slimfit.experiments import bench_decoders as bd
    from slimfit.experiments.zoo import SHAPES
    from slimfit.experiments.zoo.decoders import LLMShape
    monkeypatch.setitem(SHAPES, "tiny-llama", LLMShape("llama", 8, 64, 4, 2, 128, 256, False))
    run = bd.DECODER_RUNS["slimfit_stream_bytes"]
    run = run.variant("t", session=dataclasses.replace(run.session, freezing=dataclasses.replace(
        run.session.freezing, freeze_rate=0.8)))
    budget = bd.full_depth_budget("tiny-llama", run)
    deep = bd.candidate_bytes(bd.llm("tiny-llama", dtype=torch.bfloat16), run.session.freezing)
    assert abs(budget - 0.2 * deep) <= 1
    points = {n: bd.step_bytes("tiny-llama", run, n, 1, 16, budget) for n in (4, 6)}
    assert points[4]["gradients"] == points[6]["gradients"] <= budget  # every tensor rotates
    # the same up to AdamW's per-tensor step counters in the bytes-per-byte rate
    assert points[4]["optimizer_state"] == pytest.approx(points[6]["optimizer_state"], rel=1e-3)
    with pytest.raises(SystemExit, match="fewer candidate bytes than the full-depth budget"):
        low = bd.with_rate(run, 0.3)
        bd.step_bytes("tiny-llama", low, 1, 1, 16, bd.full_depth_budget("tiny-llama", low))
