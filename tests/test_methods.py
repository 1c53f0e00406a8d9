"""Fine-tuning runs (experiments/runs.py, experiments/peers.py, configs/method/): LoRA trains only
its adapters and the head, checkpointing gives the gradients of no
checkpointing (with and without SlimFit freezing), 8-bit Adam trains, what does
not compose is refused, every method config composes and runs one step, the
Hydra methods and the benchmark methods agree, and the peer benchmark runs."""

import dataclasses
import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.nn.functional import cosine_similarity

import models
from models import CASES, loss_fn
from slimfit import ActivationCompressor, CompressionConfig
from slimfit import SlimFitConfig
from slimfit import SelectionError
from slimfit.experiments import report
from slimfit.experiments.peers import (LoraSpec, RunError, head_modules, lora_targets,
                                       set_checkpointing)
from slimfit.experiments.runs import RUNS, Run, get_run
from slimfit.experiments.train import CONFIG_DIR as _CONFIGS
from slimfit.experiments.train import CONFIG_DIR, build, run
from slimfit import SessionConfig, SlimFitSession
from slimfit import StreamConfig

TRANSFORMER_CASES = [c for c in CASES if c[0] != "plain"]
#: the Hydra method files (configs/method/<name>.yaml), each a registry run
METHOD_NAMES = sorted(p.stem for p in __import__("pathlib").Path(_CONFIGS, "method").glob("*.yaml"))


@pytest.fixture
def hydra_ctx():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        yield


def _case(name):
    factory, batch = next((f, b) for n, f, b, _ in CASES if n == name)
    torch.manual_seed(0)
    model = factory().train()
    return model, batch(model)


def _grads(model, name, batch, seed=1):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same dropout masks in both runs
    loss_fn(name, model, batch).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# -- model transforms -------------------------------------------------------------------

