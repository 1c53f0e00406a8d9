"""Counting memory exactly: the ledger of one training step (parameters,
gradients, optimizer state, peak saved activations, per module), the tracker
of saved tensors it uses, the report it fills and the files written from it.

Why a subpackage: every SlimFit claim is a memory claim; these modules hold
the measuring, and they know nothing of the features being measured beyond
what parts report (:class:`slimfit.parts.MemoryAdjustment`).
"""

from slimfit.memory.comms import CollectiveBytes
from slimfit.memory.files import plot_breakdown, write_memory_files
from slimfit.memory.ledger import MeasuredStep, measure_step
from slimfit.memory.report import CATEGORIES, CudaPeak, MemoryReport, ModuleBytes, format_bytes
from slimfit.memory.tracker import SavedTensorTracker

__all__ = ["CATEGORIES", "CollectiveBytes", "CudaPeak", "MeasuredStep", "MemoryReport", "ModuleBytes",
           "SavedTensorTracker", "format_bytes", "measure_step", "plot_breakdown",
           "write_memory_files"]
