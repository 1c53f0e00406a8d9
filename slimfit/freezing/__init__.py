"""Per-iteration freezing (arXiv 2305.18513, sections 1-2): the options
(:class:`SlimFitConfig`), the training-dynamics scores, the inter-layer
scheduler, new-head detection, the frozen/trained history, and the freezer
that applies them to a model (a session part, :mod:`slimfit.parts`).
"""

from slimfit.freezing.config import SlimFitConfig
from slimfit.freezing.freezer import LayerFreezer, preview
from slimfit.freezing.heads import HeadReport, detect_new_heads
from slimfit.freezing.history import FreezeHistory
from slimfit.freezing.scheduler import InterLayerScheduler
from slimfit.freezing.scores import SCORES, WeightSnapshot

__all__ = ["SCORES", "FreezeHistory", "HeadReport", "InterLayerScheduler", "LayerFreezer",
           "SlimFitConfig", "WeightSnapshot", "detect_new_heads", "preview"]
