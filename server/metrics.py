"""Prometheus exposition: the latest probe stats of every run, plus the server's own counters.

``StatsCollector`` is pull-based: each scrape reads the runs' latest values from the store, so
nothing is counted twice. A canonical key ``beta_p90/attn/L03`` becomes the sample
``deltascope_beta_p90{run="7",run_name="...",site="attn",layer="3"}``; a run-wide scalar such as
``loss`` becomes ``deltascope_loss{run="7",run_name="..."}``. Each app owns its registry.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.catalogue import BY_NAME, parse_key
from server.store import Store

PREFIX = "deltascope_"
_RESERVED = ("ingest_", "alerts_", "alert_", "run_", "webhook_", "sse_")


@lru_cache(maxsize=65536)
def _family(key: str) -> tuple[str, str, str] | None:
    """(metric name, site, layer) for a key; site and layer empty for run-wide scalars."""
    parsed = parse_key(key)
    if parsed is not None:
        stat, site, layer = parsed
        return PREFIX + stat, site, str(layer)
    name = re.sub(r"[^a-zA-Z0-9_]", "_", key)
    if name.startswith(_RESERVED) or name in BY_NAME:
        return None  # would collide with a server metric or a per-site family
    return PREFIX + name, "", ""


class StatsCollector(Collector):
    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        runs, firing = self.store.snapshot()
        fams: dict[str, GaugeMetricFamily] = {}
        last = GaugeMetricFamily(PREFIX + "run_last_step", "Highest step ingested per run",
                                 labels=["run", "run_name"])
        healthy = GaugeMetricFamily(PREFIX + "run_verdict",
                                    "Run verdict: 0 healthy, 1 warning, 2 failing",
                                    labels=["run", "run_name"])
        beta_max = GaugeMetricFamily(PREFIX + "run_beta_max",
                                     "The run's gate ceiling (beta in (0, beta_max)); saturation alerts compare to it",
                                     labels=["run", "run_name"])
        names: dict[int, str] = {}
        for run in runs:
            rid, name = str(run.id), run.name
            names[run.id] = name
            if run.last_step is not None:
                last.add_metric([rid, name], run.last_step)
            healthy.add_metric([rid, name], {"healthy": 0, "warning": 1, "failing": 2}[run.verdict])
            beta_max.add_metric([rid, name], run.beta_max)
            for key, (_step, value) in (run.latest or {}).items():
                fam = _family(key)
                if fam is None:
                    continue
                metric, site, layer = fam
                if metric not in fams:
                    stat = BY_NAME.get(metric[len(PREFIX):])
                    doc = f"{stat.doc} ({stat.unit})" if stat else f"run scalar {key}"
                    labels = ["run", "run_name", "site", "layer"] if site else ["run", "run_name"]
                    fams[metric] = GaugeMetricFamily(metric, doc, labels=labels)
                fams[metric].add_metric([rid, name, site, layer] if site else [rid, name], value)
        alerts = GaugeMetricFamily(PREFIX + "alerts_firing", "Firing alerts per run, rule, severity",
                                   labels=["run", "run_name", "rule", "severity"])
        for run_id, rule, severity, n in firing:
            alerts.add_metric([str(run_id), names.get(run_id, ""), rule, severity], n)
        yield last
        yield healthy
        yield beta_max
        yield alerts
        yield from fams.values()


class ServerMetrics:
    """The server's counters, registered with the app's registry next to the stats collector."""

    def __init__(self, store: Store) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatsCollector(store))
        r = self.registry
        self.batches = Counter(PREFIX + "ingest_batches", "Stats batches by result",
                               ["result"], registry=r)
        self.records = Counter(PREFIX + "ingest_records", "Log steps stored", registry=r)
        self.points = Counter(PREFIX + "ingest_points", "Scalar points stored", registry=r)
        self.seconds = Histogram(PREFIX + "ingest_seconds", "Seconds to store a batch (one database transaction)",
                                 registry=r, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.transitions = Counter(PREFIX + "alert_transitions", "Alert transitions by rule and state",
                                   ["rule", "state"], registry=r)
        self.webhooks = Counter(PREFIX + "webhook_deliveries", "Webhook delivery attempts by result",
                                ["result"], registry=r)
