"""The smallest complete Hugging Face Trainer script with SlimFit: the real
pretrained MiniLM as a causal language model (``BertLMHeadModel`` with
``is_decoder=True``, the one pretrained LM that loads offline; its LM head is
new) on movie-review sentences, 90% of its weight tensors frozen each
optimizer step, activations compressed, gradient accumulation 2, the memory
report every 10 steps in the Trainer's logs.

    python -m slimfit.experiments.example_trainer [--steps 20] [--out runs/example_trainer]

With ``torchrun --nproc_per_node 2`` the same script runs under DDP (every
rank freezes rank 0's choice). For a Llama-style model, add
``chunked_loss=True``: the LM head's loss is then computed in chunks, never
keeping the (tokens x vocab) logits.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoTokenizer, BertLMHeadModel, Trainer, TrainingArguments  # noqa: E402

from slimfit.callbacks.transformers import SlimFitTrainerCallback  # noqa: E402
from slimfit.experiments.data import load_text_task  # noqa: E402
from slimfit.experiments.zoo import minilm_path  # noqa: E402


class Sentences(torch.utils.data.Dataset):
    def __init__(self, texts, tokenizer, max_len=32):
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len,
                        return_tensors="pt")
        self.ids, self.mask = enc["input_ids"], enc["attention_mask"]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)  # no loss on padding
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels}


def main(argv=None) -> SlimFitTrainerCallback:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="runs/example_trainer")
    args = ap.parse_args(argv)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    model = BertLMHeadModel.from_pretrained(minilm_path(), is_decoder=True)
    texts = load_text_task("movie_reviews", n_train=args.steps * 16).train_x
    slimfit = SlimFitTrainerCallback(0.9, compression=True, memory_every_n_steps=10)  # <- SlimFit
    trainer = Trainer(
        model=model, train_dataset=Sentences(texts, tok), callbacks=[slimfit],
        args=TrainingArguments(output_dir=args.out, per_device_train_batch_size=8,
                               gradient_accumulation_steps=2, max_steps=args.steps,
                               learning_rate=1e-4, logging_steps=5, report_to=[], use_cpu=True,
                               save_strategy="no", disable_tqdm=True))
    trainer.train()
    print(slimfit.freezer.summary(top=8))
    return slimfit


if __name__ == "__main__":
    main()