@pytest.mark.parametrize("name", [c[0] for c in TRANSFORMER_CASES])
def test_lora_trains_only_adapters_and_head(name):
    model, batch = _case(name)
    head, targets = head_modules(model), lora_targets(model)
    peft_model = LoraSpec().apply(model)  # wraps model in place
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n or ".modules_to_save." in n
                             for n in trainable), sorted(trainable)[:5]
    assert any(".modules_to_save." in n for n in trainable), f"head {head} not trained"
    # every Linear of the blocks is adapted (q/k/v or fused qkv, attention out, FFN in/out)
    assert len({n.split(".lora_A.")[0] for n in trainable if ".lora_A." in n}) == \
        len(targets) >= 2 * 2
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    opt = Run(name="lora", lora=LoraSpec()).make_optimizer(
        [p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # lora_B starts at zero: lora_A gets its first gradient at step 2
        opt.zero_grad(set_to_none=True)
        loss_fn(name, peft_model, batch).backward()
        opt.step()
    for n, p in peft_model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == (n in trainable), f"{n}: changed={changed}, trainable={n in trainable}"


@pytest.mark.parametrize("name", [c[0] for c in TRANSFORMER_CASES])
def test_checkpointing_gives_the_same_gradients(name):
    model, batch = _case(name)
    exact = _grads(model, name, batch)
    set_checkpointing(model, True)
    ckpt = _grads(model, name, batch)
    assert exact.keys() == ckpt.keys()
    big = max(g.norm() for g in exact.values())
    for n in exact:
        torch.testing.assert_close(ckpt[n], exact[n], msg=n)
        if exact[n].norm() > 1e-4 * big:  # key biases: exactly zero up to rounding
            assert cosine_similarity(ckpt[n].flatten(), exact[n].flatten(), dim=0) > 1 - 1e-6
    set_checkpointing(model, False)
    torch.testing.assert_close(_grads(model, name, batch), exact)


def _slimfit_grads_with_checkpointing(compression, attn=None):
    """Gradients of one SlimFit step (half the units frozen), without and with
    checkpointing."""
    grads = []
    for ckpt in (False, True):
        if compression:  # no dropout: the compressed passes must see the same function
            torch.manual_seed(0)
            model = models.hf_bert(attn=attn, dropout=0.0)
            batch = models.text_batch(model)
        else:
            model, batch = _case("hf-bert")
        session = SlimFitSession(model, SessionConfig(
            freezing=SlimFitConfig(freeze_rate=0.5),
            compression=CompressionConfig() if compression else None))
        session.start(torch.optim.AdamW(model.parameters(), lr=1e-3))
        if ckpt:
            set_checkpointing(model, True)
        session.begin_step(frozen=list(range(0, len(session.units), 2))[:session.freezer.num_frozen])
        grads.append(_grads(model, "hf-bert", batch))
        session.stop()
    return grads, model


def test_slimfit_freezing_composes_with_checkpointing():
    grads, model = _slimfit_grads_with_checkpointing(compression=False)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) < sum(1 for _ in model.parameters())
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_compression_composes_with_checkpointing(attn):
    """Checkpoint's recomputation re-enters each compression scope under its own
    hooks; the tensors of the original forward must still unpack with theirs
    (this crashed with '_Holder' object has no attribute 'shape')."""
    grads, _ = _slimfit_grads_with_checkpointing(compression=True, attn=attn)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_lora_with_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model, batch = _case("hf-bert")
        grads.append(_grads(Run(name="m", lora=LoraSpec(), checkpointing=ckpt).apply(model),
                            "hf-bert", batch))
    torch.testing.assert_close(grads[1], grads[0])


def test_adamw8bit_trains_like_adamw_with_8bit_state():
    from transformers import BertConfig, BertForSequenceClassification
    batch = {"input_ids": torch.randint(0, 128, (8, 12)), "labels": torch.randint(0, 2, (8,))}
    curves, states = {}, {}
    for name in ("full", "full_8bit"):
        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(
            vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0))
        opt = get_run(name).make_optimizer(model.parameters(), lr=1e-3)
        curves[name] = []
        for _ in range(10):
            opt.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            curves[name].append(loss.item())
        states[name] = {t.dtype for st in opt.state.values() for t in st.values() if torch.is_tensor(t)}
    eight = curves["full_8bit"]
    assert eight[-1] < 0.8 * eight[0], eight
    assert abs(eight[-1] - curves["full"][-1]) < 0.05, curves
    assert torch.uint8 in states["full_8bit"] and torch.uint8 not in states["full"]


def test_compression_on_a_lora_model_keeps_gradient_fidelity():
    model, batch = _case("hf-bert")
    model.eval()  # no dropout: both passes see the same function
    peft_model = LoraSpec(dropout=0.0).apply(model)
    with torch.no_grad():  # a trained adapter: lora_B != 0, so lora_A has a gradient
        for n, p in peft_model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)
    exact = _grads(peft_model, "hf-bert", batch)
    comp = ActivationCompressor(peft_model, CompressionConfig(min_numel=0))
    found = comp.preview()
    assert found["attention"] and found["gelu"] and found["layernorm"]
    assert not any(".lora_" in n for n in found["ffn_down_input"])  # adapters stay exact
    with comp:
        approx = _grads(peft_model, "hf-bert", batch)
    big = max(g.norm() for g in exact.values())
    checked = [n for n, g in exact.items() if g.norm() > 1e-4 * big]
    assert any(".lora_A." in n for n in checked)
    for n in checked:
        assert cosine_similarity(approx[n].flatten(), exact[n].flatten(), dim=0) >= 0.99, n


def test_compression_finds_the_attention_of_a_lora_model():
    model, _ = _case("hf-bert")
    comp = ActivationCompressor(LoraSpec().apply(model), CompressionConfig(min_numel=0))
    assert len(comp.preview()["attention"]) == 2
    # LoRA's low-rank factors are not FFN down-projections (their inputs stay exact)
    assert not any("lora_" in n for n in comp.preview()["ffn_down_input"])


