"""Moving memory off the device, exactly: the optimizer state of frozen units
(:class:`OptimizerStateOffloader`), the weights of frozen units streamed
Superpipeline-style (:class:`WeightStreamer`, options in
:class:`StreamConfig`), and saved activations (:class:`ActivationOffloader`).

Each is a session part (:mod:`slimfit.parts`): none changes a gradient or an
update, so the planner turns them on before it raises the freezing rate.
"""

from slimfit.offload.activations import ActivationOffloader
from slimfit.offload.optimizer_state import OptimizerStateOffloader
from slimfit.offload.stream_config import StreamConfig, default_stream_units
from slimfit.offload.streaming import WeightStreamer

__all__ = ["ActivationOffloader", "OptimizerStateOffloader", "StreamConfig", "WeightStreamer",
           "default_stream_units"]
