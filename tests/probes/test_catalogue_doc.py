"""docs/METRICS.md is generated from the catalogue and committed as generated."""

from __future__ import annotations

from probes.catalogue_doc import PATH, render
from server.catalogue import HISTOGRAMS, STAT_NAMES


def test_committed_metrics_doc_is_the_rendered_one():
    assert PATH.read_text(encoding="utf-8") == render(), "run: python -m probes.catalogue_doc"


def test_one_row_per_metric_key():
    rows = [line for line in render().splitlines() if line.startswith("| `")]
    names = [r.split("`")[1].split("/")[0] for r in rows]
    assert names == [*STAT_NAMES, *HISTOGRAMS]
    assert all(r.count(" | ") == 3 for r in rows)  # pipes inside cells are escaped
