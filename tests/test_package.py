"""Packaging: the core imports without Lightning/Hydra, and the callbacks are a
subpackage of slimfit, never a top-level ``callbacks`` package."""

import pkgutil
import subprocess
import sys

import slimfit

BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import importlib, pkgutil, slimfit
for m in pkgutil.iter_modules(slimfit.__path__):
    if m.name not in ('callbacks', 'experiments'):
        importlib.import_module('slimfit.' + m.name)
print('ok')
"""


def test_core_imports_without_lightning_or_hydra():
    out = subprocess.run([sys.executable, "-c", BLOCK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_callbacks_installed_as_subpackage_only(tmp_path):
    import slimfit.callbacks

    assert slimfit.callbacks.MemoryMonitor.__module__ == "slimfit.callbacks.memory_monitor"
    # Outside the repository (no source dir on sys.path) no top-level package exists.
    code = ("import importlib.util as u; print(u.find_spec('callbacks'), u.find_spec('experiments'), "
            "u.find_spec('slimfit.callbacks') is not None, u.find_spec('slimfit.experiments') is not None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)
    assert out.stdout.split() == ["None", "None", "True", "True"], out.stderr


def test_every_core_module_has_a_docstring():
    for m in pkgutil.iter_modules(slimfit.__path__):
        mod = __import__(f"slimfit.{m.name}", fromlist=["_"])
        assert mod.__doc__ and len(mod.__doc__.split()) > 8, m.name
