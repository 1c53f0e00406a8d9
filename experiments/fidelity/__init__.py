"""The fidelity study (issue 12): SlimFit and its peers against full
fine-tuning at the paper's budget, run one training at a time and resumable.

    python -m slimfit.experiments.fidelity --list                # what would run
    python -m slimfit.experiments.fidelity --groups core         # core comparison
    OMP_NUM_THREADS=1 nohup python -m slimfit.experiments.fidelity --groups core &
    python -m slimfit.experiments.fidelity --report              # paired gaps, lr sweep
    python -m slimfit.experiments.fidelity --evidence            # the library's figures

Groups (``arms.GROUPS``): ``core`` (full fine-tuning vs SlimFit r=0.9 +
compression, three tasks x seeds 0-2; ``core0``: seed 0 only), ``ablation``
(head, score, staleness, schedule, selection on the movie task; ``ablation0``:
seed 0), ``lr`` (peak learning rates of full fine-tuning, SlimFit and LoRA),
``rate`` (r in 0.5/0.8/0.95), ``short`` (0.2 and 1 epoch), ``peers`` (LoRA
and 8-bit AdamW on the movie task), ``trec`` (full fine-tuning vs the
defaults on TREC questions). Each run records the code version it ran
(``FIDELITY_CODE``, set by whoever starts the study from a snapshot). A
short-budget arm, and one without warm-up or at another peak lr, is paired
with full fine-tuning under the same setting (``arms.reference``).

Modules: ``arms`` (the design), ``runner`` (the queue and one run),
``report`` (tables and plot), ``evidence`` (the figures the library reads).
"""

from slimfit.experiments.fidelity.arms import (ABLATIONS, ARMS, GROUPS, POLICY_TASKS, SEEDS,
                                               SHARED_SETTINGS, STUDY_TASKS, TASKS, reference,
                                               setting)
from slimfit.experiments.fidelity.report import frontier_runs, lr_sweep, plot, report
from slimfit.experiments.fidelity.runner import RESULTS, RUNS, load, queue, run_one

__all__ = ["ABLATIONS", "ARMS", "GROUPS", "POLICY_TASKS", "RESULTS", "RUNS", "SEEDS",
           "SHARED_SETTINGS",
           "STUDY_TASKS", "TASKS", "frontier_runs", "load", "lr_sweep", "plot", "queue", "reference",
           "report", "run_one", "setting"]
