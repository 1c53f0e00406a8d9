"""The causal-LM task of the Hydra entry point (``task=causal_lm
data=lm_text``): next-token prediction on real offline text, the model's
own loss from ``labels`` (so SlimFit's chunked LM loss applies).

No pretrained decoder installs offline: the model configs at Llama-3.2-1B,
Qwen2.5-1.5B and GPT-2 shapes are random-init (memory does not depend on
the weights); a loss curve that means something needs the pretrained MiniLM
as a causal LM (``model=minilm_lm``: ``BertLMHeadModel``, ``is_decoder``).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from slimfit.experiments import data as D
from slimfit.experiments.tasks import ClassificationTask
from slimfit.experiments.zoo import minilm_path

__all__ = ["CausalLMTask", "LMTextData", "minilm_lm"]


class CausalLMTask(ClassificationTask):
    """Next-token prediction with the model's own loss (``model(**batch).loss``);
    the optimizer and schedule are :class:`ClassificationTask`'s. Validation
    reports the mean loss (``val/loss``)."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self._losses: list[float] = []
        self.last_val_loss: float | None = None

    def training_step(self, batch, _idx):
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def validation_step(self, batch, _idx):
        self._losses.append(float(self.model(**batch).loss))

    def on_validation_epoch_end(self):
        if self._losses:
            self.last_val_loss = sum(self._losses) / len(self._losses)
            self.log("val/loss", self.last_val_loss, prog_bar=True)
        self._losses = []

    test_step = validation_step

    def on_test_epoch_end(self):
        self._losses = []


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


class LMTextData(pl.LightningDataModule):
    """A text task's sentences (:mod:`slimfit.experiments.data`) tokenized,
    joined with the separator token and cut into blocks of ``seq_len`` tokens.

    Args:
        corpus: a text task whose texts are used (``movie_reviews``, ``tweets`` ...).
        seq_len: tokens per block; ``n_val``: validation sentences (the task's
            fixed split); ``max_blocks``: at most this many training blocks.
    """

    def __init__(self, corpus: str = "movie_reviews", tokenizer: str = "minilm", seq_len: int = 128,
                 batch_size: int = 8, eval_batch_size: int = 16, n_val: int = 500,
                 max_blocks: int | None = None, seed: int = 0):
        super().__init__()
        if corpus not in D.TEXT_TASKS:
            raise ValueError(f"unknown corpus {corpus!r}; choose one of {D.TEXT_TASKS}.")
        self.corpus, self.tokenizer, self.seq_len = corpus, tokenizer, seq_len
        self.batch_size, self.eval_batch_size, self.n_val = batch_size, eval_batch_size, n_val
        self.max_blocks, self.seed = max_blocks, seed
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None):
        if self.train_set is not None:
            return
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(minilm_path() if self.tokenizer == "minilm"
                                            else self.tokenizer)
        s = D.load_text_task(self.corpus, n_val=self.n_val)
        self.train_set = _Blocks(self._blocks(tok, s.train_x, self.max_blocks))
        self.val_set = _Blocks(self._blocks(tok, s.val_x, None))

    def _blocks(self, tok, texts, limit):
        ids = tok(list(texts), add_special_tokens=False)["input_ids"]
        sep = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        flat = torch.tensor([t for row in ids for t in [*row, sep]])
        n = len(flat) // self.seq_len
        blocks = flat[: n * self.seq_len].view(n, self.seq_len)
        return blocks[:limit] if limit else blocks

    def train_dataloader(self):
        g = torch.Generator().manual_seed(self.seed)
        return torch.utils.data.DataLoader(self.train_set, batch_size=self.batch_size,
                                           shuffle=True, generator=g, drop_last=True)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.val_set, batch_size=self.eval_batch_size)


def minilm_lm():
    """The pretrained MiniLM as a causal language model (its LM head is new)."""
    from transformers import BertLMHeadModel
    return BertLMHeadModel.from_pretrained(minilm_path(), is_decoder=True).train()
