"""Server test fixtures: an app on a real SQLite file, its TestClient, registered runs, and
records shaped like a probe's (healthy, or with chosen stats forced); a throwaway PostgreSQL
cluster for the session (tests/server/pg.py) with a fresh database per test."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server import Settings, create_app
from server.catalogue import key
from tests.server import pg

ADMIN = "admin-secret-token"
LAYERS = 2
HEALTHY = {"beta_mean": 0.6, "beta_p10": 0.2, "beta_p50": 0.6, "beta_p90": 0.9,
           "gate_logit_sat": 0.01, "h_norm_mean": 1.5, "h_norm_drift": 1.1,
           "k_concentration": 0.3, "k_abs_concentration": 0.3, "k_cos_step": 0.9,
           "k_cos_probe": 0.9, "nonfinite": 0.0}


def scalars(step: int, layers: int = LAYERS, **force: float) -> dict[str, float]:
    """Healthy stats on every site; ``force`` sets ``stat`` everywhere or ``stat__site__layer``
    on one site (``beta_p90__attn__1=0.01``)."""
    out = {"loss": 3.0 - 0.001 * step, "lr": 3e-4}
    for layer in range(layers):
        for site in ("attn", "mlp"):
            for stat, v in HEALTHY.items():
                out[key(stat, site, layer)] = v
    for name, v in force.items():
        if "__" in name:
            stat, site, layer = name.split("__")
            out[key(stat, site, int(layer))] = v
        else:
            for layer in range(layers):
                for site in ("attn", "mlp"):
                    out[key(name, site, layer)] = v
    return out


def batch(batch_id: str, steps: list[int], **force: float) -> dict[str, Any]:
    return {"batch_id": batch_id, "records": [{"step": s, "scalars": scalars(s, **force)}
                                               for s in steps]}


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(db_url=f"sqlite:///{tmp_path / 'ds.db'}", admin_token=ADMIN)


@pytest.fixture
def client(settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


class Run:
    def __init__(self, client: TestClient, name: str = "run", **body: Any) -> None:
        r = client.post("/api/v1/runs", json={"name": name, **body})
        assert r.status_code == 201, r.text
        self.id, self.token = r.json()["id"], r.json()["token"]
        self.headers = {"Authorization": f"Bearer {self.token}"}
        self.client = client
        self.base = f"/api/v1/runs/{self.id}"

    def post(self, body: Any) -> Any:
        return self.client.post(f"{self.base}/stats", json=body, headers=self.headers)

    def get(self, path: str, **params: Any) -> Any:
        r = self.client.get(f"{self.base}{path}", params=params)
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture
def run(client) -> Run:
    return Run(client, config={"preset": "tiny", "lr": 3e-4}, tags={"ablation": "none"})


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[pg.PgCluster]:
    """A PostgreSQL server of Debian's packages in a temporary directory, for this session (one per
    xdist worker that asks); skips with the reason when PostgreSQL is not installed."""
    reason = pg.missing()
    if reason is not None:
        pytest.skip(reason)
    with pg.PgCluster() as cluster:
        yield cluster


_databases = itertools.count(1)


@pytest.fixture
def pg_url(pg_cluster) -> str:
    """The SQLAlchemy URL of a new, empty database in the session's cluster."""
    return pg_cluster.create_database(f"test_{next(_databases)}")
