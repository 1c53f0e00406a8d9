"""`make demo`: fine-tune the real pretrained MiniLM on the movie-review
sentences three ways (full fine-tuning, SlimFit r=0.9, SlimFit r=0.9 with
activation compression), all with SDPA attention as transformers loads the
model, plus full fine-tuning with eager attention as a secondary row, and
print the comparison table.

    python -m slimfit.experiments.demo [--steps 60] [--out runs/demo]

Each run: batch 32, max length 64, 500 held-out validation sentences, seed 0,
AdamW with warm-up and linear decay, on the CPU (about 1.5 minutes a run on 2
cores). Memory is the ledger's count of one measured training step; step time
is the median over the run. Writes ``results.md`` and plots under ``--out``.
"""

from __future__ import annotations

import argparse
import pathlib

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from slimfit.experiments import report
from slimfit.experiments.train import CONFIG_DIR, run

#: (run folder, experiment, extra overrides): the baseline is the model as loaded
#: (SDPA attention); full fine-tuning with eager attention is a secondary row
EXPERIMENTS = (("movie_full", "movie_full", []),
               ("movie_slimfit", "movie_slimfit", []),
               ("movie_slimfit_compress", "movie_slimfit_compress", []),
               ("movie_full_eager", "movie_full", ["model.attn_implementation=eager"]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides for every run")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out).resolve()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for i, (name, exp, extra) in enumerate(EXPERIMENTS, 1):
            print(f"\n=== [{i}/{len(EXPERIMENTS)}] {name}: {args.steps} steps ===", flush=True)
            cfg = compose("train", return_hydra_config=True,
                          overrides=[f"experiment={exp}", f"seed={args.seed}",
                                     f"trainer.max_steps={args.steps}",
                                     f"output_dir={out / name}", *extra, *args.overrides])
            HydraConfig.instance().set_config(cfg)  # so results name the chosen model config
            with open_dict(cfg):
                del cfg["hydra"]
            run(cfg)
    print()
    report.main([str(out)])


if __name__ == "__main__":
    main()
