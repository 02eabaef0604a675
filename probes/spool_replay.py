"""Replay of orphan spools: the batches a job left on disk when it died (or closed while the server
was away), sent to the run they belong to by whoever finds them.

A spool is an orphan when its lock can be taken (``probes._spool``). Its metadata says which server
and which run; its batches go oldest first with their original ids, so one the server already
stored (the answer was lost, or the cursor was) comes back ``duplicate`` and nothing is stored
twice or skipped. A run that never registered is registered with the recorded body, one the server
lost (404, or 401/403 for the recorded token) is registered again, and the new id and token are
written back before any batch goes to it, so a replay cut short goes on with the same run next
time. The first transient failure stops that spool and leaves it intact; a fully delivered spool
is removed (batches, cursor, metadata, lock). Used by ``HttpSink`` when it starts (on a thread
of its own) and by ``deltascope flush-spool``. Torch-free. The write token never leaves the
metadata file: not logged, not in a summary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from probes._spool import Spool
from probes.http_sink import RunClient, _RunLost, _Transient

_SIDE_FILES = (".ack", ".ack.tmp", ".meta.json", ".meta.json.tmp", ".lock")


@dataclass
class Replayed:
    """What became of one spool."""

    path: Path
    """The batch file, ``<name>.jsonl``."""
    run_name: str | None = None
    run_id: int | None = None
    """The run on the server; None if it never registered."""
    url: str | None = None
    sent: int = 0
    """Batches the server acknowledged now (duplicates included)."""
    duplicates: int = 0
    """Of those, batches it already had: delivered before, answer or cursor lost."""
    rejected: int = 0
    """Batches the server refused (4xx): dropped, as ``HttpSink`` drops them."""
    remaining: int = 0
    """Batches still in the spool, for a later replay; -1 if it could not even be opened."""
    error: str | None = None
    """Why the replay stopped early, or what the server refused."""
    in_use: bool = False
    """Its owner is alive (the lock is held): not an orphan, left alone."""

    @property
    def delivered(self) -> bool:
        return not self.in_use and self.remaining == 0 and self.error is None

    def line(self) -> str:
        """One line for a person: what was sent, what remains and why. Never the token."""
        if self.in_use:
            return f"{self.path}: in use by a running job (its lock is held); left alone"
        if self.remaining < 0:
            return f"{self.path}: {self.error}; left as it is"
        run = f"run {self.run_name!r}" + (f" #{self.run_id}" if self.run_id is not None else " (not registered)")
        where = f" at {self.url}" if self.url else ""
        dup = f" ({self.duplicates} already stored)" if self.duplicates else ""
        out = f"{self.path}: {run}{where}: {self.sent} batches sent{dup}"
        if self.rejected:
            out += f", {self.rejected} refused and dropped"
        if self.remaining:
            return f"{out}, {self.remaining} remain: {self.error}; kept for a later flush-spool"
        out += ", spool removed"
        return f"{out}; {self.error}" if self.error else out


class _Replayer(RunClient):
    """Sends one locked spool; every (re)registration is written to its metadata first."""

    def __init__(self, spool: Spool, meta: dict[str, Any], url: str, timeout: float, out: Replayed) -> None:
        # ``url`` may be another address of the recorded server: the recorded run is tried there first
        super().__init__(url, meta["run"], timeout, run_id=meta.get("run_id"), token=meta.get("token"))
        self.spool, self.meta, self.out = spool, meta, out

    def _registered(self) -> None:
        self.meta = {**self.meta, "url": self.url, "run_id": self.run_id, "token": self._token}
        self.spool.set_meta(self.meta)
        self.out.run_id = self.run_id

    def _answered(self, batch: dict[str, Any], r: httpx.Response) -> None:
        if r.status_code == 200:
            self.out.sent += 1
            self.out.duplicates += bool(r.json().get("duplicate"))
        else:
            self.out.rejected += 1
            self.out.error = f"the server refused {self.out.rejected} batch(es): HTTP {r.status_code} {r.text[:200]}"

    def drain(self, stop: Callable[[], bool] | None) -> None:
        while (batch := self.spool.peek()) is not None:
            if stop is not None and stop():
                self.out.error = "stopped before the end (the process is closing)"
                return
            try:
                try:
                    self._send(batch)
                except _RunLost:  # the server lost the run: register it again, now, and resend
                    self._send(batch)
            except _Transient as e:
                self.out.error = f"{self.url} unreachable or busy ({e})"
                return
            self.spool.ack()


def _meta_problem(meta: dict[str, Any] | None) -> str | None:
    if meta is None:
        return "no readable metadata (written by an older deltascope?): which run these batches belong to is unknown"
    run = meta.get("run")
    if not isinstance(meta.get("url"), str) or not isinstance(run, dict) or not isinstance(run.get("name"), str):
        return "metadata without a server URL or run body: which run these batches belong to is unknown"
    return None


def replay_spool(path: Path, url: str | None = None, timeout: float = 10.0,
                 stop: Callable[[], bool] | None = None) -> Replayed | None:
    """Send one spool (``<name>.jsonl``) if it is an orphan. ``url`` overrides the recorded server
    address (the same server reached another way). None when there was nothing to send or report:
    leftovers of a spool that never held a batch (removed), or one another replayer just finished."""
    out = Replayed(path=path)
    try:
        sp = Spool.open(path)
    except OSError as e:
        out.error, out.remaining = f"cannot lock or read it: {e}", -1
        return out
    if sp is None:
        meta = Spool(path).read_meta() or {}
        out.in_use, out.run_name = True, (meta.get("run") or {}).get("name")
        return out if path.exists() or meta else None
    meta = sp.meta or {}
    out.run_name, out.run_id = (meta.get("run") or {}).get("name"), meta.get("run_id")
    out.url = url.rstrip("/") if url else meta.get("url")
    try:
        if sp.pending and (problem := _meta_problem(sp.meta)) is not None:
            out.error = problem
        elif sp.pending:
            replayer = _Replayer(sp, meta, out.url, timeout, out)
            try:
                replayer.drain(stop)
            finally:
                replayer._client.close()
        out.remaining = sp.pending
        if sp.pending == 0:
            sp.remove()
    except (OSError, ValueError) as e:  # a file that cannot be read or written: reported, kept
        out.error, out.remaining = f"{type(e).__name__}: {e}", sp.pending
    finally:
        sp.close()
    return out if meta or out.remaining or out.error else None


def find_spools(spool_dir: Path) -> list[Path]:
    """The spools in ``spool_dir`` (``<name>.jsonl``), also those of which only side files are left.

    A ``.jsonl`` with neither metadata nor lock beside it is not a spool (a ``JsonlSink`` file, a
    spool of an older deltascope) and is never touched: reopening one cuts its last line if torn."""
    found = set()
    for p in Path(spool_dir).iterdir():
        for suffix in _SIDE_FILES:
            if p.name.endswith(".jsonl" + suffix):
                found.add(p.with_name(p.name[: -len(suffix)]))
                break
    return sorted(d for d in found if Path(f"{d}.meta.json").exists() or Path(f"{d}.lock").exists())


def replay_orphans(spool_dir: str | Path, url: str | None = None, timeout: float = 10.0,
                   stop: Callable[[], bool] | None = None,
                   each: Callable[[Replayed], None] | None = None) -> list[Replayed]:
    """Replay every orphan spool in ``spool_dir``, one after the other; a summary for each spool
    there (those in use included, marked so), also handed to ``each`` as it is done. Raises
    ``OSError`` only if the directory cannot be listed."""
    done = []
    for path in find_spools(Path(spool_dir)):
        if stop is not None and stop():
            break
        r = replay_spool(path, url=url, timeout=timeout, stop=stop)
        if r is not None:
            done.append(r)
            if each is not None:
                each(r)
    return done
