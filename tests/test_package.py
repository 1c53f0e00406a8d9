"""Packaging: the core imports without Lightning/Hydra, and the callbacks are a
subpackage of slimfit, never a top-level ``callbacks`` package."""

import importlib
import pkgutil
import subprocess
import sys

import slimfit

#: Lightning/Hydra glue and entry points, installed under slimfit but not the core library
NOT_CORE = ("callbacks", "experiments", "configs")
#: the core library's subpackages: each must be walked, not only the top-level modules
SUBPACKAGES = ("freezing", "compression", "offload", "memory", "planning")


def core_modules() -> list[str]:
    """Every module of the core library, subpackages included."""
    return sorted(m.name for m in pkgutil.walk_packages(slimfit.__path__, "slimfit.")
                  if m.name.split(".")[1] not in NOT_CORE)


BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import importlib, pkgutil, slimfit
names = [m.name for m in pkgutil.walk_packages(slimfit.__path__, 'slimfit.')
         if m.name.split('.')[1] not in %r]
for name in names:
    importlib.import_module(name)  # walk_packages ignores a subpackage's ImportError: not this
print(len(names), 'ok')
""" % (NOT_CORE,)


def test_core_imports_without_lightning_or_hydra():
    out = subprocess.run([sys.executable, "-c", BLOCK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # every core module, subpackages included, imported with Lightning and Hydra blocked
    assert out.stdout.split()[-2:] == [str(len(core_modules())), "ok"], out.stdout


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
    names = core_modules()
    for pkg in SUBPACKAGES:  # the walk reaches into every subpackage
        assert f"slimfit.{pkg}" in names and any(n.startswith(f"slimfit.{pkg}.") for n in names)
    short = [n for n in names
             if not ((doc := importlib.import_module(n).__doc__) and len(doc.split()) > 8)]
    assert short == []
