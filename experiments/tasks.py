"""Lightning modules for the experiments: one classification task module for
text and images (model injected, lightning-hydra-template style) and one data
module over :mod:`slimfit.experiments.data`. The models come from
:mod:`slimfit.experiments.zoo`.
"""

from __future__ import annotations

import functools
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from slimfit.experiments import data as D
from slimfit.experiments.zoo import minilm_path
from slimfit.experiments.runs import OPTIMIZERS, build_optimizer

__all__ = ["ClassificationTask", "ClassificationData"]


def _logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs)
    return out if torch.is_tensor(out) else out.logits


# ----------------------------------------------------------------------------
# Task module
# ----------------------------------------------------------------------------


class ClassificationTask(pl.LightningModule):
    """Cross-entropy classification of an injected model.

    Args:
        model: HF classifier or timm wrapper; returns logits (or ``.logits``).
        lr: peak AdamW learning rate; weight_decay on weights, not on biases or
            normalisation weights.
        warmup_fraction: linear warm-up over this fraction of the steps, then
            linear decay to zero at ``trainer.max_steps``.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-4, weight_decay: float = 0.01,
                 warmup_fraction: float = 0.1, optimizer: str = "adamw"):
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {OPTIMIZERS}.")
        self.model = model
        self.lr, self.weight_decay, self.warmup_fraction = lr, weight_decay, warmup_fraction
        self.optimizer_name = optimizer
        self._correct = self._seen = 0
        self.last_val_acc: float | None = None
        self.last_test_acc: float | None = None

    def training_step(self, batch, _idx):
        loss = nn.functional.cross_entropy(_logits(self.model, batch), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def validation_step(self, batch, _idx):
        pred = _logits(self.model, batch).argmax(-1)
        self._correct += int((pred == batch["labels"]).sum())
        self._seen += len(batch["labels"])

    def on_validation_epoch_end(self):
        if self._seen:
            self.last_val_acc = self._correct / self._seen
            self.log("val/acc", self.last_val_acc, prog_bar=True)
        self._correct = self._seen = 0

    # the test split: reported, never used to choose a setting
    test_step = validation_step

    def on_test_epoch_end(self):
        if self._seen:
            self.last_test_acc = self._correct / self._seen
            self.log("test/acc", self.last_test_acc)
        self._correct = self._seen = 0

    def configure_optimizers(self):
        decay, no_decay = [], []
        for n, p in self.named_parameters():
            (no_decay if p.dim() < 2 else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        # parameters a method froze for good (LoRA's base) get no gradient: no state either
        opt = build_optimizer(self.optimizer_name, groups, self.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = max(1, int(self.warmup_fraction * total))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, functools.partial(_warmup_linear, warm=warm, total=total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _warmup_linear(step: int, warm: int, total: int) -> float:
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))


# ----------------------------------------------------------------------------
# Data module
# ----------------------------------------------------------------------------


class _DictDataset(torch.utils.data.Dataset):
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.n = len(next(iter(tensors.values())))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.tensors.items()}


class ClassificationData(pl.LightningDataModule):
    """Text or image classification data for one task.

    Args:
        kind: ``text`` (offline text tasks), ``glue`` or ``image``.
        task: task name (see :mod:`slimfit.experiments.data`).
        num_labels: expected classes (checked against the data).
        tokenizer: tokenizer path (``minilm`` = packaged MiniLM) for text.
        n_test: test examples after the validation ones (0: none), reported by
            ``trainer.test`` and never used to choose a setting.
        max_len: fixed padded length (memory comparable across runs).
        image_size: images are resized to this square size.
        data_dir: GLUE files folder or image folder root.
    """

    def __init__(self, kind: str, task: str, num_labels: int, batch_size: int = 32,
                 eval_batch_size: int = 128, n_train: int | None = None, n_val: int = 500,
                 n_test: int = 0, tokenizer: str = "minilm", max_len: int = 64,
                 image_size: int = 32,
                 data_dir: str | None = None, seed: int = 0, num_workers: int = 0):
        super().__init__()
        if kind not in ("text", "glue", "image"):
            raise ValueError(f"unknown data kind {kind!r}; choose text, glue or image.")
        self.kind, self.task, self.num_labels = kind, task, num_labels
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.n_train, self.n_val, self.n_test = n_train, n_val, n_test
        self.tokenizer, self.max_len, self.image_size = tokenizer, max_len, image_size
        self.data_dir, self.seed, self.num_workers = data_dir, seed, num_workers
        self.splits: D.Splits | None = None
        # validate names before any training starts
        valid = {"text": D.TEXT_TASKS, "glue": tuple(D.GLUE_TASKS), "image": D.IMAGE_TASKS}[kind]
        if task not in valid:
            raise ValueError(f"unknown {kind} task {task!r}; choose one of {valid}.")

    def setup(self, stage: str | None = None):
        if self.splits is not None:
            return
        if self.kind == "text":
            s = D.load_text_task(self.task, n_val=self.n_val, n_train=self.n_train,
                                 n_test=self.n_test)
        elif self.kind == "glue":
            s = D.load_glue(self.task, self.data_dir, n_train=self.n_train, n_val=self.n_val)
        else:
            s = D.load_image_task(self.task, root=self.data_dir, n_val=self.n_val, n_train=self.n_train)
        if s.num_labels != self.num_labels:
            raise ValueError(f"task {self.task!r} has {s.num_labels} classes but num_labels="
                             f"{self.num_labels}; set data.num_labels={s.num_labels}.")
        self.splits = s
        if self.kind == "image":
            self.train_set = self._images(s.train_x, s.train_y)
            self.val_set = self._images(s.val_x, s.val_y)
        else:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(minilm_path() if self.tokenizer == "minilm"
                                                else self.tokenizer)
            self.train_set = self._texts(tok, s.train_x, s.train_y, s.pairs)
            self.val_set = self._texts(tok, s.val_x, s.val_y, s.pairs)
            self.test_set = self._texts(tok, s.test_x, s.test_y, s.pairs) if s.test_y else None

    def _texts(self, tok, xs, ys, pairs):
        enc = D.tokenize(tok, xs, self.max_len, pairs)
        return _DictDataset({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                             "labels": torch.tensor(ys)})

    def _images(self, xs, ys):
        x = nn.functional.interpolate(xs, size=(self.image_size, self.image_size), mode="bilinear",
                                      align_corners=False)
        x = (x - 0.5) / 0.5
        return _DictDataset({"pixel_values": x, "labels": torch.tensor(ys)})

    def train_dataloader(self):
        g = torch.Generator().manual_seed(self.seed)
        return torch.utils.data.DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True,
                                           generator=g, num_workers=self.num_workers, drop_last=True)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.val_set, batch_size=self.eval_batch_size,
                                           num_workers=self.num_workers)

    def test_dataloader(self):
        if getattr(self, "test_set", None) is None:
            raise ValueError(f"task {self.task!r} has no test split: set data.n_test > 0.")
        return torch.utils.data.DataLoader(self.test_set, batch_size=self.eval_batch_size,
                                           num_workers=self.num_workers)
