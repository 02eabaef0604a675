"""PgCluster: a throwaway PostgreSQL server from Debian's packages, for tests and benchmarks.

``initdb`` and ``pg_ctl`` from the newest ``/usr/lib/postgresql/<version>/bin`` build a cluster in
a fresh temporary directory, listening on 127.0.0.1 at a free port and on a unix socket in that
directory only (never the system's /var/run/postgresql), trust authentication for the
``postgres`` role. PostgreSQL refuses to run as root: as root every server-side command runs as
the unprivileged ``postgres`` user the package creates (``runuser -u postgres --``); as anyone
else, as that user. Durability settings are PostgreSQL's defaults (fsync and synchronous_commit
on): a commit is on disk before it returns, like SQLite's ``synchronous=FULL`` in server/db.py.

    with PgCluster() as pg:
        url = pg.create_database("soak")   # postgresql+psycopg://postgres@127.0.0.1:PORT/soak

``stop()`` (also on exit of the ``with`` block, and at interpreter exit as a fallback) shuts the
server down and removes the directory. ``missing()`` names what is absent, for a clean skip.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.server.live import free_port

PG_ROOT = Path("/usr/lib/postgresql")
SUPERUSER = "postgres"


def pg_bin() -> Path | None:
    """The bin directory of the newest installed PostgreSQL major version, or None."""
    found = [d / "bin" for d in PG_ROOT.glob("*") if (d / "bin" / "pg_ctl").is_file()]
    if not found:
        return None
    return max(found, key=lambda b: [int(x) for x in re.findall(r"\d+", b.parent.name)] or [0])


def missing() -> str | None:
    """Why no cluster can be started here (None when one can)."""
    if pg_bin() is None:
        return (f"PostgreSQL is not installed (no {PG_ROOT}/*/bin/pg_ctl): "
                "run `sh scripts/system-deps.sh` as root, which installs Debian's postgresql")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SUPERUSER)
        except KeyError:
            return "running as root and there is no 'postgres' system user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser (util-linux) is missing"
    if importlib.util.find_spec("psycopg") is None:
        return "the psycopg driver is not installed (requirements.txt pins psycopg[binary])"
    return None


class PgCluster:
    def __init__(self, prefix: str = "deltascope-pg-") -> None:
        self.bin = pg_bin()
        self.prefix = prefix
        self.dir: Path | None = None
        self.port = 0
        self.databases: list[str] = []

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> PgCluster:
        reason = missing()
        if reason is not None:
            raise RuntimeError(reason)
        # mkdtemp is 0700 and under /tmp (pytest's tmp dirs sit under a root-only 0700 parent,
        # which the postgres user could not enter)
        self.dir = Path(tempfile.mkdtemp(prefix=self.prefix))
        if os.geteuid() == 0:
            pw = pwd.getpwnam(SUPERUSER)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        atexit.register(self.stop)
        self._server("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                     "--no-locale", "--no-instructions")
        self.port = free_port()
        opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                f"-c unix_socket_directories={self.dir}")
        try:
            self._server("pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-w", "-t", "60",
                         "-o", opts, "start")
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n{self.log()[-2000:]}") from None
        return self

    def stop(self) -> None:
        """Shut the server down (fast: open sessions are cut) and remove the cluster's files."""
        if self.dir is None:
            return
        if (self.data / "postmaster.pid").exists():
            try:
                self._server("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
            except RuntimeError:
                self._server("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def __enter__(self) -> PgCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- use ------------------------------------------------------------------------------------
    def create_database(self, name: str) -> str:
        """A new empty database; returns its SQLAlchemy URL (psycopg 3 driver)."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"database name {name!r}: lower-case letters, digits and '_' only")
        self._server("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, name)
        self.databases.append(name)
        return self.url(name)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    @property
    def data(self) -> Path:
        assert self.dir is not None, "cluster not started"
        return self.dir / "data"

    @property
    def log_path(self) -> Path:
        assert self.dir is not None, "cluster not started"
        return self.dir / "postgres.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, AssertionError):
            return ""

    def _server(self, tool: str, *args: str, check: bool = True) -> None:
        assert self.bin is not None and self.dir is not None
        cmd = [str(self.bin / tool), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", SUPERUSER, "--", *cmd]
        # cwd inside the cluster's directory: the postgres user may not be able to read ours
        p = subprocess.run(cmd, cwd=self.dir, capture_output=True, text=True, timeout=120)
        if check and p.returncode != 0:
            raise RuntimeError(f"{tool} failed ({p.returncode}): {(p.stderr or p.stdout).strip()[-2000:]}")