# -- what is refused ----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"name": ""}, "non-empty"),
    ({"name": "m", "optimizer": "sgd"}, "adamw"),
    ({"name": "m", "checkpointing": 1}, "bool"),
    ({"name": "m", "lora": "r8"}, "LoraSpec"),
    ({"name": "m", "lora": {"r": 0}}, "r must be"),
    ({"name": "m", "lora": {"dropout": 1.0}}, "dropout"),
    ({"name": "m", "lora": {"alpha": -1}}, "alpha"),
    ({"name": "m", "session": {"compression": True}}, "SessionConfig"),
    ({"name": "m", "checkpointing": True,
      "session": SessionConfig(freezing=SlimFitConfig(), stream=StreamConfig())}, "streaming"),
])
def test_bad_methods_are_refused(kwargs, match):
    with pytest.raises(RunError, match=match):
        Run(**kwargs)


def test_unknown_method_and_unmatched_lora_targets():
    with pytest.raises(RunError, match="unknown run 'qlora'; choose one of full, "):
        get_run("qlora")
    model, _ = _case("hf-bert")
    with pytest.raises(SelectionError, match="matched no module"):
        LoraSpec(targets=["no_such_linear"]).apply(model)
    with pytest.raises(RunError, match="no module that supports activation checkpointing"):
        set_checkpointing(torch.nn.Linear(2, 2))


def test_labels():
    assert [RUNS[n].label() for n in ("full", "full_8bit", "lora_checkpointing", "slimfit",
                                         "slimfit_checkpointing", "lora_compress")] == [
        "full fine-tuning", "full fine-tuning, AdamW8bit", "LoRA r=8 + checkpointing",
        "SlimFit r=0.9 + compression", "SlimFit r=0.9 + checkpointing", "LoRA r=8 + compression"]


# -- Hydra --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", METHOD_NAMES)
def test_method_config_agrees_with_the_benchmark_method(hydra_ctx, name, tmp_path):
    cfg = compose("train", overrides=[f"method={name}", f"output_dir={tmp_path}"])
    built = instantiate(cfg.method)
    expected = RUNS[name]
    # the method file holds the peers and optimizer; the peak lr is the task's (a method
    # file may set it, as LoRA's does), SlimFit's options the slimfit group's
    assert built == dataclasses.replace(expected, session=None, lr=None)
    assert cfg.task.lr == (expected.lr if expected.lr is not None else 1e-4)
    sf = cfg.slimfit
    session = expected.session
    if session is None:
        assert not sf.enabled
        return
    rate = session.freezing.freeze_rate if session.freezing is not None else 0.0
    assert sf.enabled and sf.freeze_rate == rate  # no freezing = the callback at rate 0
    _, _, _, meta = build(cfg)
    assert meta["slimfit"].session_config.compression == session.compression


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method_runs_one_step(hydra_ctx, name, tmp_path):
    cfg = compose("train", overrides=[
        f"method={name}", "model=bert_tiny", "trainer.fast_dev_run=true", f"output_dir={tmp_path}",
        "trainer.enable_progress_bar=false", "data.n_train=64", "data.n_val=32",
        "data.eval_batch_size=32", "data.max_len=16"])
    res = run(cfg)
    assert res["steps"] == 1 and res["val_acc"] is not None and res["memory"]["total"] > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    expected = RUNS[name]
    # what ran, from the run's own record: freezing rate, compression, peers, optimizer
    ran_rate = saved["freeze_rate"] if saved["freezing"] is not None else None
    want = expected.session
    assert ran_rate == (None if want is None else want.freezing.freeze_rate if want.freezing
                        else 0.0)
    assert saved["compression"] == (want is not None and want.compression is not None)
    assert saved["lora_r"] == (expected.lora.r if expected.lora else None)
    assert saved["checkpointing"] == expected.checkpointing
    assert saved["optimizer"] == expected.optimizer
    assert saved["method"] == name and saved["method_label"] == expected.label()


