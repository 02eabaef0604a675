"""Host side of a log step: raw accumulator slots -> the catalogue's statistics.

Runs on the probe's host thread on a numpy copy of the device buffer: means and std from the
moments, quantiles by linear interpolation inside the fixed-bin histograms, regime fractions, and
the drift of ||h|| against the first log step that saw it (host state, kept here). A statistic with
no data this step (count 0, no previous value) is left out rather than reported as 0 or NaN.
"""

from __future__ import annotations

import math

import numpy as np

from probes._layout import BETA_HIST, H_HIST, K_SUM, MAX_SLOTS, SLOT, TINY, Layout
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


def hist_quantiles(counts: np.ndarray, lo: float, hi: float, qs: np.ndarray) -> np.ndarray:
    """:func:`hist_quantile` for many histograms and quantiles at once: ``counts`` (n, bins),
    ``qs`` (m,) -> (n, m), the same numbers (it runs on the probe's host thread every log step,
    where the per-histogram loop cost milliseconds of the training thread's GIL)."""
    counts = np.asarray(counts, dtype=np.float64)
    n, bins = counts.shape
    total = counts.sum(axis=1)  # (n,)
    cum = np.cumsum(counts, axis=1)
    target = qs[None, :] * total[:, None]  # (n, m)
    i = np.minimum((cum[:, None, :] < target[:, :, None]).sum(axis=2), bins - 1)  # searchsorted
    # first non-empty bin at or after each index (the last bin when none): skips empty bins
    ar = np.where(counts > 0, np.arange(bins), bins - 1)
    nxt = np.minimum.accumulate(ar[:, ::-1], axis=1)[:, ::-1]
    i = np.take_along_axis(nxt, i, axis=1)
    c = np.take_along_axis(counts, i, axis=1)
    below = np.take_along_axis(cum, i, axis=1) - c
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(c == 0, 0.0, np.clip((target - below) / c, 0.0, 1.0))
    out = lo + (i + frac) * ((hi - lo) / bins)
    out[~(total > 0)] = math.nan
    return out


_BETA_Q = np.array(list(QUANTILES.values()))
_REGIMES = ("identity", "projection", "reflection", "negative")


