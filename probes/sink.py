"""The sink protocol every destination of probe statistics implements.

``write(step, scalars, hists)`` hands over one log step: ``scalars`` maps canonical metric keys
(``server.catalogue.key``) to floats, ``hists`` maps histogram keys (``beta_hist/attn/L03``) to
fixed-bin counts. A sink never raises into training and never blocks it: network and disk sinks
own a thread and a bounded queue and count what they drop. Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Histogram:
    """Counts over equal-width bins on [lo, hi]; exact, so they merge by addition."""

    lo: float
    hi: float
    counts: tuple[float, ...]

    @property
    def edges(self) -> list[float]:
        n = len(self.counts)
        return [self.lo + (self.hi - self.lo) * i / n for i in range(n + 1)]


@dataclass
class SinkStats:
    """What a sink did: every sink exposes one as ``.stats``."""

    written: int = 0
    dropped: int = 0
    errors: int = 0
    last_error: str | None = field(default=None)


@runtime_checkable
class Sink(Protocol):
    stats: SinkStats

    def write(
        self, step: int, scalars: Mapping[str, float], hists: Mapping[str, Histogram] | None = None
    ) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...
