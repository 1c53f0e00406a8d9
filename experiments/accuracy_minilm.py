"""Accuracy sanity check: the real pretrained MiniLM fine-tuned on the
movie-review sentences, full fine-tuning vs SlimFit, same steps, several seeds.

Example (the figures in the README):
    python experiments/accuracy_minilm.py --seeds 0 1 2 --steps 60 --freeze-rate 0.9

Each run: AdamW (lr 1e-4, weight decay 0.01, linear warm-up over 10% of the
steps then linear decay), batch 32, max length 64, fixed train/validation
split (``data.load_text_task('movie_reviews')``), validation accuracy on 500 held-out
sentences after the last step. Runs through Lightning with the real
``SlimFit`` callback, as a user would.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from slimfit.experiments.bench_cases import minilm_path  # noqa: E402
from slimfit.callbacks import SlimFit  # noqa: E402
from slimfit.experiments.data import load_text_task  # noqa: E402


class TextClassifier(pl.LightningModule):
    def __init__(self, lr: float, total_steps: int, warmup_frac: float = 0.1):
        super().__init__()
        self.model = AutoModelForSequenceClassification.from_pretrained(
            minilm_path(), num_labels=2, attn_implementation="eager").train()  # dropout on
        self.lr, self.total_steps, self.warmup = lr, total_steps, max(1, int(warmup_frac * total_steps))

    def training_step(self, batch, _):
        return self.model(**batch).loss

    @torch.no_grad()
    def accuracy(self, loader) -> tuple[float, int]:
        self.model.eval()
        correct = seen = 0
        for batch in loader:
            logits = self.model(input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"]).logits
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            seen += len(batch["labels"])
        return correct / seen, seen

    def configure_optimizers(self):
        no_decay = ("bias", "LayerNorm.weight")
        groups = [
            {"params": [p for n, p in self.named_parameters() if not n.endswith(no_decay)],
             "weight_decay": 0.01},
            {"params": [p for n, p in self.named_parameters() if n.endswith(no_decay)],
             "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=self.lr)
        w, t = self.warmup, self.total_steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / w if s < w else max(0.0, (t - s) / max(1, t - w)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loaders(tok, batch_size: int, max_len: int, n_train: int, n_val: int, seed: int):
    data = load_text_task("movie_reviews", n_val=n_val, n_train=n_train)

    def ds(split):
        texts, labels = (data.train_x, data.train_y) if split == "train" else (data.val_x, data.val_y)
        enc = tok(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
        return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                 "labels": torch.tensor(labels[i])} for i in range(len(labels))]

    g = torch.Generator().manual_seed(seed)
    train = torch.utils.data.DataLoader(ds("train"), batch_size=batch_size, shuffle=True, generator=g)
    val = torch.utils.data.DataLoader(ds("val"), batch_size=128)
    return train, val


def run(method: str, seed: int, args) -> dict:
    pl.seed_everything(seed, workers=True, verbose=False)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    train, val = loaders(tok, args.batch_size, args.max_len, args.n_train, args.n_val, seed)
    module = TextClassifier(args.lr, args.steps)
    callbacks = [SlimFit(freeze_rate=args.freeze_rate, seed=seed, always_train=args.always_train,
                         max_frozen_age=args.max_frozen_age, compression=args.compress,
                         lr_normalized=args.lr_normalized)
                 ] if method == "slimfit" else []
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         enable_progress_bar=False, callbacks=callbacks,
                         default_root_dir=args.out)
    t0 = time.perf_counter()
    trainer.fit(module, train)
    fit_s = time.perf_counter() - t0
    acc, seen = module.accuracy(val)
    print(f"{method:8s} seed {seed}: val acc {acc:.4f} ({seen} sentences), fit {fit_s:.1f} s",
          flush=True)
    return {"method": method, "seed": seed, "val_acc": acc, "fit_seconds": fit_s}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--n-val", type=int, default=500)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--freeze-rate", type=float, default=0.9)
    ap.add_argument("--always-train", nargs="*", default=None,
                    help="parameter names SlimFit never freezes, e.g. classifier.weight")
    ap.add_argument("--max-frozen-age", type=int, default=None)
    ap.add_argument("--lr-normalized", action="store_true")
    ap.add_argument("--compress", action="store_true", help="SlimFit with activation compression")
    ap.add_argument("--methods", nargs="+", default=["full", "slimfit"], choices=["full", "slimfit"])
    ap.add_argument("--out", default="runs/accuracy_minilm")
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)

    results = [run(m, s, args) for s in args.seeds for m in args.methods]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "runs": results}, indent=2))
    print(f"\nMiniLM-L6 (pretrained) on movie-review sentences: {args.steps} steps x batch "
          f"{args.batch_size}, max len {args.max_len}, {args.n_val} validation sentences, "
          f"seeds {args.seeds}\n")
    print("| method | val accuracy mean | std | min | max | mean fit time |")
    print("|---|---:|---:|---:|---:|---:|")
    for m in args.methods:
        accs = [r["val_acc"] for r in results if r["method"] == m]
        secs = [r["fit_seconds"] for r in results if r["method"] == m]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        label = "full fine-tuning" if m == "full" else (
            f"SlimFit r={args.freeze_rate}" + (" + compression" if args.compress else "")
            + (f", always train {args.always_train}" if args.always_train else "")
            + (f", max frozen age {args.max_frozen_age}" if args.max_frozen_age else "")
            + (", lr-normalized scores" if args.lr_normalized else ""))
        print(f"| {label} | {100 * statistics.mean(accs):.2f} | {100 * sd:.2f} | "
              f"{100 * min(accs):.2f} | {100 * max(accs):.2f} | {statistics.mean(secs):.1f} s |")


if __name__ == "__main__":
    main()
