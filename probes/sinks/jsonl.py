"""JsonlSink: one JSON object per log step appended to a file, each line flushed when written.

Line format: ``{"step": s, "<canonical key>": value, ..., "<hist key>": [counts...]}``. Strict
JSON: a non-finite value is written as null. Every line counted in ``stats.written`` has reached
the OS (``fsync=True``: the disk) before the next one is started.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import IO

from probes.sink import Histogram
from probes.sinks._base import ThreadedSink


def _num(x: float) -> float | int | None:
    if not math.isfinite(x):
        return None
    return int(x) if float(x).is_integer() and abs(x) < 2**53 else x


def to_line(step: int, scalars: dict[str, float], hists: dict[str, Histogram]) -> str:
    obj: dict[str, object] = {"step": step}
    obj.update({k: _num(float(v)) for k, v in scalars.items()})
    obj.update({k: [_num(c) for c in h.counts] for k, h in hists.items()})
    return json.dumps(obj, allow_nan=False, separators=(",", ":"))


class JsonlSink(ThreadedSink):
    """After a failed write (disk full, an unwritable directory) the file is closed and cut back
    to its last complete line, so a retry, once the disk has room again, appends whole lines."""

    def __init__(self, path: str | os.PathLike[str], fsync: bool = False, queue_size: int = 1024) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._f: IO[str] | None = None
        self._good = 0  # file size after the last complete line
        super().__init__(queue_size)

    def _write(self, step: int, scalars: dict[str, float], hists: dict[str, Histogram]) -> None:
        try:
            if self._f is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._f = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (owned by the thread)
                self._good = self._f.tell()
            self._f.write(to_line(step, scalars, hists) + "\n")
            self._f.flush()
            if self.fsync:
                os.fsync(self._f.fileno())
            self._good = self._f.tell()
        except Exception:
            self._discard()
            raise

    def _discard(self) -> None:
        """Drop the handle and any torn line; best effort: the write's own error is what counts."""
        f, self._f = self._f, None
        if f is None:
            return
        with contextlib.suppress(OSError):
            f.close()  # flushes the buffered rest, which fails again on a full disk; closes anyway
        with contextlib.suppress(OSError):
            if self.path.is_file() and self.path.stat().st_size > self._good:
                os.truncate(self.path, self._good)

    def _flush(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())

    def _close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
