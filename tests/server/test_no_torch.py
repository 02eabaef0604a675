"""The server (and the job-side HTTP sink) run where torch is not installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # any ``import torch`` now raises ImportError
    sys.modules["numpy"] = None

    from fastapi.testclient import TestClient

    import server
    from server import Settings, create_app

    with TestClient(create_app(Settings(db_url=sys.argv[1]))) as c:
        r = c.post("/api/v1/runs", json={"name": "no-torch"})
        assert r.status_code == 201, r.text
        h = {"Authorization": "Bearer " + r.json()["token"]}
        body = {"batch_id": "b", "records": [{"step": 1, "scalars": {"beta_p90/attn/L00": 0.01}}]}
        r = c.post(f"/api/v1/runs/{r.json()['id']}/stats", json=body, headers=h)
        assert r.status_code == 200 and r.json()["accepted"] == 1, r.text
        assert c.get("/metrics").status_code == 200

    # the job-side client too, through the real package (its exports are lazy)
    import probes.http_sink
    from probes import HttpSink  # noqa: F401

    loaded = [m for m in sys.modules if m.split(".")[0] in ("torch", "ddl", "numpy")
              and sys.modules[m] is not None]
    probe_parts = [m for m in sys.modules if m.startswith("probes.") and m not in (
        "probes.http_sink", "probes._spool", "probes.sink")]
    assert not loaded and not probe_parts, (loaded, probe_parts)
    print("ok")
""")


def test_server_and_http_sink_import_and_serve_without_torch(tmp_path):
    r = subprocess.run([sys.executable, "-W", "error", "-c", SCRIPT, f"sqlite:///{tmp_path}/t.db",
                        str(ROOT / "probes")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
