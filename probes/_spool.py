"""Spool: an append-only JSONL file of batches waiting for the server, read back in order, that a
later process can send if the job that wrote it dies.

Four files share the spool's name::

    <name>.jsonl            one batch per line, fsynced when appended, so a batch the job handed
                            over survives the job's own crash; truncated to zero once all is acknowledged
    <name>.jsonl.ack        the byte offset of the first batch not yet acknowledged; replaced
                            atomically but not fsynced: losing it only replays delivered batches,
                            which the server recognises by their batch ids
    <name>.jsonl.meta.json  what it takes to send the batches without the job: the owner's dict
                            (``HttpSink``: server URL, run registration body, batch-id prefix, run id
                            and write token once registered). Mode 0600 (it holds the token), written
                            before the first batch, replaced atomically on change, removed when drained
    <name>.jsonl.lock       ``flock``-ed exclusively by the live owner for its lifetime

A spool whose lock can be taken is an orphan (its job died, or closed with batches undelivered):
``Spool.open`` takes the lock and reopens it, cursor and pending count included, cutting a last
line torn by a crash mid-append. ``probes.spool_replay`` sends orphans. Torch-free; used by
``probes.http_sink``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any


def _take_lock(path: Path, wait: bool) -> int | None:
    """An fd holding ``flock(LOCK_EX)`` on ``path``, or None when someone else holds it.

    The inode is checked after locking: a replayer that finished a spool unlinks its lock file
    while holding it, so a lock won on the unlinked inode guards nothing (try again, or give up)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            st = os.fstat(fd)
            try:
                now = os.stat(path)
                same = (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)
            except FileNotFoundError:
                same = False
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if same:
            return fd
        os.close(fd)
        if not wait:
            return None


def _write_atomic(path: Path, data: bytes, mode: int, sync: bool) -> None:
    tmp = Path(f"{path}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # a tmp left by a crash keeps its old mode otherwise
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class Spool:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.cursor_path = Path(f"{path}.ack")
        self.meta_path = Path(f"{path}.meta.json")
        self.lock_path = Path(f"{path}.lock")
        self.meta: dict[str, Any] | None = None
        """What a replayer needs (``set_meta``); None for a spool that does not describe itself."""
        self._meta_on_disk = False
        self._lock_fd: int | None = None
        self._offset = 0
        self._line_len = 0
        self.pending = 0
        """Batches appended and not yet acknowledged."""

    @classmethod
    def open(cls, path: Path) -> Spool | None:
        """Reopen an orphan spool, holding its lock; None while its owner (or another replayer) lives.

        Pending batches are the complete lines after the cursor; a cursor that is missing or not at
        a line start counts from the top (replays are duplicates, never losses); an unterminated
        last line is a crash mid-append and is cut."""
        sp = cls(path)
        if not sp.lock(wait=False):
            return None
        try:
            sp.meta = sp.read_meta()
            sp._meta_on_disk = sp.meta is not None
            if sp.path.exists():
                sp._reopen()
        except BaseException:
            sp.close()
            raise
        return sp

    def _reopen(self) -> None:
        with open(self.path, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            try:
                offset = int(self.cursor_path.read_text())
            except (OSError, ValueError):
                offset = 0
            if not 0 <= offset <= size:
                offset = 0
            if offset:
                f.seek(offset - 1)
                if f.read(1) != b"\n":
                    offset = 0
            f.seek(offset)
            pending, end = 0, offset
            for line in f:  # streamed: a long outage's spool need not fit in memory
                if not line.endswith(b"\n"):
                    break
                pending += 1
                end += len(line)
            if end < size:
                f.truncate(end)
        self._offset, self.pending = offset, pending

    def read_meta(self) -> dict[str, Any] | None:
        """The metadata on disk, or None (absent or unreadable). Safe without the lock."""
        try:
            meta = json.loads(self.meta_path.read_bytes())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def set_meta(self, meta: dict[str, Any]) -> None:
        """Describe the spool. On disk before the first batch, and rewritten now if batches wait."""
        self.meta = dict(meta)
        if self._meta_on_disk:
            self._write_meta()

    def _write_meta(self) -> None:
        assert self.meta is not None
        data = json.dumps(self.meta, allow_nan=False, indent=1).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.meta_path, data, 0o600, sync=True)  # rare: once per spool and registration
        self._meta_on_disk = True

    def lock(self, wait: bool = True) -> bool:
        """Take the spool's lock for this object's lifetime (``close`` or ``remove`` gives it back)."""
        if self._lock_fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = _take_lock(self.lock_path, wait)
        return self._lock_fd is not None

    def close(self) -> None:
        """Give the lock back; the files stay, for a replayer once nobody holds them."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def append(self, batch: dict[str, Any]) -> None:
        line = (json.dumps(batch, allow_nan=False, separators=(",", ":")) + "\n").encode()
        if self.meta is not None and not self._meta_on_disk:
            self._write_meta()  # a batch is never on disk without what it takes to send it
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)  # one fsync per batch: the spool's durability point
            except OSError:
                with contextlib.suppress(OSError):  # keep the first error (ENOSPC), not the cleanup's
                    os.ftruncate(fd, start)  # a half-written line (disk full) would swallow the next one
                raise
        finally:
            os.close(fd)
        self.pending += 1

    def peek(self) -> dict[str, Any] | None:
        """The oldest unacknowledged batch, or None. A torn last line (a crash mid-append) is cut;
        a complete line that does not parse (damaged on disk) is skipped, not the ones after it."""
        while self.pending:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                line = f.readline()
            if not line.endswith(b"\n"):
                self._drop_tail()
                break
            self._line_len = len(line)
            try:
                return json.loads(line)
            except ValueError:
                self.ack()
        return None

    def ack(self) -> None:
        """The batch ``peek`` returned is delivered: move past it."""
        self._offset += self._line_len
        self.pending -= 1
        if self.pending == 0:
            self._reset()
        else:
            _write_atomic(self.cursor_path, str(self._offset).encode(), 0o644, sync=False)

    def _drop_tail(self) -> None:
        with open(self.path, "r+b") as f:
            f.truncate(self._offset)
        self.pending = 0
        self._reset()

    def _reset(self) -> None:
        with open(self.path, "wb"):
            pass
        self._offset = 0
        self.cursor_path.unlink(missing_ok=True)
        self.meta_path.unlink(missing_ok=True)  # the token stays on disk only while batches wait
        self._meta_on_disk = False

    def remove(self) -> None:
        """Delete the files and give the lock back; only when nothing is pending."""
        if self.pending == 0:
            for p in (self.path, self.cursor_path, Path(f"{self.cursor_path}.tmp"), self.meta_path,
                      Path(f"{self.meta_path}.tmp"), self.lock_path):
                p.unlink(missing_ok=True)  # the lock file last, while still held: see _take_lock
            self.close()
