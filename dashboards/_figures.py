"""The report's figures, one function per figure, each returning a matplotlib Figure.

Figures are built without pyplot (``Figure`` objects render to PNG through Agg on ``savefig``), so
a report neither needs a display nor changes the backend or the open figures of a caller's session.
Labels and units come from the stat catalogue, regime edges and rule thresholds from
``Thresholds``: a figure never restates a number. Sites are drawn in forward order (L0 attn, L0 mlp,
L1 attn, ...); layers are coloured by depth with one colormap throughout.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import matplotlib
import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import BoundaryNorm, ListedColormap, LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from dashboards._alerts import AlertReplay
from dashboards._runlog import RunLog
from server.catalogue import BY_NAME, SITES, key
from server.rules import AlertState, Severity
from server.thresholds import Thresholds

WIDTH = 7.0  # inches: the full text width of a two-column paper
STYLE = {
    "font.size": 8, "axes.titlesize": 8.5, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
    "legend.fontsize": 7, "legend.frameon": False, "axes.spines.top": False, "axes.spines.right": False,
    "axes.grid": False, "grid.color": "#dddddd", "grid.linewidth": 0.5, "lines.linewidth": 1.1,
    "figure.dpi": 150, "savefig.dpi": 150, "figure.facecolor": "white", "axes.titleweight": "bold",
    "image.interpolation": "nearest", "axes.axisbelow": True,
}
LAYER_CMAP = "viridis"
REGIMES = ("identity", "projection", "reflection", "negative")
SEVERITY_COLOR = {Severity.INFO: "#4c72b0", Severity.WARNING: "#dd8452", Severity.CRITICAL: "#c44e52"}
PENDING_COLOR = "#f3d9a4"
MAX_LEGEND_LAYERS = 8


@contextmanager
def style() -> Iterator[None]:
    """The report's matplotlib settings, without touching the caller's global rcParams."""
    with matplotlib.rc_context(STYLE):
        yield


def _subplots(nrows: int = 1, ncols: int = 1, **kw: Any) -> tuple[Figure, Any]:
    fig = Figure(figsize=kw.pop("figsize"), layout="constrained")
    return fig, fig.subplots(nrows, ncols, **kw)


def stat_label(stat: str, short: bool = False) -> str:
    """Axis label from the catalogue: the stat's name and unit (dimensionless stats have none)."""
    unit = BY_NAME[stat].unit
    return stat if short or unit == "1" else f"{stat} [{unit}]"


def regime_text(regime: str, th: Thresholds) -> str:
    """How a regime is defined, with the edges from ``th``."""
    return {
        "identity": f"identity (β < {th.identity_below:g})",
        "projection": f"projection (|β − 1| < {th.projection_band:g})",
        "reflection": f"reflection (β > {th.reflection_above:g})",
        "negative": "negative eigenvalue (β > 1)",
    }[regime]


def site_label(site: str, layer: int) -> str:
    return f"L{layer} {site}"


def _edges(x: np.ndarray) -> np.ndarray:
    """Cell edges around sorted centres, for pcolormesh on irregular steps."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 1:
        return np.array([x[0] - 0.5, x[0] + 0.5])
    mid = (x[:-1] + x[1:]) / 2
    return np.concatenate([[x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]])


def _layer_colors(layers: list[int]) -> dict[int, tuple]:
    cmap = colormaps[LAYER_CMAP]
    n = max(len(layers) - 1, 1)
    return {layer: cmap(0.9 * i / n) for i, layer in enumerate(layers)}


def _layer_key(fig: Figure, axes: np.ndarray, layers: list[int], colors: dict[int, tuple]) -> None:
    """A legend for a few layers, a discrete colorbar (the same colours) for many."""
    if len(layers) <= MAX_LEGEND_LAYERS:
        handles = [Line2D([], [], color=colors[layer], label=str(layer)) for layer in layers]
        fig.legend(handles=handles, title="layer", loc="outside right center", ncols=1)
        return
    cmap = ListedColormap([colors[layer] for layer in layers])
    sm = ScalarMappable(BoundaryNorm(np.arange(len(layers) + 1) - 0.5, len(layers)), cmap)
    cb = fig.colorbar(sm, ax=axes.ravel().tolist(), label="layer", fraction=0.03, pad=0.02)
    ticks = list(range(0, len(layers), max(1, len(layers) // 8)))
    cb.set_ticks(ticks, labels=[str(layers[i]) for i in ticks])


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} logged", ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


# -- (a) beta distribution across depth ---------------------------------------------------------------


def _checkpoints(steps: list[int]) -> list[int]:
    if not steps:
        return []
    picks = [steps[0], steps[len(steps) // 2], steps[-1]]
    return sorted(set(picks))


def _regime_lines(ax, th: Thresholds, beta_max: float, labels: bool) -> None:
    """Dashed regime edges; with ``labels``, each regime's name at the middle of its band."""
    for y in (th.identity_below, 1 - th.projection_band, 1 + th.projection_band, th.reflection_above):
        if 0 < y < beta_max:
            ax.axhline(y, color="0.25", lw=0.6, ls=(0, (3, 2)))
    if not labels:
        return
    bands = {"identity": (0.0, th.identity_below), "projection": (1 - th.projection_band, 1 + th.projection_band),
             "reflection": (th.reflection_above, beta_max)}
    for name, (lo, hi) in bands.items():
        if lo < beta_max:
            ax.annotate(name, (1, (lo + min(hi, beta_max)) / 2), xycoords=("axes fraction", "data"),
                        xytext=(3, 0), textcoords="offset points", va="center", fontsize=6.5, color="0.25")


