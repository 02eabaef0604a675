"""Spool: an append-only JSONL file of batches waiting for the server, read back in order.

One line per batch, fsynced when appended, so a batch the job handed over survives the job's own
crash. A cursor file beside it holds the byte offset of the first batch not yet acknowledged; it is
replaced atomically but not fsynced: losing it only replays delivered batches, which the server
recognises by their batch ids. When everything is acknowledged the file is truncated to zero.
Torch-free; used by ``probes.http_sink``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class Spool:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.cursor_path = path.with_suffix(path.suffix + ".ack")
        self._offset = 0
        self._size = 0
        self._line_len = 0
        self.pending = 0
        """Batches appended and not yet acknowledged."""

    def append(self, batch: dict[str, Any]) -> None:
        line = (json.dumps(batch, allow_nan=False, separators=(",", ":")) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())  # one fsync per batch: the spool's durability point
        self._size += len(line)
        self.pending += 1

    def peek(self) -> dict[str, Any] | None:
        """The oldest unacknowledged batch, or None. A torn last line (a crash mid-append) is cut."""
        while self.pending:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                line = f.readline()
            try:
                self._line_len = len(line)
                return json.loads(line)
            except ValueError:
                self._drop_tail()
        return None

    def ack(self) -> None:
        """The batch ``peek`` returned is delivered: move past it."""
        self._offset += self._line_len
        self.pending -= 1
        if self.pending == 0:
            self._reset()
        else:
            tmp = self.cursor_path.with_suffix(".tmp")
            tmp.write_text(str(self._offset))
            os.replace(tmp, self.cursor_path)

    def _drop_tail(self) -> None:
        with open(self.path, "r+b") as f:
            f.truncate(self._offset)
        self._size = self._offset
        self.pending = 0
        self._reset()

    def _reset(self) -> None:
        with open(self.path, "wb"):
            pass
        self._offset = self._size = 0
        self.cursor_path.unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the files; only when nothing is pending."""
        if self.pending == 0:
            self.path.unlink(missing_ok=True)
            self.cursor_path.unlink(missing_ok=True)
