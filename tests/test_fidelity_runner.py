"""The fidelity study's runner: every arm is a valid Hydra composition whose
SlimFit options build, run ids are checked, and the report pairs by seed."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from slimfit.experiments import fidelity
from slimfit.experiments.fidelity.__main__ import main
from slimfit.experiments.train import CONFIG_DIR


@pytest.mark.parametrize("arm", sorted(fidelity.ARMS))
def test_every_arm_composes_and_its_slimfit_options_build(arm):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=fidelity_movie", "output_dir=/tmp/unused",
                                          *fidelity.ARMS[arm].overrides])
    if cfg.slimfit.enabled:  # the callback validates every SlimFitConfig field it is given
        options = {k: v for k, v in cfg.slimfit.items() if k not in ("name", "enabled")}
        instantiate(options)
    if arm.startswith("lora"):  # LoRA's method sets 1e-3 (its best); an @lr arm overrides it
        lr = float(arm.partition("@lr")[2] or 1e-3)
        assert cfg.method.name == "lora" and cfg.task.lr == lr


@pytest.mark.parametrize("task", sorted(fidelity.TASKS))
def test_every_task_composes_at_three_epochs(task):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={fidelity.TASKS[task]}", "output_dir=/tmp/unused",
                                          *fidelity.ARMS["slimfit"].overrides])
    assert cfg.trainer.max_epochs == 3 and cfg.trainer.max_steps == -1
    assert cfg.slimfit.freeze_rate == 0.9 and cfg.slimfit.compression.attention == "int8"


def test_trec_is_in_no_group_but_its_own():
    # TREC chose reserve_fraction (by --only runs); the groups that choose the other
    # defaults run on the three study tasks, so those choices stay unseen by it
    policy = set(fidelity.POLICY_TASKS)
    others = set(fidelity.TASKS) - set(fidelity.STUDY_TASKS) - policy
    assert others == {"trec"}
    for name, (tasks, _arms, _seeds) in fidelity.GROUPS.items():
        assert (set(tasks) & others == set()) == (name != "trec"), name
        # the policy study's tasks are its own: no earlier choice saw them
        assert (set(tasks) <= policy) == name.startswith("policies"), name


def test_only_rejects_an_unknown_run_id():
    with pytest.raises(SystemExit, match="unknown run id 'movie/nope/seed0'"):
        main(["--only", "movie/nope/seed0", "--list"])


def _runs(runs, **extra):
    """Recorded runs of the movie task, given as (arm, seed, accuracy)."""
    return [dict(id=f"movie/{a}/seed{s}", task="movie", arm=a, seed=s, val_acc=v, **extra)
            for a, s, v in runs]


def _report(runs):
    return fidelity.report(_runs(runs))


def test_report_pairs_each_arm_with_full_fine_tuning_at_the_same_seed():
    table = _report((("full", 0, 0.80), ("full", 1, 0.90), ("slimfit", 0, 0.79),
                                            ("slimfit", 1, 0.88), ("lora", 1, 0.85)))
    assert "| movie | slimfit | 2 | 83.50 ± 6.36 | -1.50 ± 0.71 (n=2) |" in table
    assert "| movie | lora | 1 | 85.00 ± 0.00 | -5.00 ± 0.00 (n=1) |" in table


def test_a_short_budget_arm_is_paired_with_full_fine_tuning_at_that_budget():
    table = _report((("full", 0, 0.85), ("full-0.2ep", 0, 0.78),
                                            ("slimfit-0.2ep", 0, 0.72)))
    assert "| movie | full-0.2ep | 1 | 78.00 ± 0.00 |  |" in table
    assert "| movie | slimfit-0.2ep | 1 | 72.00 ± 0.00 | -6.00 ± 0.00 (n=1) |" in table
    assert fidelity.reference("slimfit-1ep") == "full-1ep" and fidelity.reference("lora") == "full"


@pytest.mark.parametrize("arm, ref", [
    ("slimfit-0.2ep@topk", "full-0.2ep"), ("slimfit-nowarmup", "full-nowarmup"),
    ("full-nowarmup", "full-nowarmup"), ("slimfit@lr2e-4", "full@lr2e-4"),
    ("slimfit-lrscale1@lr3e-4@fp32-linear@topk", "full@lr3e-4"), ("full@lr5e-5", "full@lr5e-5"),
    ("full-8bit", "full"), ("slimfit-r0.8", "full"), ("slimfit-lrscale1@fp32-linear@topk", "full"),
    ("slimfit-paper-eager@topk", "full")])
def test_each_arm_is_paired_with_full_fine_tuning_under_its_training_setting(arm, ref):
    # budget, schedule and lr are settings of the training, not of SlimFit: a gap
    # across them would charge SlimFit with the setting's own effect
    assert fidelity.reference(arm) == ref and ref in fidelity.ARMS


def test_every_recorded_run_ran_its_arm():
    # a default that changes relabels the runs made before it (old setting made explicit):
    # each recorded run's overrides must compose to the configuration its arm composes to
    # today, or the report would pair a run under an arm it did not run
    runs = {(r["task"], r["arm"], tuple(r["overrides"])) for r in fidelity.load()}
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for task, arm, overrides in sorted(runs):
            assert arm in fidelity.ARMS, f"{task}/{arm}: recorded, but no such arm"
            base = [f"experiment={fidelity.TASKS[task]}", "output_dir=/tmp/unused"]
            ran, now = compose("train", overrides=[*base, *overrides]), \
                compose("train", overrides=[*base, *fidelity.ARMS[arm].overrides])
            assert ran == now, f"{task}/{arm}: recorded overrides {list(overrides)} differ from the arm's"


def test_lr_sweep_pairs_at_the_same_lr_and_names_each_arm_at_its_best():
    runs = _runs((
        ("full", 0, 0.85), ("full", 1, 0.87), ("full@lr2e-4", 0, 0.84), ("full@lr2e-4", 1, 0.86),
        ("slimfit", 0, 0.83), ("slimfit", 1, 0.85), ("slimfit@lr2e-4", 0, 0.86),
        ("slimfit-lrscale1@lr3e-4@fp32-linear", 0, 0.10)))  # not a family's lr variant: not in the sweep
    table = fidelity.lr_sweep(runs)
    assert "| 1e-4 (default) | 86.00 ± 1.41 (n=2) | 84.00 ± 1.41 (n=2) | -2.00 ± 0.00 (n=2) |" in table
    assert "| 2e-4 | 85.00 ± 1.41 (n=2) | 86.00 ± 0.00 (n=1) | +2.00 ± 0.00 (n=1) |" in table
    # each at its best: full at 1e-4 (86.00), slimfit at 2e-4 (86.00), paired on seed 0: 86 - 85
    assert "full 86.00 at 1e-4; slimfit 86.00 at 2e-4" in table
    assert "slimfit - full, each at its best, paired: +1.00 ± 0.00 (n=1)" in table


def test_lr_sweep_ranks_lrs_on_the_seeds_they_share():
    # 2e-4's one seed is the weaker one at 1e-4 too: on seed 0, 2e-4 wins (84 > 83),
    # though 1e-4's mean over both seeds (85) is higher
    runs = _runs((("full", 0, 0.83), ("full", 1, 0.87), ("full@lr2e-4", 0, 0.84)))
    assert "full 84.00 at 2e-4" in fidelity.lr_sweep(runs)


def test_lr_sweep_is_empty_without_an_lr_arm():
    assert fidelity.lr_sweep(_runs((("full", 0, 0.85), ("slimfit", 0, 0.84)))) == ""


def test_lr_sweep_places_each_plain_arm_at_its_own_default_lr():
    # LoRA's method file sets 1e-3: its plain arm is the 1e-3 row, not the task's 1e-4
    table = fidelity.lr_sweep(_runs((
        ("full", 0, 0.85), ("full@lr2e-4", 0, 0.84), ("lora", 0, 0.86),
        ("lora@lr2e-4", 0, 0.83), ("lora@lr5e-4", 0, 0.84))))
    assert "| 1e-4 (default) | 85.00 ± 0.00 (n=1) |  |  |" in table
    assert "| 2e-4 | 84.00 ± 0.00 (n=1) | 83.00 ± 0.00 (n=1) | -1.00 ± 0.00 (n=1) |" in table
    assert "| 5e-4 |  | 84.00 ± 0.00 (n=1) |  |" in table
    assert "| 1e-3 (lora default) |  | 86.00 ± 0.00 (n=1) |  |" in table
    assert "lora 86.00 at 1e-3" in table
    assert "lora - full, each at its best, paired: +1.00 ± 0.00 (n=1)" in table


def test_the_frontier_draws_the_default_setting_only():
    # a short budget, another schedule or another peak lr is not on the default frontier,
    # LoRA's 5e-4 included (no full fine-tuning run at 5e-4: reference() alone would keep it)
    arms = ("full", "slimfit", "lora", "lora@lr5e-4", "slimfit@lr2e-4", "full-0.2ep",
            "slimfit-nowarmup", "slimfit-topk")
    runs = _runs([(a, 0, 0.8) for a in arms], memory_total=1.0)
    drawn = {r["arm"] for r in fidelity.frontier_runs(runs, "movie")}
    assert drawn == {"full", "slimfit", "lora", "slimfit-topk"}
