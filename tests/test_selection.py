"""The module-selection API on every supported model family, and its errors."""

import pytest
import torch

from slimfit.errors import SelectionError
from slimfit import preview
from slimfit.selection import (compiled_modules, is_compiled, matches, select_modules,
                               select_units, validate_pattern)

from models import each_case, hf_bert


@each_case()
def test_default_candidates_per_family(case):
    model = case.factory()
    sel = select_units(model)
    assert len(sel.units) == case.units, sel.candidate_names
    for u in sel.units:
        for pname, p in zip(u.param_names, u.params):
            assert not pname.endswith(".bias")
            assert p.dim() > 1 or "norm" in pname.lower() or "LayerNorm" in pname
    # every trainable tensor is either a candidate or always trained
    n_tensors = sum(len(u.params) for u in sel.units) + len(sel.always_trained)
    assert n_tensors == len(list(model.parameters()))


def test_bert_base_has_102_candidates():
    model = hf_bert(layers=12, hidden=64, heads=4, intermediate=128, vocab=100, positions=512,
                    attn=None)
    # 4 embedding tensors + 12 x 8 + pooler + classifier, as in the paper
    assert len(select_units(model).units) == 102


def test_matching_rules():
    assert matches("bert.encoder.layer.0.attention.self.query.weight", r".*query\.weight")
    assert not matches("bert.encoder.layer.0.attention.self.query.weight", r"query\.weight")
    assert matches("model.classifier.weight", ["classifier.weight"])
    assert not matches("model.myclassifier.weight", ["classifier.weight"])


def test_exclude_always_train_and_preview():
    m = hf_bert()
    sel = select_units(m, always_train=["classifier.weight"], exclude=r".*embeddings.*")
    names = sel.candidate_names
    assert "classifier.weight" not in names
    assert not any("embeddings" in n for n in names)
    assert "classifier.weight" in sel.always_trained
    pv = preview(m, always_train=["classifier.weight"])
    assert "classifier.weight" in pv["unmatched"]
    assert set(pv["matched"]).isdisjoint(pv["unmatched"])
    assert len(pv["matched"]) + len(pv["heads"]) + len(pv["unmatched"]) == len(list(m.parameters()))


def test_groups_qkv_into_one_unit():
    m = hf_bert()
    sel = select_units(m, groups=[r"(.*attention\.self)\.(query|key|value)\.weight"])
    unit = next(u for u in sel.units if u.name == "bert.encoder.layer.0.attention.self")
    assert [n.rsplit(".", 2)[-2] for n in unit.param_names] == ["query", "key", "value"]
    assert len(sel.units) == 22 - 2 * 2


def test_user_frozen_parameters_are_left_alone():
    m = hf_bert()
    m.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    sel = select_units(m)
    assert "bert.embeddings.word_embeddings.weight" in sel.user_frozen
    assert "bert.embeddings.word_embeddings.weight" not in sel.candidate_names


@pytest.mark.parametrize("kwargs,match", [
    ({"include": r"decoder\..*"}, r"include='decoder\\\\..\*' matched no parameter"),
    ({"exclude": ["nonexistent.weight"]}, "exclude=.*matched no parameter"),
    ({"groups": [r"(.*)\.nothing"]}, "groups=.*matched no parameter"),
    ({"include": "(["}, "not a valid regular expression"),
    ({"exclude": r".*"}, "no candidate layers"),
])
def test_bad_patterns(kwargs, match):
    with pytest.raises(SelectionError, match=match):
        select_units(hf_bert(), **kwargs)


def test_model_without_candidates():
    with pytest.raises(SelectionError, match="no candidate layers"):
        select_units(torch.nn.Sequential(torch.nn.LayerNorm(4, elementwise_affine=False),
                                         torch.nn.PReLU()))
    with pytest.raises(SelectionError, match="has no parameters"):
        select_units(torch.nn.ReLU())


def test_error_names_existing_parameters():
    with pytest.raises(SelectionError, match="bert.embeddings.word_embeddings.weight"):
        select_units(hf_bert(), include=["nope"])


def test_select_modules_matches_regex_and_suffix_names():
    model = hf_bert()
    layers = [n for n, _ in select_modules(model, r"bert\.encoder\.layer\.\d+", field="units")]
    assert layers == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    assert [n for n, _ in select_modules(model, ["classifier", "layer.1.output.dense"],
                                         field="units")] == \
        ["bert.encoder.layer.1.output.dense", "classifier"]
    assert select_modules(model, ".*", field="units")[0][0] != ""  # the model itself never


@pytest.mark.parametrize("pattern,match", [
    (["decoder"], r"units=\['decoder'\] matched no module\. .*Some module names in this model: "
                  r"bert, bert\.embeddings"),
    (r"encoder\.block\.\d", r"units='encoder\\\\.block\\\\.\\\\d' matched no module"),
    ("(", r"units='\(' is not a valid regular expression"),
    (3, "units must be a regex string or a list of names, got 3"),
])
def test_select_modules_errors_name_field_pattern_and_modules(pattern, match):
    with pytest.raises(SelectionError, match=match):
        select_modules(hf_bert(), pattern, field="units")


def test_validate_pattern_is_public_and_accepts_none():
    validate_pattern(None, "include")
    validate_pattern(["a.weight"], "include")
    with pytest.raises(SelectionError, match=r"include must be a regex string or a list of "
                                             r"names, got \['a', 3\]"):
        validate_pattern(["a", 3], "include")


def test_compiled_modules_finds_the_outermost_compiled_module():
    model = hf_bert()
    assert compiled_modules(model) == [] and not is_compiled(model)
    model.bert.encoder = torch.compile(model.bert.encoder)  # lazy: nothing compiles yet
    model.classifier.compile()
    assert compiled_modules(model) == ["bert.encoder", "classifier"] and is_compiled(model)
    assert compiled_modules(torch.compile(hf_bert())) == [""]


def test_a_selection_is_resolved_again_by_name_after_its_tensors_are_replaced():
    """As FSDP2's fully_shard does: new Parameter objects under the same names.
    The freezer must then toggle the new tensors, not the dead ones; a model
    wrapped under another prefix is refused naming the lost tensors."""
    from slimfit.freezing.freezer import LayerFreezer
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    freezer = LayerFreezer(model, freeze_rate=0.5, train_new_heads=False)
    assert freezer.selection.resolved(model) is freezer.selection  # nothing replaced
    old = model[0].weight
    model[0].weight = torch.nn.Parameter(old.detach().clone())
    freezer.resolve(model)
    assert freezer.units[0].params[0] is model[0].weight
    freezer.apply([0])
    assert not model[0].weight.requires_grad and old.requires_grad
    with pytest.raises(SelectionError, match=r"2 SlimFit tensors are no longer in the model under "
                                             r"their names \(e.g. \['0.weight', '1.weight'\]\)"):
        freezer.resolve(torch.nn.Sequential(model))
