"""Destinations for probe statistics; all follow :class:`probes.sink.Sink` (write/flush/close),
never raise into training and never block it."""

from probes.sinks.fanout import FanoutSink
from probes.sinks.jsonl import JsonlSink
from probes.sinks.memory import MemorySink, Record
from probes.sinks.mlflow import MLflowSink
from probes.sinks.tensorboard import TensorBoardSink, custom_scalars_layout

__all__ = [
    "FanoutSink", "JsonlSink", "MLflowSink", "MemorySink", "Record", "TensorBoardSink",
    "custom_scalars_layout",
]
