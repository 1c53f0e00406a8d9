"""The table of model cases the tests share, over the one model zoo
(:mod:`slimfit.experiments.zoo`, whose factories default to the 2-layer,
32-wide models the unit tests use). ``case(name, **size)`` binds a family to
a size and knows its count of default candidate units; ``CASES`` is every
family at the default size.
"""

import functools
from typing import Callable, NamedTuple

import pytest
import torch
from torch import nn

from slimfit.experiments.zoo import (LAYERS, PlainNet, hf_bert, hf_distilbert, hf_roberta,  # noqa: F401
                                      hf_vit, image_batch, loss_fn, text_batch, timm_vit)


# -- the case table -------------------------------------------------------------------------

class ModelCase(NamedTuple):
    """One model family at one size. A tuple, so ``name, factory, batch, units = case``."""
    name: str  # the family: picks the loss, names the test
    factory: Callable[[], nn.Module]  # builds the model from the global seed
    batch: Callable[..., dict]  # batch(model, generator=None): a batch that fits it
    units: int  # default candidate units (select_units) of the model

    def build(self, seed: int = 0) -> nn.Module:
        """The model from ``seed``: two builds are the same model."""
        torch.manual_seed(seed)
        return self.factory()

    def loss(self, model, batch):
        return loss_fn(self.name, model, batch)


# family: (factory, batch, default candidate units = fixed + per layer * layers)
FAMILIES = {
    # 3 embeddings + emb LN; per layer q, k, v, o, attn LN, ffn in/out, out LN; pooler; classifier
    "hf-bert": (hf_bert, text_batch, 3 + 1 + 1 + 1, 8),
    # RoBERTa: as BERT, but no pooler and a classifier head of dense + out_proj
    "hf-roberta": (hf_roberta, text_batch, 3 + 1 + 2, 8),
    # DistilBERT: 2 embeddings + LN; per layer q, k, v, out, sa LN, lin1, lin2, out LN;
    # pre_classifier + classifier
    "hf-distilbert": (hf_distilbert, text_batch, 2 + 1 + 2, 8),
    # ViT: cls token, position embeddings, patch conv; per layer q, k, v, o, ffn x2, 2 LNs;
    # final LN; classifier
    "hf-vit": (hf_vit, image_batch, 3 + 1 + 1, 8),
    # timm: cls_token, pos_embed, patch conv; per layer qkv (fused), proj, fc1, fc2, 2 norms;
    # norm; head
    "timm-vit": (timm_vit, image_batch, 3 + 1 + 1, 6),
    "plain": (PlainNet, text_batch, 4, 0),
}


def case(name: str, batch: dict | None = None, **size) -> ModelCase:
    """Family ``name`` at ``size`` (its factory's keywords); ``batch``: keywords of its
    batch factory (``n``, ``seq``)."""
    factory, batch_fn, fixed, per_layer = FAMILIES[name]
    return ModelCase(name, functools.partial(factory, **size),
                     functools.partial(batch_fn, **(batch or {})),
                     fixed + per_layer * size.get("layers", LAYERS))


def cases(*names: str, **size) -> list[ModelCase]:
    """The named families (default: all) at one size."""
    return [case(name, **size) for name in names or FAMILIES]


def each_case(table: list[ModelCase] | None = None):
    """Parametrize a test over ``table`` (default ``CASES``) as ``case``, ids the names."""
    table = CASES if table is None else table
    return pytest.mark.parametrize("case", table, ids=[c.name for c in table])


CASES = cases()
BERT = CASES[0]  # the 2-layer BERT most single-model tests use
