"""Lightning callbacks for SlimFit, installed as ``slimfit.callbacks``.

Thin glue: each hook calls into the plain-PyTorch core in ``slimfit``.
"""

from slimfit.callbacks.memory_monitor import MemoryMonitor
from slimfit.callbacks.slimfit import SlimFit
from slimfit.callbacks.step_timer import StepTimer

__all__ = ["MemoryMonitor", "SlimFit", "StepTimer"]
