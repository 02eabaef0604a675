"""Forward-hook probes: gate and direction statistics computed on the device, streamed to sinks.

``Probe`` attaches to a DDL model in one line; ``probes.sinks`` holds the destinations and
``probes.callbacks`` the ready-made alert reactions.
"""

from probes import callbacks
from probes.probe import Probe, ProbeStats
from probes.sink import Histogram, Sink, SinkStats
from probes.sinks import (
    FanoutSink,
    JsonlSink,
    MemorySink,
    MLflowSink,
    TensorBoardSink,
    custom_scalars_layout,
)

__all__ = [
    "FanoutSink", "Histogram", "JsonlSink", "MLflowSink", "MemorySink", "Probe", "ProbeStats", "Sink",
    "SinkStats", "TensorBoardSink", "callbacks", "custom_scalars_layout",
]
