"""MemorySink: keeps every record in a list, for tests and notebooks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from probes.sink import Histogram, SinkStats


@dataclass(frozen=True)
class Record:
    step: int
    scalars: dict[str, float]
    hists: dict[str, Histogram] = field(default_factory=dict)


class MemorySink:
    """Synchronous and in-process: ``records`` in write order; ``series(key)`` -> [(step, value)]."""

    def __init__(self) -> None:
        self.stats = SinkStats()
        self.records: list[Record] = []
        self.closed = False

    def write(self, step: int, scalars: Mapping[str, float],
              hists: Mapping[str, Histogram] | None = None) -> None:
        if self.closed:
            self.stats.dropped += 1
            return
        self.records.append(Record(step, dict(scalars), dict(hists or {})))
        self.stats.written += 1

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(r.step, r.scalars[key]) for r in self.records if key in r.scalars]

    def last(self) -> Record:
        return self.records[-1]
