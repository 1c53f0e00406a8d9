"""The examples in the library's docstrings run and print what they say."""

import doctest
import importlib
import pkgutil
import warnings

import pytest

import slimfit

MODULES = sorted(m.name for m in pkgutil.iter_modules(slimfit.__path__))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"slimfit.{name}")
    with warnings.catch_warnings():  # an example may show a warning on purpose
        warnings.simplefilter("ignore", UserWarning)
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in slimfit.{name}"
