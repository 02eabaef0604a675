"""Remote readers: an MLflow run's params and metric histories, and the deltascope server's JSON API,
each into a ``RunLog`` of the same form as a run directory gives.

MLflow keeps canonical keys unchanged (``beta_p50/attn/L03``) and no histograms, so its report draws
the logged quantiles instead of the histogram heatmap. The server keeps both; its history route
averages past ``max_points``, so long runs are read in step windows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from dashboards._runlog import ReportError, RunLog
from server.catalogue import BETA_BINS, SITES, STAT_NAMES, key

API = "/api/v1"
HISTORY_MAX = 10_000
"""Largest ``max_points`` the server's history route accepts."""
HISTOGRAM_MAX = 2_000
"""Largest ``max_points`` of its histogram route."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# -- MLflow ---------------------------------------------------------------------------------------------------


def mlflow_client(tracking_uri: str) -> Any:
    """A client for reading; a ``sqlite:///`` store that does not exist is an error, not a new
    empty database created as a side effect of a typo."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        if not db.is_file():
            raise ReportError(f"no MLflow database at {db}; check --mlflow-uri (deltascope train writes "
                              "sqlite:///<out parent>/mlflow.db)")
    from mlflow.tracking import MlflowClient  # heavy import (~3 s): only when asked

    return MlflowClient(tracking_uri=tracking_uri)


def resolve_mlflow_run(client: Any, tracking_uri: str, name_or_id: str) -> str:
    """The id of the MLflow run ``name_or_id``: a run id, else the newest run of that name."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(name_or_id).info.run_id
    except MlflowException:
        pass  # not an id: try it as a run name
    except Exception as e:
        raise ReportError(f"cannot read MLflow at {tracking_uri} ({_first_line(e)}); check --mlflow-uri") from None
    quote = '"' if "'" in name_or_id else "'"
    try:
        exps = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(exps, filter_string=f"tags.mlflow.runName = {quote}{name_or_id}{quote}",
                                  order_by=["attributes.start_time DESC"], max_results=1) if exps else []
    except Exception as e:
        raise ReportError(f"cannot search MLflow at {tracking_uri} ({_first_line(e)}); check --mlflow-uri") from None
    if not runs:
        raise ReportError(f"no MLflow run with id or name {name_or_id!r} at {tracking_uri}; "
                          f"check --run-id (mlflow runs list --experiment-id ID lists them)")
    return runs[0].info.run_id


def _param(v: str) -> Any:
    """MLflow params are strings (``str(v)`` of the job's config): numbers and JSON come back typed."""
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return {"None": None, "True": True, "False": False}.get(v, v)


def load_mlflow(tracking_uri: str, run_id: str) -> RunLog:
    client = mlflow_client(tracking_uri)
    rid = resolve_mlflow_run(client, tracking_uri, run_id)
    try:
        run = client.get_run(rid)
        log = RunLog(name=run.info.run_name or rid, source=f"MLflow {tracking_uri} run {rid}",
                     config={k: _param(v) for k, v in run.data.params.items()})
        for k in sorted(run.data.metrics):
            for m in client.get_metric_history(rid, k):
                log.add(int(m.step), k, float(m.value))
    except ReportError:
        raise
    except Exception as e:
        raise ReportError(f"cannot read MLflow run {rid} at {tracking_uri} ({_first_line(e)})") from None
    if not log.scalars:
        raise ReportError(f"MLflow run {rid} has no metrics yet; report again after its first log step")
    if "beta_max" not in log.config:
        log.notes.append(f"the MLflow run has no beta_max param: assumed {log.beta_max:g}")
    log.notes.append("MLflow keeps no histograms: the β distribution figure shows the logged quantiles")
    return log


# -- the deltascope server ------------------------------------------------------------------------------------


class _Api:
    def __init__(self, url: str) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url + API, timeout=30.0)
        self._httpx = httpx

    def get(self, path: str, optional: bool = False, **params: Any) -> Any:
        """GET ``API + path``; None for a missing route when ``optional``, else ReportError."""
        try:
            r = self.http.get(path, params={k: v for k, v in params.items() if v is not None})
        except self._httpx.HTTPError as e:
            raise ReportError(f"cannot reach the deltascope server at {self.url} ({_first_line(e)}); "
                              f"start it (deltascope serve) or check --server") from None
        detail = _detail(r)
        if r.status_code == 404 and detail in ("Not Found", ""):  # the framework's answer: no such route
            if optional:
                return None
            raise ReportError(f"{self.url} has no GET {API}{path.split('?')[0]} route (HTTP 404): not a "
                              f"deltascope server of this version; upgrade it or report from the run directory")
        if r.status_code == 404:
            raise ReportError(f"{self.url}: {detail}; list the runs at {self.url}{API}/runs")
        if r.status_code != 200:
            raise ReportError(f"{self.url}{API}{path} answered HTTP {r.status_code}: {detail or r.reason_phrase}")
        try:
            return r.json()
        except ValueError:
            raise ReportError(f"{self.url}{API}{path} did not answer JSON; is --server a deltascope server?") from None

    def close(self) -> None:
        self.http.close()


