"""Tiny models of every family SlimFit must handle, built from config (no hub), and
the one table of model cases the tests share.

Factories take the size as keywords (``layers``, ``hidden``, ``heads``,
``intermediate`` (default ``2 * hidden``), ``vocab``/``positions`` or
``image``/``patch``, ``labels``, ``dropout`` (0.0 turns it off), ``attn``, the
attention implementation, None for the library's choice); their defaults are
the 2-layer, 32-wide models the unit tests use. ``case(name, **size)`` binds a
family to a size and knows its count of default candidate units; ``CASES`` is
every family at the default size.
"""

import functools
from typing import Callable, NamedTuple

import pytest
import torch
from torch import nn

LAYERS = 2  # blocks of every default-size model


# -- factories ------------------------------------------------------------------------------

def _hf(model_class: str, config_class: str, **config) -> nn.Module:
    """A transformers model of the named classes from config (random init)."""
    import transformers
    return getattr(transformers, model_class)(getattr(transformers, config_class)(**config))


def _encoder(layers, hidden, heads, intermediate, dropout, attn) -> dict:
    """The config keys BERT, RoBERTa and ViT share."""
    return dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                intermediate_size=intermediate or 2 * hidden, hidden_dropout_prob=dropout,
                attention_probs_dropout_prob=dropout, attn_implementation=attn)


def hf_bert(layers=LAYERS, hidden=32, heads=2, intermediate=None, vocab=128, positions=64,
            labels=2, dropout=0.1, attn="eager", head="classification"):
    """BERT with a sequence-classification head, or ``head="masked-lm"`` (tied LM head)."""
    model = {"classification": "BertForSequenceClassification",
             "masked-lm": "BertForMaskedLM"}[head]
    return _hf(model, "BertConfig", vocab_size=vocab, max_position_embeddings=positions,
               num_labels=labels, **_encoder(layers, hidden, heads, intermediate, dropout, attn))


def hf_roberta(layers=LAYERS, hidden=32, heads=2, intermediate=None, vocab=128, positions=72,
               labels=2, dropout=0.1, attn="eager"):
    return _hf("RobertaForSequenceClassification", "RobertaConfig", vocab_size=vocab,
               max_position_embeddings=positions, num_labels=labels,
               **_encoder(layers, hidden, heads, intermediate, dropout, attn))


def hf_distilbert(layers=LAYERS, hidden=32, heads=2, intermediate=None, vocab=128, positions=64,
                  labels=2, dropout=0.1, attn="eager"):
    return _hf("DistilBertForSequenceClassification", "DistilBertConfig", vocab_size=vocab,
               dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=intermediate or 2 * hidden,
               max_position_embeddings=positions, num_labels=labels, dropout=dropout,
               attention_dropout=dropout, attn_implementation=attn)


def hf_vit(layers=LAYERS, hidden=32, heads=2, intermediate=None, image=32, patch=8, labels=3,
           dropout=0.0, attn="eager"):
    return _hf("ViTForImageClassification", "ViTConfig", image_size=image, patch_size=patch,
               num_labels=labels, **_encoder(layers, hidden, heads, intermediate, dropout, attn))


def timm_vit(layers=LAYERS, labels=3):
    """timm's ViT-Tiny (192 wide, fused qkv) on 32 x 32 images in 8 x 8 patches."""
    import timm
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             depth=layers, num_classes=labels)


class PlainNet(nn.Module):
    """No transformer blocks, no config: embedding, norm, two linears."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.norm(self.emb(x)).mean(1))))


# -- batches and losses ---------------------------------------------------------------------

def _generator(generator):
    return generator if generator is not None else torch.Generator().manual_seed(0)


def text_batch(model, n=4, seq=12, generator=None):
    """Token ids and labels in ``model``'s vocabulary and label range (128 and 2 for a
    model without a config), drawn from ``generator`` (default: a fresh one, seed 0)."""
    g, config = _generator(generator), getattr(model, "config", None)
    vocab, labels = (config.vocab_size, config.num_labels) if config is not None else (128, 2)
    return {"input_ids": torch.randint(0, vocab, (n, seq), generator=g),
            "labels": torch.randint(0, labels, (n,), generator=g)}


def image_batch(model, n=4, generator=None):
    """Images of ``model``'s size (32 x 32 without a config) and labels in its range."""
    g, config = _generator(generator), getattr(model, "config", None)
    image, labels = ((config.image_size, config.num_labels) if config is not None
                     else (32, model.num_classes))
    return {"pixel_values": torch.randn(n, 3, image, image, generator=g),
            "labels": torch.randint(0, labels, (n,), generator=g)}


def loss_fn(name, model, batch):
    """The training loss of a model of family ``name`` on ``batch``."""
    if name == "timm-vit":
        return nn.functional.cross_entropy(model(batch["pixel_values"]), batch["labels"])
    if name == "plain":
        return nn.functional.cross_entropy(model(batch["input_ids"] % 16), batch["labels"])
    return model(**batch).loss


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
