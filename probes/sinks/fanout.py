"""FanoutSink: one sink that writes to many; a failing member never stops the others."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from probes.sink import Histogram, Sink, SinkStats
from probes.sinks._base import Faults


class FanoutSink:
    """Calls every member in turn, catching, counting and logging (once per kind) what they raise.
    ``stats.errors`` counts member faults; each member keeps its own ``stats`` too."""

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks = list(sinks)
        self.stats = SinkStats()
        self._fault = Faults("FanoutSink", self.stats)
        self._closed = False

    def _each(self, what: str, *args: object) -> bool:
        ok = True
        for s in self.sinks:
            try:
                getattr(s, what)(*args)
            except Exception as e:
                ok = False
                self._fault(f"{type(s).__name__}.{what}", e)
        return ok

    def write(self, step: int, scalars: Mapping[str, float],
              hists: Mapping[str, Histogram] | None = None) -> None:
        if self._closed:
            self.stats.dropped += 1
            return
        if self._each("write", step, scalars, hists):
            self.stats.written += 1

    def flush(self) -> None:
        self._each("flush")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._each("close")
