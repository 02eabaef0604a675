"""MLflowSink: params and tags once, metrics through ``MlflowClient.log_batch`` from a thread.

Canonical keys go to MLflow unchanged (``beta_mean/attn/L03`` is a valid MLflow key: slashes are
allowed). A user scalar whose name MLflow rejects is renamed, its bad characters replaced by '_'.
MLflow has no histogram type: histograms are not sent. Batches hold at most 1000 metrics (the
client's limit). The run is created lazily on the thread; ``run_id`` is set once it exists.

An unreachable tracking server: MLflow's client retries a refused connection for minutes by
default (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` = 7 with backoff factor 2, one urllib3 warning per
retry), so before its first call, and again after any failure, the sink checks that an ``http(s)``
tracking server answers at all (``GET /health``, any status, ``REACHABLE_TIMEOUT`` s). If not, the
write fails at once: one warning, records dropped and counted while the sink backs off. Those
environment variables are left as the user set them: they are process-wide, and MLflow's retries
are right for a server that is up but rate-limiting.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

from probes.sink import Histogram
from probes.sinks._base import ThreadedSink

MAX_METRICS_PER_BATCH = 1000
REACHABLE_TIMEOUT = 5.0
"""Seconds the reachability check waits to connect to, and hear from, the tracking server."""
_BAD = re.compile(r"[^/\w.\- :]")


def mlflow_key(k: str) -> str:
    """``k`` if MLflow accepts it, else with every disallowed character replaced by '_'."""
    k = _BAD.sub("_", k).strip("/")
    return k or "_"


class MLflowSink(ThreadedSink):
    def __init__(
        self,
        tracking_uri: str,
        experiment: str = "deltascope",
        run_name: str | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        run_id: str | None = None,
        queue_size: int = 1024,
    ) -> None:
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.params, self.tags = dict(params or {}), dict(tags or {})
        self.run_id = run_id
        self._client: Any = None
        self._started = False
        self._suspect = True  # check the server answers before handing a call to MLflow's retries
        super().__init__(queue_size)

    def warm(self) -> None:
        import mlflow.tracking  # noqa: F401

    def _start(self) -> Any:
        if self._suspect:
            _check_reachable(self.tracking_uri)
        if self._client is None:
            from mlflow.tracking import MlflowClient  # heavy import: on this thread

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        c = self._client
        if not self._started:
            if self.run_id is None:
                exp = c.get_experiment_by_name(self.experiment)
                exp_id = exp.experiment_id if exp is not None else c.create_experiment(
                    self.experiment, artifact_location=_artifact_location(self.tracking_uri))
                run = c.create_run(exp_id, run_name=self.run_name, tags=self.tags)
                self.run_id = run.info.run_id
            elif self.tags:
                from mlflow.entities import RunTag

                c.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in self.tags.items()])
            if self.params:
                from mlflow.entities import Param

                ps = [Param(mlflow_key(k), str(v)) for k, v in self.params.items()]
                for i in range(0, len(ps), 100):
                    c.log_batch(self.run_id, params=ps[i : i + 100])
            self._started = True
        return c

    def _write(self, step: int, scalars: dict[str, float], hists: dict[str, Histogram]) -> None:
        try:
            c = self._start()
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            ms = [Metric(mlflow_key(k), float(v), ts, step) for k, v in scalars.items()]
            for i in range(0, len(ms), MAX_METRICS_PER_BATCH):
                c.log_batch(self.run_id, metrics=ms[i : i + MAX_METRICS_PER_BATCH])
        except Exception:
            self._suspect = True
            raise
        self._suspect = False

    def _close(self) -> None:
        if self._started and self._client is not None:
            if self._suspect:  # the last call failed: no minutes of MLflow retries at close
                _check_reachable(self.tracking_uri)
            self._client.set_terminated(self.run_id)


def _check_reachable(tracking_uri: str) -> None:
    """Raise ConnectionError unless an ``http(s)`` tracking server answers; other URIs pass. Any
    HTTP status, a TLS error included, means something answers: MLflow's own call decides."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import requests  # MLflow's own transport: same proxies and CA bundle

    try:
        requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=REACHABLE_TIMEOUT).close()
    except requests.exceptions.SSLError:
        return
    except (requests.ConnectionError, requests.Timeout) as e:
        raise ConnectionError(f"MLflow tracking server {tracking_uri} unreachable: {type(e).__name__}") from e


def _artifact_location(tracking_uri: str) -> str | None:
    """Beside a ``sqlite:///`` database, artifacts go to ``mlartifacts/`` next to it; MLflow's
    default would be ``./mlruns`` of whatever directory the job was started from."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None  # a tracking server decides for itself
    from pathlib import Path

    return (Path(tracking_uri[len(prefix):]).resolve().parent / "mlartifacts").as_uri()