def _detail(r: Any) -> str:
    try:
        body = r.json()
    except ValueError:
        return ""
    return str(body.get("detail", "")) if isinstance(body, dict) else ""


def _resolve_server_run(api: _Api, run: int | str) -> int:
    if str(run).isdigit():
        return int(run)
    listing = api.get("/runs", limit=1000)
    for r in listing.get("data", []):  # newest first
        if r.get("name") == run:
            return int(r["id"])
    raise ReportError(f"no run named {run!r} on {api.url}; pass its id (listed at {api.url}{API}/runs)")


def _history(api: _Api, rid: int, log: RunLog, name: str, stat: str, site: str | None, layer: int | None) -> None:
    """Every point of one stat; a downsampled answer is fetched again in step windows."""
    page = api.get(f"/runs/{rid}/history", stat=stat, site=site, layer=layer, max_points=HISTORY_MAX)
    points = page.get("points", [])
    if page.get("downsampled") and points:
        last = int(points[-1]["step"])
        windows = 2 * math.ceil(int(page.get("total", 0)) / HISTORY_MAX)
        width = max(1, math.ceil((last + 1) / windows))
        points, coarse = [], False
        for lo in range(0, last + 1, width):
            part = api.get(f"/runs/{rid}/history", stat=stat, site=site, layer=layer, max_points=HISTORY_MAX,
                           since_step=lo, until_step=lo + width - 1)
            points += part.get("points", [])
            coarse = coarse or bool(part.get("downsampled"))
        if coarse:
            log.notes.append(f"{name}: the server averaged some steps (more than {HISTORY_MAX} points per window)")
    for p in points:
        log.add(int(p["step"]), name, p.get("value"))


def _rebin(counts: list[float], lo: float, hi: float, beta_max: float) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64)
    if math.isclose(lo, 0.0, abs_tol=1e-12) and math.isclose(hi, beta_max) and c.size == BETA_BINS:
        return c
    centres = lo + (np.arange(c.size) + 0.5) * (hi - lo) / c.size
    idx = np.clip((centres / beta_max * BETA_BINS).astype(int), 0, BETA_BINS - 1)
    out = np.zeros(BETA_BINS)
    np.add.at(out, idx, c)
    return out


def load_server(url: str, run: int | str) -> RunLog:
    api = _Api(url)
    try:
        rid = _resolve_server_run(api, run)
        meta = api.get(f"/runs/{rid}")
        config = dict(meta.get("config") or {})
        if meta.get("beta_max") is not None:
            config["beta_max"] = meta["beta_max"]
        log = RunLog(name=str(meta.get("name", rid)), source=f"deltascope server {api.url} run {rid}", config=config)
        layers = api.get(f"/runs/{rid}/layers", optional=True)
        if layers is not None:
            per_site = [(x["site"], int(x["layer"]), sorted(x.get("stats", {}))) for x in layers.get("layers", [])]
            run_wide = sorted(layers.get("scalars", {}))
        else:  # an older server: ask for every stat of every site the config implies
            n_layer = int(config.get("n_layer", 0))
            per_site = [(s, layer, list(STAT_NAMES)) for layer in range(n_layer) for s in SITES]
            run_wide = ["loss", "val_loss", "lr"]
        for name in run_wide:
            _history(api, rid, log, name, name, None, None)
        for site, layer, stats in per_site:
            for stat in stats:
                _history(api, rid, log, key(stat, site, layer), stat, site, layer)
            hist = api.get(f"/runs/{rid}/histograms", optional=True, site=site, layer=layer,
                           stat="beta_hist", max_points=HISTOGRAM_MAX)
            for p in (hist or {}).get("points", []):
                log.hists.setdefault(int(p["step"]), {})[key("beta_hist", site, layer)] = _rebin(
                    p["counts"], float(p["lo"]), float(p["hi"]), log.beta_max)
    finally:
        api.close()
    if not log.scalars:
        raise ReportError(f"run {rid} on {api.url} has no stats yet; report again after its first log step")
    return log