class Finisher:
    """Turns one log step's buffer into ``(scalars, hists)``; keeps the drift references.

    Vectorised over sites: one numpy expression per statistic for all sites, then one pass that
    names them; the per-site keys are built once.
    """

    def __init__(self, sites: list[tuple[str, int]], beta_max: float) -> None:
        self.sites = sites
        self.beta_max = beta_max
        self.first_h_mean: dict[int, float] = {}
        self._keys: dict[str, list[str]] = {}
        self.per_site: dict[tuple[str, int], dict[str, float]] = {}
        """The last :meth:`finish`'s statistics grouped by (site, layer), for the Detector."""
        self.prev_dir: np.ndarray | None = None  # (n_sites, d) each site's last mean direction of k
        self.prev_seen = np.zeros(len(sites), dtype=bool)

    def _cos_step(self, ksum: np.ndarray, seen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """|cos| between each site's mean direction of k now and at the last log step that saw the
        site: (values, where defined). Here on the host, from the sums of k that the buffer
        carries anyway (merged over ranks): no device op on the training thread."""
        m = ksum / np.maximum(np.linalg.norm(ksum, axis=1, keepdims=True), TINY)
        if self.prev_dir is None or self.prev_dir.shape != m.shape:
            self.prev_dir, self.prev_seen = np.zeros_like(m), np.zeros(len(m), dtype=bool)
        cos = np.minimum(np.abs((m * self.prev_dir).sum(axis=1)), 1.0)
        valid = self.prev_seen & seen
        self.prev_dir = np.where(seen[:, None], m, self.prev_dir)
        self.prev_seen = self.prev_seen | seen
        return cos, valid

    def _key(self, stat: str) -> list[str]:
        keys = self._keys.get(stat)
        if keys is None:
            keys = self._keys[stat] = [key(stat, site, layer) for site, layer in self.sites]
        return keys

    def finish(
        self, arr: np.ndarray, layout: Layout, scalar_names: list[str], world: int
    ) -> tuple[dict[str, float], dict[str, Histogram]]:
        scalars: dict[str, float] = {}
        for j, name in enumerate(scalar_names):  # device scalars: the mean over ranks
            scalars[name] = float(arr[layout.scalars + j]) / world
        hists: dict[str, Histogram] = {}
        self.per_site = {sl: {} for sl in self.sites}
        n_sites = len(self.sites)
        if n_sites == 0:
            return scalars, hists
        S = arr[: layout.scalars].reshape(n_sites, layout.width)
        mx = arr[layout.sum_end : layout.sum_end + n_sites * len(MAX_SLOTS)].reshape(n_sites, len(MAX_SLOTS))
        col = lambda name: S[:, SLOT[name]]  # noqa: E731
        stats: list[tuple[str, np.ndarray, np.ndarray]] = []  # (stat, values, where present)
        with np.errstate(divide="ignore", invalid="ignore"):
            n = col("n_beta")
            has = n > 0
            mean = col("beta_sum") / n
            stats.append(("beta_mean", mean, has))
            stats.append(("beta_std", np.sqrt(np.maximum(col("beta_sumsq") / n - mean * mean, 0.0)), has))
            beta_counts = S[:, BETA_HIST : BETA_HIST + BETA_BINS]
            qv = hist_quantiles(beta_counts, 0.0, self.beta_max, _BETA_Q)
            stats += [(stat, qv[:, j], has) for j, stat in enumerate(QUANTILES)]
            stats += [(f"occ_{r}", col(f"occ_{r}") / n, has) for r in _REGIMES]
            stats.append(("gate_logit_sat", col("logit_sat") / col("n_logit"), col("n_logit") > 0))
            n_h = col("n_h")
            has_h = n_h > 0
            h_mean = col("h_norm_sum") / n_h
            h_counts = S[:, H_HIST : H_HIST + H_NORM_BINS]
            lg = hist_quantiles(h_counts, *H_NORM_LOG10_RANGE, np.array([0.01]))[:, 0]
            drift = np.full(n_sites, math.nan)
            for i in np.flatnonzero(has_h):  # the first log step that saw a finite ||h|| is 1
                first = self.first_h_mean.get(int(i))
                if first is None and math.isfinite(h_mean[i]) and h_mean[i] > 0:
                    self.first_h_mean[int(i)] = first = float(h_mean[i])
                if first is not None:
                    drift[i] = h_mean[i] / first
            ksum_norm = np.linalg.norm(S[:, K_SUM : K_SUM + layout.d], axis=1)
            stats += [
                ("h_norm_mean", h_mean, has_h),
                ("h_norm_p01", 10.0**lg, has_h),
                ("h_norm_min", -mx[:, 1], has_h),
                ("h_norm_max", mx[:, 0], has_h),
                ("h_norm_drift", drift, has_h & ~np.isnan(drift)),
                ("k_unit_err", mx[:, 2], has_h),
                ("k_concentration", ksum_norm / n_h, has_h),
                ("k_abs_concentration", col("k_abs_sum") / n_h, has_h),
                ("k_cos_step", *self._cos_step(S[:, K_SUM : K_SUM + layout.d], has_h)),
                ("k_cos_token", col("k_cos_token_sum") / col("n_token_pair"), col("n_token_pair") > 0),
                ("k_cos_layer", col("k_cos_layer_sum") / col("n_layer_pair"), col("n_layer_pair") > 0),
                ("k_cos_probe", col("k_cos_probe_sum") / col("n_probe"), col("n_probe") > 0),
                ("update_ratio", col("update_sum") / col("n_update"), col("n_update") > 0),
                # no erase at all (beta = 0 everywhere): the ratio is undefined
                ("write_erase", col("write_num") / col("write_den"), col("write_den") > 0),
                ("nonfinite", col("nonfinite_beta") + col("nonfinite_h") + col("nonfinite_delta"),
                 has | has_h | (col("n_update") > 0)),
            ]
        per = [self.per_site[sl] for sl in self.sites]
        for stat, values, present in stats:
            keys, vals = self._key(stat), values.tolist()
            for i in np.flatnonzero(present).tolist():
                per[i][stat] = scalars[keys[i]] = vals[i]
        beta_keys, h_keys = self._key("beta_hist"), self._key("h_norm_hist")
        for i in np.flatnonzero(has).tolist():
            hists[beta_keys[i]] = Histogram(0.0, self.beta_max, tuple(beta_counts[i].tolist()))
        for i in np.flatnonzero(has_h).tolist():
            hists[h_keys[i]] = Histogram(*H_NORM_LOG10_RANGE, tuple(h_counts[i].tolist()))
        return scalars, hists
