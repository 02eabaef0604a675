"""``deltascope report``: a run's figures (PNG) and one self-contained HTML page for an appendix.

Reads any sink's data into one form (``dashboards._runlog.RunLog``): the run directory's
``stats.jsonl`` or TensorBoard events, an MLflow run, or the deltascope server's JSON API. The alert
timeline replays the records through the shared ``server.rules.Detector``, so it shows what the
live job and the server would have raised. A user mistake raises :class:`ReportError`, whose message
is one line saying what to do.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dashboards._runlog import ReportError, RunLog, load_jsonl, load_tensorboard
from server.catalogue import BY_NAME, key
from server.thresholds import Thresholds

__all__ = ["FIGURES", "ReportError", "build_report", "log_report_to_mlflow", "main", "render",
           "report_from_mlflow", "report_from_server"]

FIGURES: dict[str, str] = {
    "beta_distribution": "β distribution across depth at the first, middle and last logged step: the share of "
                         "tokens per histogram bin for every site in forward order; dashed lines mark the "
                         "regime edges.",
    "beta_quantiles": "β p10, median and p90 per layer (rows) over training (columns), per site.",
    "regimes": "Share of tokens in each regime per layer over training; the negative-eigenvalue share "
               "(β > 1) contains the reflection share and half the projection band.",
    "direction": "Direction stability: mean ||h|| relative to its first logged value (log scale), and "
                 "sign-free cosines of k between successive log steps and between adjacent tokens, per layer.",
    "alerts": "Alert timeline: the detection rules replayed over the logged steps; hatched = pending, "
              "solid = firing.",
    "loss": "Training loss, validation loss and learning rate.",
}
SOURCES: dict[str, Callable[[Path], RunLog]] = {"jsonl": load_jsonl, "tensorboard": load_tensorboard}
REGIME_STATS = ("occ_identity", "occ_projection", "occ_reflection", "occ_negative")
CONFIG_FIRST = ("preset", "n_layer", "d_model", "d_v", "beta_max", "beta_init", "beta_fixed", "residual",
                "geometry", "value_head", "compressor", "params", "max_steps", "batch_size", "seq_len", "lr")


def build_report(run_dir: Path, out_dir: Path | None = None, source: str = "jsonl") -> Path:
    """Render the report of the run written by ``deltascope train --out run_dir``.

    ``source`` picks the sink to read: ``jsonl`` (``stats.jsonl``) or ``tensorboard`` (``tb/``).
    Writes the PNGs and ``report.html`` into ``out_dir`` (default ``run_dir/report``); returns the
    path of ``report.html``.
    """
    if source not in SOURCES:
        raise ReportError(f"unknown source {source!r}; use one of: {', '.join(SOURCES)}")
    run_dir = Path(run_dir)
    log = SOURCES[source](run_dir)
    return render(log, Path(out_dir) if out_dir is not None else run_dir / "report")


def report_from_mlflow(tracking_uri: str, run_id: str, out_dir: Path) -> Path:
    """The report of an MLflow run (id or run name), from its params and metric histories."""
    from dashboards._remote import load_mlflow

    return render(load_mlflow(tracking_uri, run_id), Path(out_dir))


def report_from_server(url: str, run_id: int | str, out_dir: Path) -> Path:
    """The report of a run stored by the deltascope server at ``url``, through its JSON API."""
    from dashboards._remote import load_server

    return render(load_server(url, run_id), Path(out_dir))


def log_report_to_mlflow(tracking_uri: str, run_name_or_id: str, report_dir: Path,
                         artifact_path: str = "report") -> str:
    """Attach a report directory (figures and HTML) to an MLflow run as artifacts; returns the run id."""
    from dashboards._remote import mlflow_client, resolve_mlflow_run

    report_dir = Path(report_dir)
    if not (report_dir / "report.html").is_file():
        raise ReportError(f"{report_dir} holds no report.html; build the report first (deltascope report RUN)")
    client = mlflow_client(tracking_uri)
    run_id = resolve_mlflow_run(client, tracking_uri, run_name_or_id)
    client.log_artifacts(run_id, str(report_dir), artifact_path)
    return run_id


def render(log: RunLog, out_dir: Path, thresholds: Thresholds | None = None) -> Path:
    """Draw every figure of ``log`` into ``out_dir`` and write ``report.html`` and ``report.json``."""
    from dashboards import _figures as F
    from dashboards._alerts import replay

    th = thresholds or Thresholds()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"cannot create the report directory {out_dir} ({e.strerror}); pick another --out") from None
    rep = replay(log, th)
    makers = {
        "beta_distribution": lambda: F.fig_beta_distribution(log, th),
        "beta_quantiles": lambda: F.fig_beta_quantiles(log, th),
        "regimes": lambda: F.fig_regimes(log, th),
        "direction": lambda: F.fig_direction(log, th),
        "alerts": lambda: F.fig_alerts(rep, th),
        "loss": lambda: F.fig_loss(log, th),
    }
    with F.style():
        for name, make in makers.items():
            fig = make()
            fig.savefig(out_dir / f"{name}.png", dpi=F.STYLE["savefig.dpi"])
    facts = _facts(log, rep)
    (out_dir / "report.json").write_text(json.dumps(facts, indent=2, default=_json_safe))
    page = out_dir / "report.html"
    page.write_text(_html(log, facts, th), encoding="utf-8")
    return page


# -- the numbers behind the tables ------------------------------------------------------------------------


def _json_safe(x: Any) -> Any:
    return str(x)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _facts(log: RunLog, rep: Any) -> dict[str, Any]:
    firing_at_end: dict[tuple[str, int], list[str]] = {}
    for sp in rep.spans:
        if sp.open and str(sp.state) == "firing":
            firing_at_end.setdefault((sp.site, sp.layer), []).append(sp.rule)
    layers = []
    for site, layer in log.sites():
        row: dict[str, Any] = {"site": site, "layer": layer}
        for stat in ("beta_p10", "beta_p50", "beta_p90", *REGIME_STATS, "h_norm_drift"):
            row[stat] = _finite(log.last(key(stat, site, layer)))
        row["firing"] = firing_at_end.get((site, layer), [])
        layers.append(row)
    steps = log.steps
    return {
        "run": log.name, "source": log.source, "beta_max": log.beta_max,
        "first_step": steps[0] if steps else None, "last_step": steps[-1] if steps else None,
        "log_steps": len(steps), "final_loss": _finite(log.last("loss")),
        "final_val_loss": _finite(log.last("val_loss")), "layers": layers, "alerts": rep.counts(),
        "transitions": [t.to_dict() for t in rep.transitions], "notes": log.notes,
    }


# -- HTML ---------------------------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.45 -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; color: #222; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.8em;
     border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.meta { color: #666; } .note { background: #fff6e0; border-left: 3px solid #dd8452; padding: 0.4em 0.8em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #e4e4e4; text-align: right; }
th { background: #f5f5f5; } td.l, th.l { text-align: left; }
tr.firing td { background: #fdecea; } td.zero { color: #aaa; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.92em; }
.cols { display: flex; gap: 2.5em; flex-wrap: wrap; align-items: flex-start; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _num(x: Any, fmt: str = ".3g") -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return format(x, fmt)
    return _e(x)


def _table(head: list[str], rows: list[list[str]], left: int = 1, row_class: list[str] | None = None) -> str:
    cls = lambda i: ' class="l"' if i < left else ""  # noqa: E731
    out = ["<table><thead><tr>", *(f"<th{cls(i)}>{h}</th>" for i, h in enumerate(head)), "</tr></thead><tbody>"]
    for r, row in enumerate(rows):
        rc = f' class="{row_class[r]}"' if row_class and row_class[r] else ""
        out.append(f"<tr{rc}>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(row)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _config_table(config: dict[str, Any]) -> str:
    first = [k for k in CONFIG_FIRST if k in config]
    rest = sorted(k for k in config if k not in first)
    rows = [[_e(k), _e(json.dumps(config[k]) if not isinstance(config[k], str) else config[k])]
            for k in first + rest]
    return _table(["config", "value"], rows, left=2) if rows else "<p class='meta'>no model config</p>"


def _html(log: RunLog, facts: dict[str, Any], th: Thresholds) -> str:
    from dashboards._figures import regime_text

    pct = lambda x: "–" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    run_rows = [
        ["log steps", f"{facts['log_steps']} (steps {facts['first_step']}–{facts['last_step']})"],
        ["final loss", _num(facts["final_loss"], ".4f")],
        ["final val_loss", _num(facts["final_val_loss"], ".4f")],
        ["β range", f"(0, {log.beta_max:g})"],
    ]
    for k in ("tokens_per_s", "stopped_by"):
        if k in log.summary:
            run_rows.append([_e(k), _num(log.summary[k], ".4g")])
    regimes = [s.removeprefix("occ_") for s in REGIME_STATS]
    layer_head = ["site", "layer", "β p10", "β p50", "β p90",
                  *(_e(regime_text(r, th)) for r in regimes), "||h|| drift", "firing at end"]
    layer_rows, layer_cls = [], []
    for row in facts["layers"]:
        layer_rows.append([_e(row["site"]), str(row["layer"]), _num(row["beta_p10"]), _num(row["beta_p50"]),
                           _num(row["beta_p90"]), *(pct(row[s]) for s in REGIME_STATS),
                           _num(row["h_norm_drift"]), _e(", ".join(row["firing"])) or "–"])
        layer_cls.append("firing" if row["firing"] else "")
    alert_rows, alert_cls = [], []
    for a in facts["alerts"]:
        cells = [str(a[c]) for c in ("pending", "fired", "resolved", "firing_at_end")]
        alert_rows.append([_e(a["rule"]), _e(a["severity"]),
                           *(f'<span class="zero">{c}</span>' if c == "0" else c for c in cells)])
        alert_cls.append("firing" if a["firing_at_end"] else "")
    n_fired = sum(a["fired"] for a in facts["alerts"])
    figures = "".join(
        f'<figure id="{name}"><img src="{name}.png" alt="{_e(name)}"><figcaption>{_e(cap)}</figcaption></figure>'
        for name, cap in FIGURES.items()
    )
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in facts["notes"])
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>deltascope report: {_e(log.name)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>
<body>
<h1>deltascope report: {_e(log.name)}</h1>
<p class="meta">source {_e(log.source)} · generated {generated}</p>
{notes}
<h2>Summary</h2>
<div class="cols"><div>{_table(["run", ""], run_rows, left=1)}</div><div>{_config_table(log.config)}</div></div>
<h2>Per layer, at the last logged step</h2>
{_table(layer_head, layer_rows, left=2, row_class=layer_cls)}
<p class="meta">β quantiles come from the fixed-bin histogram; occupancies are shares of tokens;
||h|| drift is {_e(BY_NAME["h_norm_drift"].doc)}.</p>
<h2>Alerts ({n_fired} fired)</h2>
{_table(["rule", "severity", "went pending", "fired", "resolved", "firing at end"], alert_rows, left=2,
        row_class=alert_cls)}
<p class="meta">Identities (rule, site, layer) per transition, replayed with the thresholds in force
(for {th.for_evals} log steps to fire, {th.clear_evals} to resolve).</p>
<h2>Figures</h2>
{figures}
</body></html>
"""


