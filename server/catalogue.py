"""The stat catalogue: every per-site statistic the probes emit, named once.

A metric key has one canonical form, stat first so TensorBoard groups layers:
``{stat}/{site}/L{layer:02d}``, e.g. ``beta_mean/attn/L03``. Prometheus gets the same data
with ``stat`` as the metric name and ``site`` and ``layer`` as labels. Probes, server, alert
rules and dashboards all read names, units and descriptions from here; nothing else spells them.

Torch-free on purpose: the server and the dashboards import it in a container without torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

SITES: tuple[str, ...] = ("attn", "mlp")
"""The two delta residuals of a block: around attention and around the MLP."""

Group = Literal["beta", "k", "update", "health"]


@dataclass(frozen=True)
class Stat:
    name: str
    group: Group
    unit: str
    doc: str
    sign_free: bool = False


STATS: tuple[Stat, ...] = (
    # beta: the gate, per token, in (0, beta_max)
    Stat("beta_mean", "beta", "1", "mean gate beta over the step's tokens"),
    Stat("beta_std", "beta", "1", "standard deviation of beta over the step's tokens"),
    Stat("beta_p01", "beta", "1", "1st percentile of beta, from the fixed-bin histogram"),
    Stat("beta_p10", "beta", "1", "10th percentile of beta, from the fixed-bin histogram"),
    Stat("beta_p50", "beta", "1", "median of beta, from the fixed-bin histogram"),
    Stat("beta_p90", "beta", "1", "90th percentile of beta, from the fixed-bin histogram"),
    Stat("beta_p99", "beta", "1", "99th percentile of beta, from the fixed-bin histogram"),
    Stat("occ_identity", "beta", "fraction", "share of tokens with beta in the identity regime"),
    Stat("occ_projection", "beta", "fraction", "share of tokens with beta in the projection band"),
    Stat("occ_reflection", "beta", "fraction", "share of tokens with beta in the reflection regime"),
    Stat("occ_negative", "beta", "fraction", "share of tokens with beta > 1 (negative eigenvalue)"),
    Stat("gate_logit_sat", "beta", "fraction", "share of tokens whose pre-sigmoid logit is saturated"),
    # k: the direction, k = h / sqrt(||h||^2 + eps^2) from the raw sublayer output h
    Stat("h_norm_mean", "k", "L2 norm", "mean raw norm ||h|| of the sublayer output"),
    Stat("h_norm_p01", "k", "L2 norm", "1st percentile of ||h||, from a log-spaced histogram"),
    Stat("h_norm_min", "k", "L2 norm", "smallest ||h|| of the step"),
    Stat("h_norm_max", "k", "L2 norm", "largest ||h|| of the step"),
    Stat("h_norm_drift", "k", "ratio", "h_norm_mean over its value at the first log step"),
    Stat("k_unit_err", "k", "1", "max | ||k|| - 1 | of the k actually used"),
    Stat("k_concentration", "k", "1", "||E[k]||: 1 when every token shares one direction"),
    Stat(
        "k_abs_concentration", "k", "1",
        "E[|k . m|] with m the mean direction: sign-free concentration", sign_free=True,
    ),
    Stat(
        "k_cos_step", "k", "cosine",
        "|cos| of the mean direction against the previous log step", sign_free=True,
    ),
    Stat("k_cos_token", "k", "cosine", "mean |cos| of k between adjacent tokens", sign_free=True),
    Stat(
        "k_cos_layer", "k", "cosine",
        "mean |cos| of k against the previous delta residual, same token", sign_free=True,
    ),
    Stat(
        "k_cos_probe", "k", "cosine",
        "mean |cos| of k on the fixed probe batch against its previous run", sign_free=True,
    ),
    # the update X' = X + beta k (v - k^T X)^T
    Stat("write_erase", "update", "ratio", "sum beta |v| / sum beta |k^T X|: write over erase"),
    Stat("update_ratio", "update", "ratio", "mean ||X' - X|| / ||X|| per token"),
    Stat("nonfinite", "health", "count", "non-finite values in beta, h or the update this step"),
)

STAT_NAMES: tuple[str, ...] = tuple(s.name for s in STATS)
BY_NAME: dict[str, Stat] = {s.name: s for s in STATS}

HISTOGRAMS: dict[str, str] = {
    "beta_hist": "counts of beta over BETA_BINS equal bins on [0, beta_max]",
    "h_norm_hist": "counts of log10 ||h|| over H_NORM_BINS equal bins on H_NORM_LOG10_RANGE",
}
BETA_BINS = 64
H_NORM_BINS = 64
H_NORM_LOG10_RANGE = (-8.0, 4.0)

_KEY = re.compile(r"^(?P<stat>[a-z0-9_]+)/(?P<site>attn|mlp)/L(?P<layer>\d{2,3})$")


def key(stat: str, site: str, layer: int) -> str:
    """Canonical metric key, e.g. ``key("beta_mean", "attn", 3) == "beta_mean/attn/L03"``."""
    return f"{stat}/{site}/L{layer:02d}"


@lru_cache(maxsize=65536)  # a run has a few thousand distinct keys; ingest parses each every step
def parse_key(k: str) -> tuple[str, str, int] | None:
    """Inverse of :func:`key`; None for a key that is not per-site (e.g. ``loss``)."""
    m = _KEY.match(k)
    if m is None:
        return None
    return m["stat"], m["site"], int(m["layer"])
