"""Model families at any size, built from config (random init, no hub), the
batches that fit them and their training loss: the tests use them at their
2-layer, 32-wide defaults, the benchmarks and Hydra runs at real sizes.

Factories take the size as keywords (``layers``, ``hidden``, ``heads``,
``intermediate`` (default ``2 * hidden``), ``vocab``/``positions`` or
``image``/``patch``, ``labels``, ``dropout`` (0.0 turns it off), ``attn``, the
attention implementation, None for the library's choice). The Hydra model
configs (``configs/model/``) point at :func:`hf_pretrained`,
:func:`hf_from_config` and :func:`timm_classifier`.
"""

import functools
from typing import Any

import torch
from torch import nn

from slimfit.experiments.zoo.pretrained import minilm_path

__all__ = ["LAYERS", "PlainNet", "TimmClassifier", "hf_bert", "hf_distilbert", "hf_from_config",
           "hf_pretrained", "hf_roberta", "hf_vit", "image_batch", "loss_fn", "text_batch",
           "timm_classifier", "timm_vit"]

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




# -- what the Hydra model configs build -----------------------------------------------------

def hf_pretrained(path: str, num_labels: int, attn_implementation: str = "sdpa") -> nn.Module:
    """A Hugging Face sequence classifier from a local path or hub name
    (``minilm`` = the packaged MiniLM). Offline: a hub name must be cached."""
    from transformers import AutoModelForSequenceClassification
    path = minilm_path() if path == "minilm" else path
    return AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, attn_implementation=attn_implementation).train()


_FAMILIES = {"bert": ("BertConfig", "BertForSequenceClassification"),
             "roberta": ("RobertaConfig", "RobertaForSequenceClassification"),
             "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification"),
             "vit": ("ViTConfig", "ViTForImageClassification")}


def hf_from_config(family: str, num_labels: int, attn_implementation: str = "sdpa",
                   **config: Any) -> nn.Module:
    """A randomly initialised HF model from its config (BERT-base, ViT-B/16 ...)."""
    if family not in _FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {sorted(_FAMILIES)}.")
    import transformers
    cfg_cls, model_cls = (getattr(transformers, n) for n in _FAMILIES[family])
    cfg = cfg_cls(num_labels=num_labels, attn_implementation=attn_implementation, **config)
    return model_cls(cfg)


class TimmClassifier(nn.Module):
    """timm model behind the HF-style ``pixel_values`` keyword."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)


def timm_classifier(name: str, num_labels: int, img_size: int, patch_size: int | None = None,
                    eager_attention: bool = False, **kwargs: Any) -> nn.Module:
    """A timm ViT from scratch (no package ships ViT weights); ``eager_attention``
    turns off timm's fused attention (compression covers both paths)."""
    import timm
    extra = {"patch_size": patch_size} if patch_size else {}
    m = timm.create_model(name, pretrained=False, num_classes=num_labels, img_size=img_size,
                          **extra, **kwargs)
    if eager_attention:
        for mod in m.modules():
            if hasattr(mod, "fused_attn"):
                mod.fused_attn = False
    return TimmClassifier(m)
