"""Forward-hook probes: gate and direction statistics computed on the device, streamed to sinks.

``Probe`` attaches to a DDL model in one line; ``probes.sinks`` holds the destinations and
``probes.callbacks`` the ready-made alert reactions. Exports are lazy (PEP 562) so that the
torch-free parts (``probes.sink``, ``probes.http_sink``) import without torch.
"""

from importlib import import_module

_EXPORTS = {
    "Probe": "probes.probe", "ProbeStats": "probes.probe",
    "Histogram": "probes.sink", "Sink": "probes.sink", "SinkStats": "probes.sink",
    "FanoutSink": "probes.sinks", "JsonlSink": "probes.sinks", "MemorySink": "probes.sinks",
    "MLflowSink": "probes.sinks", "TensorBoardSink": "probes.sinks", "custom_scalars_layout": "probes.sinks",
    "HttpSink": "probes.http_sink",
}
_SUBMODULES = {"sinks", "callbacks"}

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return import_module(f"probes.{name}")
    raise AttributeError(f"module 'probes' has no attribute {name!r}")
