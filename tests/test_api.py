"""The public API: ``import slimfit`` gives what the README uses, every README
code block runs against it, and the old flat module paths still import (one
release) with a warning that names the new path."""

import importlib
import pathlib
import re
import sys
import warnings

import pytest

import slimfit
from slimfit._aliases import MOVED

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"

REQUIRED = {"SlimFitSession", "SessionConfig", "LayerFreezer", "ActivationCompressor",
            "CompressionConfig", "StreamConfig", "measure_step", "MemoryReport", "preview",
            "plan_for_budget", "SlimFitError", "SlimFitConfig", "Part"}


def test_the_top_level_exports_the_user_api():
    assert REQUIRED <= set(slimfit.__all__)
    for name in slimfit.__all__:
        assert getattr(slimfit, name) is not None, name


def _python_blocks():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python block: this test would check nothing"
    return blocks


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_every_readme_code_block_runs(index, tmp_path, monkeypatch):
    """Each ``python`` block of the README runs as written, in a fresh namespace,
    from an empty working directory (blocks that train do so on tiny models)."""
    monkeypatch.chdir(tmp_path)
    code = _python_blocks()[index]
    exec(compile(code, f"README.md block {index}", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_import_with_a_warning_naming_the_new_one(old):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    new = importlib.import_module(MOVED[old])
    assert module is new  # the same module object: one class identity, one state
    assert any(issubclass(w.category, DeprecationWarning) and MOVED[old] in str(w.message)
               for w in caught), [str(w.message) for w in caught]


def test_old_names_resolve_to_the_new_objects():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from slimfit.compress import ActivationCompressor
        from slimfit.config import SlimFitConfig
        from slimfit.ledger import measure_step
        from slimfit.stream import WeightStreamer
    assert (ActivationCompressor, SlimFitConfig, measure_step, WeightStreamer) == (
        slimfit.ActivationCompressor, slimfit.SlimFitConfig, slimfit.measure_step,
        slimfit.WeightStreamer)


def test_selection_preview_moved_with_a_warning():
    from torch import nn

    from slimfit.selection import preview
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.warns(DeprecationWarning, match="moved to slimfit.preview"):
        old = preview(model)
    assert old == slimfit.preview(model)