def test_lora_checkpointing_on_a_timm_vit_runs_one_step(hydra_ctx, tmp_path):
    cfg = compose("train", overrides=[
        "method=lora_checkpointing", "model=timm_vit_tiny", "data=digits", "data.image_size=16",
        "model.depth=2", "trainer.fast_dev_run=true", f"output_dir={tmp_path}",
        "trainer.enable_progress_bar=false", "data.n_train=64", "data.n_val=32",
        "data.batch_size=16", "data.eval_batch_size=32"])
    assert run(cfg)["method_label"] == "LoRA r=8 + checkpointing"


def test_existing_slimfit_option_still_names_the_run(hydra_ctx, tmp_path):
    cfg = compose("train", overrides=["slimfit=r090_compress", "model=bert_tiny",
                                      f"output_dir={tmp_path}"])
    _, _, _, meta = build(cfg)
    assert meta["method"] == "slimfit+compress"  # method=full defers to the slimfit group


def test_checkpointing_with_a_budget_is_refused(hydra_ctx, tmp_path):
    base = ["method=checkpointing", "model=bert_tiny", f"output_dir={tmp_path}"]
    build(compose("train", overrides=base + ["slimfit=r090_compress"]))  # composes (tested above)
    with pytest.raises(RunError, match="memory_budget"):
        build(compose("train", overrides=base + ["slimfit=budget"]))
    with pytest.raises(RunError, match="conflicts"):
        build(compose("train", overrides=["method=full_8bit", "task.optimizer=sgd",
                                          "model=bert_tiny", f"output_dir={tmp_path}"]))


def test_method_group_without_target_or_of_another_type(hydra_ctx, tmp_path):
    cfg = compose("train", overrides=["method=lora", "model=bert_tiny", f"output_dir={tmp_path}"])
    del cfg.method._target_
    with pytest.raises(ValueError, match="config group 'method' needs a _target_"):
        build(cfg)
    cfg = compose("train", overrides=["method=full", "model=bert_tiny", f"output_dir={tmp_path}",
                                      "method._target_=builtins.dict"])
    with pytest.raises(ValueError, match="must build a slimfit.experiments.runs.Run"):
        build(cfg)


def test_report_puts_methods_side_by_side(hydra_ctx, tmp_path):
    for name in ("full", "lora"):
        run(compose("train", overrides=[
            f"method={name}", "model=bert_tiny", "trainer.max_steps=1",
            "trainer.enable_progress_bar=false", "data.n_train=32", "data.n_val=16",
            "data.max_len=16", "callbacks.memory_monitor.every_n_steps=1",
            f"output_dir={tmp_path}/runs/{name}"]))
    table = report.main([str(tmp_path / "runs")])
    lines = [ln for ln in table.splitlines() if "movie" in ln]
    assert "| full fine-tuning | full |" in lines[0] and "| LoRA r=8 | lora |" in lines[1]
    assert "x smaller" in lines[1]


# -- the peer benchmark ---------------------------------------------------------------------

def test_peer_benchmark_adds_the_recomputed_block_under_checkpointing(capsys):
    from slimfit.experiments import bench_peers
    runs = bench_peers.main(["--model", "minilm", "--batch-sizes", "2", "4", "--seq-len", "8",
                             "--methods", "full", "checkpointing", "lora", "--eager-methods",
                             "full", "--timed-steps", "1", "--extrapolate", "8"])
    out = capsys.readouterr().out
    full, ckpt, lora, eager = runs
    assert "sdpa attention" in full.describe and "eager attention" in eager.describe
    for bs in (2, 4):
        assert ckpt.by_batch[bs].recompute > 0 and full.by_batch[bs].recompute == 0
        assert ckpt.by_batch[bs].activations < full.by_batch[bs].activations
        # LoRA keeps the base weights' gradients and optimizer state away, not activations
        assert lora.by_batch[bs].report.optimizer_state < full.by_batch[bs].report.optimizer_state / 10
    assert "Extrapolation to batch 8" in out and " * |" in out and "eager attention" in out
