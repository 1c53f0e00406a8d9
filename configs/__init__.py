"""The Hydra configs of ``slimfit.experiments.train``, shipped as package data
(``slimfit.configs``) so the entry point finds them from any install, editable
or not. Holds YAML only; configs refer to code through ``_target_``."""
