"""The examples in the library's docstrings run and print what they say, in
every module of the core library, subpackages included."""

import doctest
import importlib
import pkgutil
import warnings

import pytest

import slimfit

#: Lightning/Hydra glue and entry points, installed under slimfit but not the core library
NOT_CORE = ("callbacks", "experiments", "configs")

MODULES = sorted(m.name for m in pkgutil.walk_packages(slimfit.__path__, "slimfit.")
                 if m.name.split(".")[1] not in NOT_CORE)

#: modules whose docstrings hold examples: each must run at least one (an example
#: dropped or made unreachable by doctest, e.g. a '>>>' lost in a reflow, fails here)
WITH_EXAMPLES = [
    "slimfit.compression.compressor", "slimfit.compression.detect",
    "slimfit.compression.frozen_conv", "slimfit.compression.quantize",
    "slimfit.freezing.freezer", "slimfit.freezing.heads", "slimfit.freezing.policies",
    "slimfit.freezing.scheduler",
    "slimfit.freezing.scores", "slimfit.memory.ledger", "slimfit.memory.tracker",
    "slimfit.offload.activations", "slimfit.offload.optimizer_state",
    "slimfit.offload.stream_config", "slimfit.offload.streaming", "slimfit.planning.planner",
    "slimfit.selection", "slimfit.storage",
]
#: examples attempted over all modules (66 when this floor was set)
MIN_EXAMPLES = 66


def _run_examples(name):
    """doctest's (failed, attempted) for module ``name``."""
    module = importlib.import_module(name)
    with warnings.catch_warnings():  # an example may show a warning on purpose
        warnings.simplefilter("ignore", UserWarning)
        return doctest.testmod(module, optionflags=doctest.ELLIPSIS)


def test_every_subpackage_is_walked():
    for pkg in ("freezing", "compression", "offload", "memory", "planning"):
        assert any(m.startswith(f"slimfit.{pkg}.") for m in MODULES), pkg
    assert set(WITH_EXAMPLES) <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = _run_examples(name)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
    if name in WITH_EXAMPLES:
        assert result.attempted > 0, f"no docstring example of {name} ran"


def test_examples_are_attempted_across_modules():
    attempted = {name: _run_examples(name).attempted for name in MODULES}
    assert sum(attempted.values()) >= MIN_EXAMPLES, attempted