def _site_axis(ax, sites: list[tuple[str, int]]) -> None:
    ax.set_xticks(range(len(sites)))
    if len(sites) <= 16:
        ax.set_xticklabels([site_label(s, layer) for s, layer in sites], rotation=90)
    else:  # many layers: one label per block, a tick per site
        ax.set_xticklabels([f"L{layer}" if s == SITES[0] else "" for s, layer in sites], rotation=90)
    ax.set_xlabel("site (forward order)")


def fig_beta_distribution(log: RunLog, th: Thresholds) -> Figure:
    sites, beta_max = log.sites(), log.beta_max
    hist_steps = sorted(log.hists)
    if hist_steps:
        return _beta_hist_heatmaps(log, th, sites, _checkpoints(hist_steps))
    q_steps = [s for s, rec in log.ordered_records() if any(key("beta_p50", *sl) in rec for sl in sites)]
    return _beta_quantile_bars(log, th, sites, _checkpoints(q_steps), beta_max)


def _beta_hist_heatmaps(log: RunLog, th: Thresholds, sites: list[tuple[str, int]], picks: list[int]) -> Figure:
    beta_max = log.beta_max
    fig, axes = _subplots(1, len(picks), figsize=(WIDTH, 3.3), sharey=True,
                             squeeze=False)
    norm = LogNorm(vmin=1e-4, vmax=1.0)
    cmap = colormaps["magma_r"].with_extremes(bad="white")
    mesh = None
    for j, (ax, step) in enumerate(zip(axes[0], picks, strict=True)):
        rec = log.hists[step]
        cols = []
        for site, layer in sites:
            c = rec.get(key("beta_hist", site, layer))
            cols.append(np.full(1, np.nan) if c is None else c / c.sum() if c.sum() > 0 else c * np.nan)
        nbins = max((c.size for c in cols), default=1)
        mat = np.full((nbins, len(sites)), np.nan)
        for i, c in enumerate(cols):
            if c.size == nbins:
                mat[:, i] = c
        mat = np.ma.masked_less_equal(np.ma.masked_invalid(mat), 0)
        y = np.linspace(0, beta_max, nbins + 1)
        mesh = ax.pcolormesh(np.arange(len(sites) + 1) - 0.5, y, mat, cmap=cmap, norm=norm)
        _regime_lines(ax, th, beta_max, labels=j == len(picks) - 1)
        ax.set_title(f"step {step}")
        _site_axis(ax, sites)
        ax.set_ylim(0, beta_max)
    axes[0, 0].set_ylabel("β")
    fig.colorbar(mesh, ax=axes[0].tolist(), label="fraction of tokens per bin", fraction=0.04, pad=0.01)
    fig.suptitle(f"β distribution across depth ({len(mat)} bins on [0, {beta_max:g}])", fontweight="bold")
    return fig


def _beta_quantile_bars(log: RunLog, th: Thresholds, sites: list[tuple[str, int]], picks: list[int],
                        beta_max: float) -> Figure:
    """Fallback for sources without histograms (MLflow): the logged quantiles as box-like glyphs."""
    fig, axes = _subplots(1, max(len(picks), 1), figsize=(WIDTH, 3.3), sharey=True,
                             squeeze=False)
    colors = dict(zip(SITES, ("#4c72b0", "#dd8452"), strict=True))
    for j, (ax, step) in enumerate(zip(axes[0], picks, strict=False)):
        rec = log.scalars[step]
        for i, (site, layer) in enumerate(sites):
            q = {p: rec.get(key(f"beta_{p}", site, layer), np.nan) for p in ("p01", "p10", "p50", "p90", "p99")}
            ax.vlines(i, q["p01"], q["p99"], color=colors[site], lw=0.8)
            ax.vlines(i, q["p10"], q["p90"], color=colors[site], lw=3.5)
            ax.plot(i, q["p50"], "o", color="white", mec=colors[site], ms=3.5, mew=1, clip_on=False)
        _regime_lines(ax, th, beta_max, labels=j == len(picks) - 1)
        ax.set_title(f"step {step}")
        _site_axis(ax, sites)
        ax.set_ylim(0, beta_max)
        ax.set_xlim(-0.6, len(sites) - 0.4)
    axes[0, 0].set_ylabel("β")
    glyphs = [Line2D([], [], ls="", marker="o", color="white", mec="0.3", ms=3.5, label="p50"),
              Line2D([], [], color="0.3", lw=3.5, label="p10–p90"),
              Line2D([], [], color="0.3", lw=0.8, label="p01–p99")]
    fig.legend(handles=[Patch(color=c, label=s) for s, c in colors.items()] + glyphs,
               loc="outside right center")
    fig.suptitle("β distribution across depth (logged quantiles; this source has no histograms)",
                 fontweight="bold")
    return fig


