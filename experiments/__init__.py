"""Experiment entry points, Lightning task modules, benchmarks and reports,
installed as ``slimfit.experiments`` (Lightning and Hydra live here and in
``slimfit.callbacks``, never in the core)."""
