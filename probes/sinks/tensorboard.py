"""TensorBoardSink: scalars, fixed-bin histograms and a custom-scalars layout, from a thread.

Histograms go through ``add_histogram_raw`` straight from the device counts (no re-binning);
``h_norm_hist/...`` is in log10 ||h|| units. The custom-scalars layout (beta p10/p50/p90 bands,
regime occupancy, ||h|| drift) is generated from the catalogue by :func:`custom_scalars_layout`,
which dashboards reuse, and written once, at the first write that names the sites.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from typing import Any

from probes.sink import Histogram
from probes.sinks._base import ThreadedSink
from server.catalogue import BY_NAME, SITES, STAT_NAMES, key, parse_key

OCCUPANCY: tuple[str, ...] = tuple(n for n in STAT_NAMES if n.startswith("occ_"))
BAND = ("beta_p50", "beta_p10", "beta_p90")  # Margin charts take [value, lower, upper]


def custom_scalars_layout(sites: Iterable[tuple[str, int]]) -> dict[str, dict[str, list[Any]]]:
    """The TensorBoard custom-scalars layout for these (site, layer) pairs, as the dict that
    ``SummaryWriter.add_custom_scalars`` takes: {category: {chart title: [kind, [tags]]}}."""
    ordered = sorted(set(sites), key=lambda sl: (sl[1], SITES.index(sl[0])))
    assert all(s in BY_NAME for s in (*BAND, *OCCUPANCY, "h_norm_drift"))
    band = {
        f"beta p10/p50/p90 {site} L{layer:02d}": ["Margin", [key(s, site, layer) for s in BAND]]
        for site, layer in ordered
    }
    occupancy = {
        f"regime occupancy {site} L{layer:02d}": ["Multiline", [key(s, site, layer) for s in OCCUPANCY]]
        for site, layer in ordered
    }
    drift = {
        f"h_norm_drift {site}": ["Multiline", [key("h_norm_drift", s, layer) for s, layer in ordered
                                                if s == site]]
        for site in SITES
        if any(s == site for s, _ in ordered)
    }
    return {"deltascope beta": band, "deltascope occupancy": occupancy, "deltascope k drift": drift}


def histogram_raw(h: Histogram) -> dict[str, Any] | None:
    """``add_histogram_raw`` arguments for fixed-bin counts; None for an empty histogram. Values are
    taken at bin centres for sum and sum of squares; buckets trimmed to the support, with one
    empty bucket on the left carrying the left edge (TensorBoard stores right edges only)."""
    counts = [float(c) for c in h.counts]
    num = sum(counts)
    if not num > 0:
        return None
    edges = h.edges
    nz = [i for i, c in enumerate(counts) if c > 0]
    first, last = nz[0], nz[-1]
    centres = [(edges[i] + edges[i + 1]) / 2 for i in range(len(counts))]
    limits = edges[first : last + 2]  # left edge of the first bin, then right edges
    bucket = [0.0, *counts[first : last + 1]]
    return dict(
        min=edges[first], max=edges[last + 1], num=num,
        sum=sum(c * x for c, x in zip(counts, centres, strict=True)),
        sum_squares=sum(c * x * x for c, x in zip(counts, centres, strict=True)),
        bucket_limits=limits, bucket_counts=bucket,
    )


class TensorBoardSink(ThreadedSink):
    """A failed write (an unwritable logdir, a full disk) discards the SummaryWriter: its own
    writer thread keeps the first error and raises it on every later call, so a retry starts a
    fresh event file instead."""

    def __init__(self, logdir: str | os.PathLike[str], queue_size: int = 1024) -> None:
        self.logdir = str(logdir)
        self._writer: Any = None
        self._layout_written = False
        super().__init__(queue_size)

    def warm(self) -> None:
        import torch.utils.tensorboard  # noqa: F401

    def _w(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # 2 s import: on this thread

            self._writer = SummaryWriter(self.logdir)
        return self._writer

    def _write(self, step: int, scalars: dict[str, float], hists: dict[str, Histogram]) -> None:
        try:
            w = self._w()
            if not self._layout_written:
                sites = {(p[1], p[2]) for k in scalars if (p := parse_key(k)) is not None}
                if sites:
                    w.add_custom_scalars(custom_scalars_layout(sites))
                    self._layout_written = True
            for k, v in scalars.items():
                w.add_scalar(k, float(v), step)
            for k, h in hists.items():
                args = histogram_raw(h)
                if args is not None:
                    w.add_histogram_raw(k, global_step=step, **args)
        except Exception:
            self._discard()
            raise

    def _discard(self) -> None:
        w, self._writer = self._writer, None
        if w is not None:
            with contextlib.suppress(Exception):  # best effort: the write's own error is what counts
                w.close()

    def _flush(self) -> None:
        if self._writer is not None:
            try:
                self._writer.flush()
            except Exception:
                self._discard()
                raise

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