# -- (b) beta quantiles, layer x step ----------------------------------------------------------------------


def _beta_cmap(beta_max: float) -> str:
    # with beta in [0, 2] the midpoint is the projection beta = 1: a diverging map splits
    # identity-side (blue) from reflection-side (red); in [0, 1] there is no such midpoint
    return "RdBu_r" if beta_max > 1 else "viridis"


def _step_layer_grid(log: RunLog, stats: list[str], titles: list[str], norm: Normalize, cmap: str,
                     cbar_label: str, suptitle: str) -> Figure:
    layers = log.layers()
    row_h = min(max(0.95, 0.1 * len(layers) + 0.5), 2.0)
    fig, axes = _subplots(len(stats), len(SITES), figsize=(WIDTH, 0.6 + row_h * len(stats)), sharex=True,
                             sharey=True, squeeze=False)
    mesh = None
    for r, (stat, title) in enumerate(zip(stats, titles, strict=True)):
        for c, site in enumerate(SITES):
            ax = axes[r, c]
            steps, vals = log.grid(stat, site, layers)
            if steps.size == 0:
                _no_data(ax, stat)
                continue
            mesh = ax.pcolormesh(_edges(steps), _edges(np.arange(len(layers))), np.ma.masked_invalid(vals),
                                 cmap=cmap, norm=norm)
            ax.set_title(f"{site}: {title}", loc="left")
            ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
            if len(layers) > 12:
                ax.yaxis.set_major_locator(MaxNLocator(8, integer=True))
            if c == 0:
                ax.set_ylabel("layer")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    if mesh is not None:
        fig.colorbar(mesh, ax=axes.ravel().tolist(), label=cbar_label, fraction=0.04, pad=0.02)
    fig.suptitle(suptitle, fontweight="bold")
    return fig


def fig_beta_quantiles(log: RunLog, th: Thresholds) -> Figure:
    bm = log.beta_max
    stats = ["beta_p10", "beta_p50", "beta_p90"]
    titles = ["β p10", "β median (p50)", "β p90"]
    return _step_layer_grid(log, stats, titles, Normalize(0, bm), _beta_cmap(bm), "β",
                            "β quantiles per layer over training")


# -- (c) regime occupancy ------------------------------------------------------------------------------


def fig_regimes(log: RunLog, th: Thresholds) -> Figure:
    stats = [f"occ_{r}" for r in REGIMES]
    titles = [regime_text(r, th) for r in REGIMES]
    return _step_layer_grid(log, stats, titles, Normalize(0, 1), "viridis", "fraction of tokens",
                            "Regime occupancy per layer over training")


# -- (d) direction stability ------------------------------------------------------------------------------


def fig_direction(log: RunLog, th: Thresholds) -> Figure:
    present = log.stats()
    rows = ["h_norm_drift", "k_cos_step", "k_cos_token"] + (["k_cos_probe"] if "k_cos_probe" in present else [])
    layers = log.layers()
    colors = _layer_colors(layers)
    fig, axes = _subplots(len(rows), len(SITES), figsize=(WIDTH, 0.5 + 1.55 * len(rows)), sharex=True,
                             sharey="row", squeeze=False)
    for r, stat in enumerate(rows):
        for c, site in enumerate(SITES):
            ax = axes[r, c]
            ax.grid(True)
            drawn = False
            for layer in layers:
                s, v = log.series(key(stat, site, layer))
                if s.size:
                    ax.plot(s, v, color=colors[layer], label=str(layer))
                    drawn = True
            if not drawn:
                _no_data(ax, stat)
                continue
            if stat == "h_norm_drift":
                ax.set_yscale("log")
                f = th.k_norm_drift_factor
                for y in (f, 1 / f):
                    ax.axhline(y, color=SEVERITY_COLOR[Severity.WARNING], lw=0.8, ls="--")
            else:
                ax.set_ylim(0, 1.02)
                if stat in ("k_cos_step", "k_cos_probe"):
                    ax.axhline(th.k_instability_cos, color=SEVERITY_COLOR[Severity.WARNING], lw=0.8, ls="--")
            ax.set_title(f"{site}: {stat}", loc="left")
            if c == 0:
                ax.set_ylabel(stat_label(stat))
    for ax in axes[-1]:
        ax.set_xlabel("step")
    _layer_key(fig, axes, layers, colors)
    rule = Line2D([], [], color=SEVERITY_COLOR[Severity.WARNING], lw=0.8, ls="--",
                      label=f"fire thresholds: k_norm_drift ×{th.k_norm_drift_factor:g} and "
                            f"÷{th.k_norm_drift_factor:g}; k_direction_instability < {th.k_instability_cos:g}")
    fig.legend(handles=[rule], loc="outside lower center")
    fig.suptitle("Direction stability: ||h|| drift and sign-free cosines of k", fontweight="bold")
    return fig


