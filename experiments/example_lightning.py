"""The smallest complete Lightning script with SlimFit: the real pretrained
MiniLM fine-tuned for a few steps on movie-review sentences, 90% of its weight
tensors frozen each step, memory measured every 5 steps.

    python experiments/example_lightning.py
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from slimfit.experiments.zoo import minilm_path  # noqa: E402
from slimfit.callbacks import MemoryMonitor, SlimFit  # noqa: E402
from slimfit.experiments.data import load_text_task  # noqa: E402


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)

    def training_step(self, batch, _):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def main(steps: int = 10):
    tok = AutoTokenizer.from_pretrained(minilm_path())
    data = load_text_task("movie_reviews", n_train=steps * 16)
    texts, labels = data.train_x, data.train_y
    enc = tok(texts, padding="max_length", truncation=True, max_length=48, return_tensors="pt")
    data = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
             "labels": torch.tensor(labels[i])} for i in range(len(labels))]
    slimfit = SlimFit(freeze_rate=0.9)  # <- the one line SlimFit adds
    trainer = pl.Trainer(max_steps=steps, accelerator="auto", logger=False,
                         enable_checkpointing=False, default_root_dir="runs/example",
                         callbacks=[slimfit, MemoryMonitor(every_n_steps=5, depth=4)])
    trainer.fit(Classifier(), torch.utils.data.DataLoader(data, batch_size=16, shuffle=True))
    print(slimfit.freezer.summary(top=10))


if __name__ == "__main__":
    main()
