"""Host side of a log step: raw accumulator slots -> the catalogue's statistics.

Runs on the probe's host thread on a numpy copy of the device buffer: means and std from the
moments, quantiles by linear interpolation inside the fixed-bin histograms, regime fractions, and
the drift of ||h|| against the first log step that saw it (host state, kept here). A statistic with
no data this step (count 0, no previous value) is left out rather than reported as 0 or NaN.
"""

from __future__ import annotations

import math

import numpy as np

from probes._layout import BETA_HIST, H_HIST, K_SUM, MAX_SLOTS, SLOT, Layout
from probes.sink import Histogram
from server.catalogue import BETA_BINS, H_NORM_BINS, H_NORM_LOG10_RANGE, key

QUANTILES = {"beta_p01": 0.01, "beta_p10": 0.10, "beta_p50": 0.50, "beta_p90": 0.90, "beta_p99": 0.99}


def hist_quantile(counts: np.ndarray, lo: float, hi: float, q: float) -> float:
    """The q-quantile of the values binned in ``counts`` (equal bins on [lo, hi]), assuming values
    spread uniformly inside a bin; NaN for an empty histogram."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if not total > 0:
        return math.nan
    cum = np.cumsum(counts)
    target = q * total
    i = int(np.searchsorted(cum, target, side="left"))
    i = min(i, len(counts) - 1)
    while counts[i] == 0 and i < len(counts) - 1:  # q = 0 lands on an empty leading bin
        i += 1
    below = cum[i] - counts[i]
    frac = 0.0 if counts[i] == 0 else min(max((target - below) / counts[i], 0.0), 1.0)
    width = (hi - lo) / len(counts)
    return lo + (i + frac) * width


class Finisher:
    """Turns one log step's buffer into ``(scalars, hists)``; keeps the drift references."""

    def __init__(self, sites: list[tuple[str, int]], beta_max: float) -> None:
        self.sites = sites
        self.beta_max = beta_max
        self.first_h_mean: dict[int, float] = {}

    def finish(
        self, arr: np.ndarray, layout: Layout, scalar_names: list[str], world: int
    ) -> tuple[dict[str, float], dict[str, Histogram]]:
        scalars: dict[str, float] = {}
        for j, name in enumerate(scalar_names):  # device scalars: the mean over ranks
            scalars[name] = float(arr[layout.scalars + j]) / world
        hists: dict[str, Histogram] = {}
        for i, (site, layer) in enumerate(self.sites):
            s = arr[layout.site(i) : layout.site(i) + layout.width]
            mx = arr[layout.max_(i) : layout.max_(i) + len(MAX_SLOTS)]
            out = self._site(i, s, mx, layout.d)
            scalars.update({key(stat, site, layer): v for stat, v in out.items()})
            if s[SLOT["n_beta"]] > 0:
                hists[key("beta_hist", site, layer)] = Histogram(
                    0.0, self.beta_max, tuple(float(c) for c in s[BETA_HIST : BETA_HIST + BETA_BINS])
                )
            if s[SLOT["n_h"]] > 0:
                hists[key("h_norm_hist", site, layer)] = Histogram(
                    *H_NORM_LOG10_RANGE, tuple(float(c) for c in s[H_HIST : H_HIST + H_NORM_BINS])
                )
        return scalars, hists

    def _site(self, i: int, s: np.ndarray, mx: np.ndarray, d: int) -> dict[str, float]:
        g = lambda name: float(s[SLOT[name]])  # noqa: E731
        out: dict[str, float] = {}
        n = g("n_beta")
        if n > 0:
            mean = g("beta_sum") / n
            out["beta_mean"] = mean
            out["beta_std"] = math.sqrt(max(g("beta_sumsq") / n - mean * mean, 0.0))
            counts = s[BETA_HIST : BETA_HIST + BETA_BINS]
            for stat, q in QUANTILES.items():
                out[stat] = hist_quantile(counts, 0.0, self.beta_max, q)
            for regime in ("identity", "projection", "reflection", "negative"):
                out[f"occ_{regime}"] = g(f"occ_{regime}") / n
        if g("n_logit") > 0:
            out["gate_logit_sat"] = g("logit_sat") / g("n_logit")
        n_h = g("n_h")
        if n_h > 0:
            h_mean = g("h_norm_sum") / n_h
            out["h_norm_mean"] = h_mean
            lg = hist_quantile(s[H_HIST : H_HIST + H_NORM_BINS], *H_NORM_LOG10_RANGE, 0.01)
            out["h_norm_p01"] = 10.0**lg
            out["h_norm_min"] = -float(mx[1])
            out["h_norm_max"] = float(mx[0])
            first = self.first_h_mean.get(i)
            if first is None and math.isfinite(h_mean) and h_mean > 0:
                self.first_h_mean[i] = first = h_mean
            if first is not None:
                out["h_norm_drift"] = h_mean / first
            out["k_unit_err"] = float(mx[2])
            out["k_concentration"] = float(np.linalg.norm(s[K_SUM : K_SUM + d])) / n_h
            out["k_abs_concentration"] = g("k_abs_sum") / n_h
        if g("k_cos_step_valid") > 0:
            out["k_cos_step"] = g("k_cos_step")
        if g("n_token_pair") > 0:
            out["k_cos_token"] = g("k_cos_token_sum") / g("n_token_pair")
        if g("n_layer_pair") > 0:
            out["k_cos_layer"] = g("k_cos_layer_sum") / g("n_layer_pair")
        if g("n_probe") > 0:
            out["k_cos_probe"] = g("k_cos_probe_sum") / g("n_probe")
        if g("n_update") > 0:
            out["update_ratio"] = g("update_sum") / g("n_update")
        if g("write_den") > 0:  # no erase at all (beta = 0 everywhere): the ratio is undefined
            out["write_erase"] = g("write_num") / g("write_den")
        if n > 0 or n_h > 0 or g("n_update") > 0:
            out["nonfinite"] = g("nonfinite_beta") + g("nonfinite_h") + g("nonfinite_delta")
        return out