# -- (e) alert timeline -----------------------------------------------------------------------------------


def fig_alerts(rep: AlertReplay, th: Thresholds) -> Figure:
    ids = rep.identities()
    span = max(rep.last_step - rep.first_step, 1)
    if not ids:
        fig, ax = _subplots(figsize=(WIDTH, 1.3))
        ax.set_xlim(rep.first_step, rep.last_step or 1)
        ax.set_yticks([])
        ax.set_xlabel("step")
        ax.text(0.5, 0.5, f"no alerts: every rule stayed inactive from step {rep.first_step} to {rep.last_step}",
                ha="center", va="center", transform=ax.transAxes)
        fig.suptitle("Alert timeline", fontweight="bold")
        return fig
    fig, ax = _subplots(figsize=(WIDTH, 0.9 + 0.28 * len(ids)))
    row = {ident: i for i, ident in enumerate(ids)}
    pad = span * 0.004  # a one-step span still shows
    for sp in rep.spans:
        y = row[sp.identity]
        width = max(sp.end - sp.start, 0) + pad
        if sp.state is AlertState.PENDING:
            ax.broken_barh([(sp.start, width)], (y - 0.3, 0.6), facecolor=PENDING_COLOR,
                           edgecolor=SEVERITY_COLOR[sp.severity], lw=0.6, hatch="////")
        else:
            ax.broken_barh([(sp.start, width)], (y - 0.3, 0.6), facecolor=SEVERITY_COLOR[sp.severity])
            if sp.open:
                ax.annotate("firing at end", (sp.end, y), xytext=(4, 0), textcoords="offset points",
                            va="center", fontsize=6, color=SEVERITY_COLOR[sp.severity])
    ax.set_yticks(range(len(ids)), [f"{rule}  {site_label(site, layer)}" for rule, site, layer in ids])
    ax.set_ylim(len(ids) - 0.5, -0.5)
    ax.set_xlim(rep.first_step, rep.last_step + span * 0.12)
    ax.set_xlabel("step")
    ax.grid(True, axis="x")
    handles = [Patch(facecolor=PENDING_COLOR, edgecolor="0.4", hatch="////", label="pending")]
    sev = sorted({sp.severity for sp in rep.spans}, key=list(Severity).index)
    handles += [Patch(facecolor=SEVERITY_COLOR[s], label=f"firing ({s})") for s in sev]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles))
    fig.suptitle(f"Alert timeline (for {th.for_evals} log steps to fire, {th.clear_evals} to resolve)",
                 fontweight="bold")
    return fig


# -- (f) loss ---------------------------------------------------------------------------------------------


def fig_loss(log: RunLog, th: Thresholds) -> Figure:
    fig, ax = _subplots(figsize=(WIDTH, 2.6))
    ax.grid(True)
    s, v = log.series("loss")
    drawn = []
    if s.size:
        drawn += ax.plot(s, v, color="#4c72b0", label="train loss")
    s, v = log.series("val_loss")
    if s.size:
        drawn += ax.plot(s, v, "o-", color="#c44e52", ms=3.5, label="val loss")
    if not drawn:
        _no_data(ax, "loss")
    else:
        ax.set_ylabel("cross-entropy [nats/token]")
        ax.set_xlabel("step")
    s, v = log.series("lr")
    if s.size:
        ax2 = ax.twinx()
        ax2.spines["right"].set_visible(True)
        drawn += ax2.plot(s, v, color="0.6", lw=0.8, ls="--", label="learning rate")
        ax2.set_ylabel("learning rate", color="0.45")
        ax2.tick_params(axis="y", colors="0.45")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if drawn:
        ax.legend(handles=drawn, loc="upper right")
    fig.suptitle("Loss", fontweight="bold")
    return fig