# -- command line ---------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deltascope report", description=__doc__.splitlines()[0],
        epilog="RUN is a run directory (deltascope train --out DIR). Without one, the run is read from "
               "--server URL (RUN or --run-id: the server's run id) or from --mlflow-uri URI (RUN or "
               "--run-id: an MLflow run id or name).")
    p.add_argument("run", nargs="?", metavar="RUN", help="run directory, or a run id with --server/--mlflow-uri")
    p.add_argument("--out", type=Path, help="report directory (default RUN/report, else ./report-<id>)")
    p.add_argument("--source", choices=tuple(SOURCES), default="jsonl",
                   help="which sink of a run directory to read (default jsonl)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI: the run's source when RUN is no directory")
    p.add_argument("--run-id", help="MLflow or server run id (MLflow: or run name); default RUN")
    p.add_argument("--server", help="deltascope server URL to read the run from")
    p.add_argument("--attach", action="store_true",
                   help="also log the report to the MLflow run (--mlflow-uri; --run-id, else RUN's name)")
    return p


def _run(a: argparse.Namespace) -> Path:
    is_dir = a.run is not None and Path(a.run).is_dir()
    rid = a.run_id or a.run
    if a.server and not is_dir:
        if not rid:
            raise ReportError("--server needs a run id: deltascope report ID --server URL")
        page = report_from_server(a.server, rid, a.out or Path(f"report-{rid}"))
    elif a.mlflow_uri and not is_dir:
        if not rid:
            raise ReportError("--mlflow-uri needs a run: deltascope report --mlflow-uri URI --run-id ID")
        page = report_from_mlflow(a.mlflow_uri, rid, a.out or Path(f"report-{rid}"))
    elif a.run is None:
        raise ReportError("name a run: deltascope report RUN (the --out DIR of deltascope train)")
    else:
        page = build_report(Path(a.run), a.out, a.source)
    if a.attach:
        if not a.mlflow_uri:
            raise ReportError("--attach needs --mlflow-uri URI (and --run-id unless RUN names the MLflow run)")
        log_report_to_mlflow(a.mlflow_uri, a.run_id or (Path(a.run).name if is_dir else a.run), page.parent)
    return page


def main(argv: list[str] | None = None) -> int:
    """``deltascope report``; returns the exit code (2 and one line on stderr for a user mistake)."""
    a = _parser().parse_args(argv)
    try:
        page = _run(a)
    except ReportError as e:
        print(f"deltascope: error: {e}", file=sys.stderr)
        return 2
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
