"""``python -m dashboards.generate deploy/``: write the Grafana and Prometheus files from the sources.

Everything under ``deploy/`` is generated from the stat catalogue, the thresholds (read from the
environment like everywhere else: ``DELTASCOPE_THRESHOLDS__*``) and the detection rules. The
committed files use the defaults; a test regenerates them and fails on any drift. ``--check``
compares without writing (exit 1 and the stale paths when they differ).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dashboards import grafana, prometheus
from server.thresholds import Thresholds

INTERVAL_S = 15
"""Default scrape and evaluation interval (seconds); one interval stands in for one log step."""


def render_all(interval_s: int = INTERVAL_S, target: str = "deltascope:8765",
               prometheus_url: str = "http://prometheus:9090", beta_max: float = 2.0,
               thresholds: Thresholds | None = None) -> dict[str, str]:
    """Relative path -> file content of every generated file."""
    th = thresholds or Thresholds()
    return {
        "grafana/deltascope.json": grafana.dashboard_json(th, beta_max),
        "grafana/provisioning/datasources/deltascope.yml": grafana.datasource_provisioning(prometheus_url, interval_s),
        "grafana/provisioning/dashboards/deltascope.yml": grafana.dashboard_provisioning(),
        "prometheus/prometheus.yml": prometheus.dump(prometheus.scrape_config(interval_s, target)),
        "prometheus/alerts.yml": prometheus.dump(prometheus.alert_rules(th, interval_s)),
    }


def stale(out: Path, files: dict[str, str]) -> list[str]:
    """Paths under ``out`` whose content differs from ``files`` (or that are missing)."""
    return [rel for rel, text in files.items()
            if not (out / rel).is_file() or (out / rel).read_text(encoding="utf-8") != text]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dashboards.generate", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, nargs="?", default=Path("deploy"), help="output directory (default deploy)")
    p.add_argument("--interval", type=int, default=INTERVAL_S,
                   help=f"scrape/evaluation interval in seconds, about one log step (default {INTERVAL_S})")
    p.add_argument("--target", default="deltascope:8765", help="host:port of the deltascope server to scrape")
    p.add_argument("--prometheus-url", default="http://prometheus:9090", help="Prometheus URL for Grafana")
    p.add_argument("--beta-max", type=float, default=2.0,
                   help="beta range of the Grafana dashboard's β panels (default 2.0; alerts use each run's own)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the files differ")
    a = p.parse_args(argv)
    if a.interval < 1:
        p.error("--interval must be at least 1 second")
    files = render_all(a.interval, a.target, a.prometheus_url, a.beta_max)
    if a.check:
        bad = stale(a.out, files)
        for rel in bad:
            print(f"stale: {a.out / rel}", file=sys.stderr)
        return 1 if bad else 0
    for rel, text in files.items():
        path = a.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
