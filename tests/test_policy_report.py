"""The policy study's report (experiments/fidelity/policies.py) on hand-made
runs: gaps are paired by seed, the interval has tasks as its units, choices
and reports read the split they say."""

import statistics

import pytest

from slimfit.experiments.fidelity import policies


def run(task, arm, seed, val, test, mem=100 * 2**20):
    return {"task": task, "arm": arm, "seed": seed, "val_acc": val, "test_acc": test,
            "memory_total": mem}


RUNS = [
    run("movie2k", "full", 0, 0.80, 0.80), run("movie2k", "full", 1, 0.82, 0.78),
    run("movie2k", "lisa", 0, 0.78, 0.77), run("movie2k", "lisa", 1, 0.80, 0.77),
    run("movie2k", "lisa", 2, 0.10, 0.10),  # no full at seed 2: never paired
    run("trec50", "full", 0, 0.70, 0.72), run("trec50", "lisa", 0, 0.69, 0.68),
    run("tweets", "full", 0, 0.60, 0.62), run("tweets", "lisa", 0, 0.61, 0.63),
    run("tweets", "badam", 0, 0.50, 0.50),
    run("movie", "lisa", 0, 0.0, 0.0),  # the first study's task: not this report's
    {**run("trec50", "badam", 0, 0.1, 0.1), "test_acc": None},  # no test split recorded
]


def test_gaps_are_paired_by_seed_and_read_the_split_asked():
    def rounded(gaps):
        return {t: [round(g, 6) for g in v] for t, v in gaps.items()}
    assert rounded(policies.paired_gaps(RUNS, "lisa")) == {
        "movie2k": [-3.0, -1.0], "trec50": [-4.0], "tweets": [1.0]}
    assert rounded(policies.paired_gaps(RUNS, "lisa", "val")) == {
        "movie2k": [-2.0, -2.0], "trec50": [-1.0], "tweets": [1.0]}


def test_the_interval_has_tasks_as_units():
    s = policies.arm_summary(RUNS, "lisa")
    per_task = [-2.0, -4.0, 1.0]  # movie2k's two seeds averaged first
    assert s["tasks"] == pytest.approx(dict(zip(("movie2k", "trec50", "tweets"), per_task)))
    assert s["mean"] == pytest.approx(statistics.mean(per_task))
    assert s["half_width"] == pytest.approx(4.303 * statistics.stdev(per_task) / 3 ** 0.5)
    assert s["seeds"] == {"movie2k": 2, "trec50": 1, "tweets": 1}


def test_one_task_gives_no_interval_and_the_report_says_so():
    s = policies.arm_summary(RUNS, "badam")
    assert s["tasks"] == pytest.approx({"tweets": -12.0}) and s["half_width"] is None
    text = policies.report(RUNS)
    assert "| badam | tweets (1) | -10.00 | -12.00 (one task: no interval) |" in text
    assert "| movie |" not in text


def test_no_policy_runs_no_report():
    assert policies.report([run("movie", "full", 0, 0.8, 0.8)]) == ""


def test_family_is_the_method_an_arm_sets():
    assert [policies.family(a) for a in ("lisa-lrx-k5", "lora@lr2e-3", "slimfit-release",
                                         "badam")] == ["lisa", "lora", "slimfit", "badam"]


TASKS = ("movie2k", "trec50", "tweets")
CHOICE_RUNS = [run(t, "full", s, 0.80, 0.80) for t in TASKS for s in (0, 1)]
CHOICE_RUNS += [
    # lisa: the better test gap but the worse validation gap: validation chooses
    *(run(t, "lisa", 0, 0.70, 0.79) for t in TASKS),
    *(run(t, "lisa-lrx-k5", 0, 0.78, 0.60) for t in TASKS),
    # a second seed of lisa-lrx-k5 only: not shared, so not compared (it would lose)
    *(run(t, "lisa-lrx-k5", 1, 0.10, 0.10) for t in TASKS),
    # only two tasks: not a candidate however good
    *(run(t, "lisa-k50", 0, 0.99, 0.99) for t in ("movie2k", "trec50")),
    # released state: the state table's question, never the family's choice
    *(run(t, "lisa-release", 0, 0.95, 0.95, mem=40 * 2**20) for t in TASKS),
]


def test_validation_chooses_each_family_on_shared_seeds():
    c = policies.choices(CHOICE_RUNS)
    assert list(c) == ["lisa"]
    assert c["lisa"]["arm"] == "lisa-lrx-k5"
    assert c["lisa"]["candidates"] == ["lisa", "lisa-lrx-k5"]
    assert c["lisa"]["val"] == pytest.approx(-2.0)  # seed 0 only, shared by both
    # the family then reports its chosen arm's test gap over all of its seeds
    assert c["lisa"]["test"]["mean"] == pytest.approx(statistics.mean([-20.0, -70.0]))


def test_released_state_is_paired_with_its_kept_twin():
    e = policies.state_effect(CHOICE_RUNS, "lisa-release")
    assert e["kept"] == "lisa" and e["seeds"] == {"movie2k": 1, "trec50": 1, "tweets": 1}
    assert e["mean"] == pytest.approx(16.0) and e["half_width"] == pytest.approx(0.0)
    assert e["memory"] == {"lisa-release": 40 * 2**20, "lisa": 100 * 2**20}
    assert "| lisa-release - lisa | movie2k (1), trec50 (1), tweets (1) | +25.00 | +16.00" \
        in policies.report(CHOICE_RUNS)
