"""LiveServer: the real thing, ``python -m server`` under uvicorn in a subprocess on 127.0.0.1,
configured through DELTASCOPE_* variables, killable with SIGKILL and restartable on its database."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def wait_for(cond, timeout: float = 10.0) -> bool:
    """Poll ``cond`` until it holds (True) or ``timeout`` s pass (False): a liveness bound, not a
    timing claim."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, tmp: Path, port: int | None = None, **env: str) -> None:
        self.tmp = tmp
        self.db_url = env.pop("db_url", f"sqlite:///{tmp / 'live.db'}")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {f"DELTASCOPE_{k.upper()}": v for k, v in env.items()}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 30.0) -> LiveServer:
        env = {**os.environ, "DELTASCOPE_DB_URL": self.db_url, "DELTASCOPE_PORT": str(self.port),
               "DELTASCOPE_LOG_LEVEL": "warning", **self.env}
        self.starts += 1
        log = open(self.tmp / f"server-{self.port}-{self.starts}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "server"], cwd=ROOT, env=env,
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"server not up in {timeout} s: {self.log()[-2000:]}")

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.tmp.glob(f"server-{self.port}-*.log")))

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks, no flush; what is on disk is all there is."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def register(self, name: str = "live", **body: object) -> tuple[int, dict[str, str]]:
        r = httpx.post(self.url + "/api/v1/runs", json={"name": name, **body}, timeout=10)
        r.raise_for_status()
        return r.json()["id"], {"Authorization": f"Bearer {r.json()['token']}"}
