"""Benchmark cases: the models the issues name (BERT-base, BERT-base at
SQuAD's shape, ViT-B/16 from Hugging Face and timm, the real pretrained
MiniLM) with a fixed random batch each, as :class:`Case` objects the
benchmarks measure.

Models are built from config (random init) except MiniLM. Attention is built
as users load it by default (``attn="sdpa"``: transformers'
``attn_implementation="sdpa"``, timm's ``fused_attn``); ``attn="eager"`` is
the secondary, labelled baseline (it stores the T x T probabilities).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from slimfit.experiments.zoo.pretrained import minilm_path

__all__ = ["ATTN", "CASES", "PRECISIONS", "Case", "build_case", "case_batch"]

CASES = ("bert-base", "bert-base-squad", "vit-b16", "timm-vit-b16", "minilm")
PRECISIONS = ("fp32", "bf16")
ATTN = ("sdpa", "eager")


@dataclasses.dataclass
class Case:
    name: str
    model: nn.Module
    batch: dict
    describe: str
    seq_len: int = 128
    image_size: int = 224
    seed: int = 0
    #: ``bf16``: the forward under bf16 autocast (bf16-mixed: fp32 weights,
    #: gradients and optimizer state; bf16 matmul inputs saved for backward)
    precision: str = "fp32"

    def loss(self) -> torch.Tensor:
        """Forward pass and loss on the case's fixed batch."""
        device = next(self.model.parameters()).device.type
        with torch.autocast(device, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            if "x" not in self.batch:  # Hugging Face models compute their own loss
                return self.model(**self.batch).loss
            return nn.functional.cross_entropy(self.model(self.batch["x"]), self.batch["y"])

    def rebatch(self, batch_size: int) -> None:
        """Replace the batch by the case's fixed batch at ``batch_size`` (the one
        :func:`build_case` would give), on the model's device."""
        device = next(self.model.parameters()).device
        vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
        self.batch = case_batch(self.name, batch_size, self.seq_len, self.image_size, device,
                                self.seed, vocab)
        self.describe = self.describe.rsplit(", batch", 1)[0] + f", batch {batch_size}"


def case_batch(name: str, batch_size: int, seq_len: int = 128, image_size: int = 224,
               device: str | torch.device = "cpu", seed: int = 0,
               vocab_size: int | None = None) -> dict:
    """The fixed random batch of case ``name`` (its own generator: the same for
    the same arguments, whatever ran before)."""
    g = torch.Generator().manual_seed(seed)
    if name in ("bert-base", "minilm", "bert-base-squad"):
        batch = {"input_ids": torch.randint(0, vocab_size or 30522, (batch_size, seq_len), generator=g),
                 "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long)}
        if name == "bert-base-squad":  # answer span: start and end token of each example
            start = torch.randint(0, seq_len, (batch_size,), generator=g)
            batch["start_positions"] = start
            batch["end_positions"] = torch.minimum(
                start + torch.randint(0, 30, (batch_size,), generator=g), torch.tensor(seq_len - 1))
        else:
            batch["labels"] = torch.randint(0, 2, (batch_size,), generator=g)
    elif name == "vit-b16":
        batch = {"pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=g),
                 "labels": torch.randint(0, 1000, (batch_size,), generator=g)}
    else:
        batch = {"x": torch.randn(batch_size, 3, image_size, image_size, generator=g),
                 "y": torch.randint(0, 1000, (batch_size,), generator=g)}
    return {k: v.to(device) for k, v in batch.items()}


def build_case(name: str, batch_size: int, seq_len: int = 128, image_size: int = 224,
               device: str = "cpu", attn: str = "sdpa", seed: int = 0,
               attention_dropout: float | None = None, precision: str = "fp32") -> Case:
    """Build one named case on ``device`` with a fixed random batch.

    Args:
        attn: ``sdpa`` (the default of transformers and timm: fused attention)
            or ``eager`` (stores the attention probabilities).
        attention_dropout: override the attention dropout of the Hugging Face
            cases (BERT's default 0.1 makes SDPA on a CPU fall back to the
            math kernel, which stores the probabilities; 0 runs the flash CPU
            kernel, as flash/memory-efficient attention runs on a GPU).
        precision: ``fp32`` or ``bf16`` (the forward under bf16 autocast).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if name not in CASES:
        raise ValueError(f"unknown case {name!r}; choose one of {', '.join(CASES)}")
    if attn not in ATTN:
        raise ValueError(f"unknown attention {attn!r}; choose one of {', '.join(ATTN)}")
    torch.manual_seed(seed)
    drop = {} if attention_dropout is None else {"attention_probs_dropout_prob": attention_dropout}
    if name in ("bert-base", "minilm", "bert-base-squad"):
        from transformers import (AutoModelForSequenceClassification, BertConfig,
                                  BertForQuestionAnswering, BertForSequenceClassification)
        if name == "bert-base":
            model = BertForSequenceClassification(BertConfig(attn_implementation=attn, **drop))
            desc = "BERT-base (BertConfig(), random init)"
        elif name == "bert-base-squad":  # SQuAD's model: a span (start/end) head per token
            model = BertForQuestionAnswering(BertConfig(attn_implementation=attn, **drop))
            desc = "BERT-base question answering (SQuAD shape, BertConfig(), random init)"
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                minilm_path(), num_labels=2, attn_implementation=attn, **drop)
            desc = "MiniLM-L6 (real pretrained all-MiniLM-L6-v2)"
        desc += f", seq {seq_len}"
    elif name == "vit-b16":
        from transformers import ViTConfig, ViTForImageClassification
        model = ViTForImageClassification(ViTConfig(image_size=image_size, num_labels=1000,
                                                    attn_implementation=attn, **drop))
        desc = f"ViT-B/16 (HF ViTConfig(), random init), {image_size} px"
    else:
        import timm
        model = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=image_size)
        for mod in model.modules():
            if hasattr(mod, "fused_attn"):
                mod.fused_attn = attn == "sdpa"
        desc = f"ViT-B/16 (timm vit_base_patch16_224, random init), {image_size} px"
    p = getattr(getattr(model, "config", None), "attention_probs_dropout_prob", 0.0)
    shown = p or attention_dropout is not None  # the default 0 of ViT goes unsaid
    desc += f", {attn} attention" + (f" (attention dropout {p:g})" if shown else "")
    desc += ", bf16 autocast" if precision == "bf16" else ""
    model.to(device).train()
    case = Case(name, model, {}, desc + f", batch {batch_size}", seq_len, image_size, seed,
                precision)
    case.rebatch(batch_size)
    return case
