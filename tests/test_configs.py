"""Hydra configs: every group composes, every experiment runs one step
(fast_dev_run) offline, and bad names fail with the valid choices."""

import json
import pathlib
import time

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from slimfit.experiments import report
from slimfit.experiments.train import CONFIG_DIR, run

CONFIGS = pathlib.Path(CONFIG_DIR)
GROUPS = ["model", "data", "task", "slimfit", "trainer", "logger", "callbacks"]
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


@pytest.fixture
def hydra_ctx():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        yield


def make_glue_fixture(root: pathlib.Path) -> pathlib.Path:
    """A few SST-2 lines in GLUE's own tsv format."""
    d = root / "SST-2"
    d.mkdir(parents=True)
    rows = ["a gripping , funny film\t1", "dull and lifeless\t0", "a joy to watch\t1",
            "the worst movie of the year\t0"] * 8
    for split in ("train", "dev"):
        (d / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return d


def make_image_folder(root: pathlib.Path) -> pathlib.Path:
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            d = root / "imgs" / split / c
            d.mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root / "imgs"


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_composes(hydra_ctx, group, tmp_path):
    for option in sorted(p.stem for p in (CONFIGS / group).glob("*.yaml")):
        over = [f"{group}={option}", f"output_dir={tmp_path}"]
        if option == "imagefolder":
            over += ["data.data_dir=/nonexistent", "data.num_labels=2"]
        cfg = compose("train", overrides=over)
        node = cfg[group]
        OmegaConf.to_container(node, resolve=True)  # every interpolation resolves
        entries = node.values() if group in ("logger", "callbacks") else [node]
        for e in entries:
            assert "_target_" in e, f"{group}/{option} has no _target_"


EXTRA = {
    "glue_sst2_slimfit": lambda tmp: [f"data.data_dir={make_glue_fixture(tmp)}", "data.max_len=16"],
    "imagefolder_vit_slimfit": lambda tmp: [f"data.data_dir={make_image_folder(tmp)}",
                                            "data.num_labels=2", "data.image_size=32",
                                            "model=vit_tiny", "data.batch_size=4"],
    "bert_base_memory": lambda tmp: ["model=bert_tiny", "data.max_len=16"],
    # the planner on the real MiniLM calibrates for ~70 s here; test_planner covers it
    "movie_budget": lambda tmp: ["model=bert_tiny"],
    # the study's data and settings; the real MiniLM is loaded by the demo and movie_* here
    **{f"fidelity_{t}": (lambda tmp: ["model=bert_tiny"]) for t in ("bbc", "movie", "sms", "trec")},
}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_one_step(hydra_ctx, experiment, tmp_path):
    lm = experiment == "causal_lm"  # next-token prediction: blocks of text, a validation loss
    over = [f"experiment={experiment}", "trainer.fast_dev_run=true", f"output_dir={tmp_path}",
            "trainer.enable_progress_bar=false", "data.n_val=32", "data.eval_batch_size=32",
            *(["data.max_blocks=16", "data.seq_len=32"] if lm else ["data.n_train=64"]),
            *EXTRA.get(experiment, lambda _t: [])(tmp_path)]
    if experiment.startswith(("movie", "sms", "trec", "bbc", "policy", "demo")):
        over.append("data.max_len=16")
    cfg = compose("train", overrides=over)
    res = run(cfg)
    assert res["steps"] == 1 and res["val_loss" if lm else "val_acc"] is not None
    assert res["memory"]["total"] > 0
    assert json.loads((tmp_path / "results.json").read_text())["method"] == res["method"]


def test_csv_and_wandb_loggers_receive_memory_and_heatmap(hydra_ctx, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = compose("train", overrides=[
        "experiment=movie_slimfit", "model=bert_tiny", "logger=wandb", "trainer.max_steps=3",
        "trainer.enable_progress_bar=false", "data.n_train=96", "data.n_val=32",
        "data.max_len=16", "callbacks.memory_monitor.every_n_steps=2", f"output_dir={tmp_path}"])
    run(cfg)
    import wandb
    wandb.finish()
    runs = list(tmp_path.rglob("offline-run-*"))
    assert runs, "no offline W&B run written"
    keys = (b"memory/activations", b"slimfit/frozen_fraction", b"final/val_acc",
            b"slimfit/freeze_heatmap")
    # W&B's service process may still be writing the file on a loaded machine: wait for it
    deadline = time.monotonic() + 60
    while True:
        history = b"".join(p.read_bytes() for p in runs[0].rglob("*.wandb"))
        if all(k in history for k in keys) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for key in keys:
        assert key in history, key


def test_sweep_report_table_and_plots(hydra_ctx, tmp_path):
    for rate in (0.0, 0.9):
        for seed in (0, 1):
            cfg = compose("train", overrides=[
                "experiment=movie_slimfit", "model=bert_tiny", f"slimfit.freeze_rate={rate}",
                f"seed={seed}", "trainer.max_steps=2", "trainer.enable_progress_bar=false",
                "data.n_train=64", "data.n_val=32", "data.max_len=16",
                "callbacks.memory_monitor.every_n_steps=1",
                f"output_dir={tmp_path}/runs/r{rate}-s{seed}"])
            run(cfg)
    table = report.main([str(tmp_path / "runs")])
    assert "SlimFit r=0.9" in table and "SlimFit r=0" in table and "x smaller" in table
    assert (tmp_path / "runs" / "results.md").exists()
    assert (tmp_path / "runs" / "accuracy_vs_memory.png").read_bytes()[:4] == b"\x89PNG"


# -- bad input -----------------------------------------------------------------------

def test_unknown_experiment_and_model_names_list_choices(hydra_ctx):
    with pytest.raises(MissingConfigException, match="movie_slimfit"):
        compose("train", overrides=["experiment=nope"])
    with pytest.raises(MissingConfigException, match="minilm"):
        compose("train", overrides=["model=gpt9"])


def test_unknown_glue_task_and_missing_path(hydra_ctx, tmp_path):
    cfg = compose("train", overrides=["data=glue", "data.task=squad", f"output_dir={tmp_path}"])
    with pytest.raises(Exception, match="GLUE classification tasks are|unknown glue task 'squad'"):
        instantiate(cfg.data)
    cfg = compose("train", overrides=["data=imagefolder", "data.data_dir=/does/not/exist",
                                      "data.num_labels=2", f"output_dir={tmp_path}"])
    dm = instantiate(cfg.data)
    with pytest.raises(FileNotFoundError, match="/does/not/exist"):
        dm.setup("fit")


def test_report_on_missing_folder():
    with pytest.raises(FileNotFoundError, match="no such folder"):
        report.main(["/nonexistent/runs"])
