"""``deltascope experiment SPEC``: run every variant x seed of a spec, then compare them.

A spec (TOML or YAML, a file or a built-in name in ``ddl/specs``) names a preset, a step budget,
seeds, the probes' interval, shared ``train`` settings (TrainConfig fields; ``overrides`` there
are model fields every variant shares) and ``[variants.NAME]`` tables of DDLConfig overrides.
Runs go one after another into OUT/VARIANT-seedS, or with ``--devices cuda:0,cuda:1`` one worker
process per listed device (a device may be listed twice to share it); a run whose summary.json
exists is skipped, so a second invocation resumes. ``--only`` restricts a call to some variants.
OUT/comparison.md and OUT/comparison.json hold per-variant losses, throughput, alert counts by
rule, per-layer final beta medians and regime occupancy, and beta, ||h|| and k-cosine per layer
over training; the figures sit beside them.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import tomllib
from collections import defaultdict
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

log = logging.getLogger(__name__)

REGIMES = ("identity", "projection", "reflection", "negative")
SERIES = ("beta_p50", "h_norm_drift", "k_cos_step")
"""Per-layer stats the comparison keeps over training (mean over seeds at the steps all share)."""
MANAGED = ("preset", "out", "max_steps", "seed", "every", "probes", "resume")
"""TrainConfig fields the experiment sets itself; a spec's ``train`` table may not name them."""
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
_SITE_KEY = re.compile(r"^(?P<stat>[a-z0-9_]+)/(?P<site>[^/]+)/L(?P<layer>\d+)$")


class SpecError(Exception):
    """A user mistake in a spec or its name: one line, no traceback."""


class Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    """Experiment name; the default output directory is runs/experiments/<name>."""
    description: str = ""
    """What the experiment asks; copied into comparison.md."""
    preset: str
    """Model preset (ddl.presets) every variant starts from."""
    steps: int = Field(ge=1)
    """Optimizer steps per run (``--steps`` overrides)."""
    seeds: list[int] = Field(min_length=1)
    """Seeds; every variant runs once per seed."""
    every: int = Field(ge=1)
    """Probe statistics every N steps."""
    train: dict[str, Any] = Field(default_factory=dict)
    """Shared TrainConfig fields (batch_size, seq_len, lr, vocab_size, ...); ``overrides`` here
    are model fields shared by every variant, under each variant's own."""
    variants: dict[str, dict[str, Any]] = Field(min_length=1)
    """Variant name -> DDLConfig overrides."""

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds repeat: {v}")
        return v

    @field_validator("train")
    @classmethod
    def _train_fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        from ddl.train_config import TrainConfig

        for k in v:
            if k in MANAGED:
                raise ValueError(f"{k} is set by the experiment (use the spec's top-level fields)")
            if k not in TrainConfig.model_fields:
                raise ValueError(f"{k}: not a TrainConfig field")
        try:
            TrainConfig(**v)
        except ValidationError as e:
            raise ValueError(_one_line(e)) from None
        return v

    @model_validator(mode="after")
    def _check(self) -> Spec:
        from ddl.config import presets, with_overrides

        if self.preset not in presets:
            raise ValueError(f"preset: unknown preset {self.preset!r}; choose one of {', '.join(presets)}")
        common = self.train.get("overrides", {})
        for name, ov in self.variants.items():
            if not _NAME.match(name):
                raise ValueError(f"variants.{name}: variant names may hold letters, digits and _.+- only")
            try:
                with_overrides(presets[self.preset], **{**common, **ov})
            except ValidationError as e:
                raise ValueError(f"variants.{name}.{_one_line(e)}") from None
        return self

    def overrides(self, variant: str) -> dict[str, Any]:
        return {**self.train.get("overrides", {}), **self.variants[variant]}


def _one_line(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ").replace("\n", " ")
    return f"{where}: {msg}" if where else msg


def _specs_dir():
    return resources.files("ddl").joinpath("specs")


def builtin_specs() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in _specs_dir().iterdir()
                  if p.name.endswith(".toml"))


def load_spec(ref: str | Path) -> Spec:
    """A spec from a file path (.toml, .yaml, .yml) or a built-in name; SpecError on any mistake."""
    path = Path(ref)
    if path.is_file():
        text, where = path.read_text(encoding="utf-8"), str(path)
        suffix = path.suffix.lower()
    elif str(ref) in builtin_specs():
        text = _specs_dir().joinpath(f"{ref}.toml").read_text(encoding="utf-8")
        where, suffix = f"built-in spec {ref}", ".toml"
    else:
        raise SpecError(f"no spec file or built-in spec named {str(ref)!r}; built-ins: {', '.join(builtin_specs())}")
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        else:
            raise SpecError(f"{where}: a spec is a .toml, .yaml or .yml file")
    except (tomllib.TOMLDecodeError, ValueError) as e:  # yaml.YAMLError is no ValueError: below
        raise SpecError(f"{where}: not valid {suffix[1:].upper()}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # noqa: BLE001 (yaml.YAMLError; yaml is imported lazily)
        if type(e).__module__.startswith("yaml"):
            raise SpecError(f"{where}: not valid YAML: {' '.join(str(e).split())}") from None
        raise
    if not isinstance(data, dict):
        raise SpecError(f"{where}: a spec is a table of fields (name, preset, steps, seeds, every, variants)")
    try:
        return Spec.model_validate(data)
    except ValidationError as e:
        raise SpecError(f"{where}: {_one_line(e)}") from None


# ---- running ---------------------------------------------------------------------------------


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return Path(out) / f"{variant}-seed{seed}"


def train_config(spec: Spec, out: Path, variant: str, seed: int, steps: int | None = None,
                 device: str | None = None):
    from ddl.train_config import TrainConfig

    extra = {k: v for k, v in spec.train.items() if k != "overrides"}
    if device is not None:
        extra["device"] = device
    return TrainConfig(**extra, preset=spec.preset, overrides=spec.overrides(variant),
                       out=run_dir(out, variant, seed), max_steps=steps or spec.steps, seed=seed,
                       every=spec.every, probes=True)


def run_experiment(spec: Spec, out: Path, steps: int | None = None, device: str | None = None,
                   only: list[str] | None = None, compare_after: bool = True) -> dict[str, Any] | None:
    """Train every variant (or those in ``only``) x seed not yet finished, then write the
    comparison of all finished runs and return it."""
    from ddl.train import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec.model_dump(), indent=2))
    runs = [(v, s) for v in spec.variants if only is None or v in only for s in spec.seeds]
    for i, (variant, seed) in enumerate(runs, start=1):
        cfg = train_config(spec, out, variant, seed, steps, device)
        if (cfg.out / "summary.json").exists():
            print(f"experiment {spec.name}: [{i}/{len(runs)}] {cfg.out.name} done already, skipped", file=sys.stderr)
            continue
        print(f"experiment {spec.name}: [{i}/{len(runs)}] {cfg.out.name}", file=sys.stderr)
        if (cfg.out / "ckpt.pt").exists():  # interrupted earlier: continue its schedule
            cfg = cfg.model_copy(update={"resume": True})
        train(cfg)
        if not (cfg.out / "report" / "report.html").exists():  # train() renders it; retry if it could not
            try:
                from dashboards.report import build_report

                build_report(cfg.out)
            except Exception as e:  # noqa: BLE001 (a report is a courtesy; the run is done)
                log.warning("no report for %s: %s", cfg.out, e)
                print(f"experiment {spec.name}: warning: no report for {cfg.out.name}: {e}", file=sys.stderr)
    return compare(spec, out) if compare_after else None


def run_parallel(spec: Spec, spec_ref: str, out: Path, devices: list[str], steps: int | None = None,
                 only: list[str] | None = None) -> int:
    """One worker process per entry of ``devices``, variants dealt round-robin; then compare.
    Returns the number of workers that failed (their runs are simply missing from the comparison)."""
    import subprocess

    names = [v for v in spec.variants if only is None or v in only]
    shares = [names[i::len(devices)] for i in range(len(devices))]
    procs = []
    for dev, share in zip(devices, shares, strict=True):
        if not share:
            continue
        cmd = [sys.executable, "-m", "ddl.experiment", spec_ref, "--out", str(out), "--device", dev,
               "--only", ",".join(share), "--no-compare"]
        if steps is not None:
            cmd += ["--steps", str(steps)]
        print(f"experiment {spec.name}: {dev}: {', '.join(share)}", file=sys.stderr)
        procs.append(subprocess.Popen(cmd))
    failed = sum(p.wait() != 0 for p in procs)
    compare(spec, out)
    return failed


# ---- comparison ------------------------------------------------------------------------------


def _read_stats(path: Path) -> list[dict[str, Any]]:
    rows = []
    if not path.is_file():
        return rows
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(obj, dict) and isinstance(obj.get("step"), int):
                    rows.append(obj)
    return rows


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if math.isfinite(x) else None


def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _layer_key(site: str, layer: int) -> str:
    return f"{site}/L{layer:02d}"


def _layer_order(key: str) -> tuple[int, str]:
    site, _, lyr = key.partition("/L")
    return int(lyr), site


def read_run(rd: Path) -> dict[str, Any] | None:
    """One finished run: summary numbers, alert counts by rule, final per-layer beta/regimes,
    and beta_p50 / h_norm_drift / k_cos_step series per layer."""
    sp = rd / "summary.json"
    if not sp.is_file():
        return None
    summary = json.loads(sp.read_text(encoding="utf-8"))
    alerts: dict[str, int] = defaultdict(int)
    for msg in summary.get("alerts") or []:
        alerts[str(msg).split(" ", 1)[0]] += 1
    rows = _read_stats(rd / "stats.jsonl")
    final: dict[str, dict[str, float | None]] = {}
    last = next((r for r in reversed(rows) if any(k.startswith("beta_p50/") for k in r)), None)
    if last is not None:
        for k, v in last.items():
            m = _SITE_KEY.match(k)
            if not m:
                continue
            stat = m["stat"]
            if stat == "beta_p50" or stat.startswith("occ_") and stat[4:] in REGIMES:
                final.setdefault(_layer_key(m["site"], int(m["layer"])), {})[stat] = _num(v)
    series: dict[str, dict[str, dict[int, float]]] = {s: {} for s in SERIES}
    for r in rows:
        for k, v in r.items():
            m = _SITE_KEY.match(k)
            if m and m["stat"] in series and _num(v) is not None:
                series[m["stat"]].setdefault(_layer_key(m["site"], int(m["layer"])), {})[r["step"]] = float(v)
    return {"dir": rd.name, "steps": summary.get("steps"), "loss": _num(summary.get("loss")),
            "val_loss": _num(summary.get("val_loss")), "tokens_per_s": _num(summary.get("tokens_per_s")),
            "stopped_by": summary.get("stopped_by"), "alerts": dict(alerts), "final": final, "series": series,
            "report": str(rd / "report" / "report.html") if (rd / "report" / "report.html").exists() else None}


def _mean_series(per_seed: list[dict[int, float]]) -> dict[int, float]:
    steps = set.intersection(*(set(s) for s in per_seed)) if per_seed else set()
    return {t: sum(s[t] for s in per_seed) / len(per_seed) for t in sorted(steps)}


def compare(spec: Spec, out: Path) -> dict[str, Any]:
    """Aggregate the finished runs under ``out`` (mean over seeds); write comparison.json/.md and
    the figures; return the comparison."""
    out = Path(out)
    variants: dict[str, Any] = {}
    for v in spec.variants:
        runs = {s: r for s in spec.seeds if (r := read_run(run_dir(out, v, s))) is not None}
        if not runs:
            variants[v] = {"overrides": spec.overrides(v), "seeds": [], "missing": list(spec.seeds)}
            continue
        alerts: dict[str, int] = defaultdict(int)
        for r in runs.values():
            for rule, n in r["alerts"].items():
                alerts[rule] += n
        layers: dict[str, dict[str, float | None]] = {}
        for key in sorted({k for r in runs.values() for k in r["final"]}, key=_layer_order):
            stats = ["beta_p50", *(f"occ_{g}" for g in REGIMES)]
            layers[key] = {st: _mean([r["final"].get(key, {}).get(st) for r in runs.values()]) for st in stats}
        series = {stat: {key: _mean_series([r["series"][stat][key] for r in runs.values() if key in r["series"][stat]])
                         for key in sorted({k for r in runs.values() for k in r["series"][stat]}, key=_layer_order)}
                  for stat in SERIES}
        variants[v] = {
            "overrides": spec.overrides(v), "seeds": sorted(runs),
            "missing": [s for s in spec.seeds if s not in runs],
            "loss": _mean([r["loss"] for r in runs.values()]),
            "val_loss": _mean([r["val_loss"] for r in runs.values()]),
            "tokens_per_s": _mean([r["tokens_per_s"] for r in runs.values()]),
            "per_seed": {str(s): {k: r[k] for k in ("loss", "val_loss", "tokens_per_s", "steps", "stopped_by")}
                         for s, r in runs.items()},
            "alerts_by_rule": dict(sorted(alerts.items())),
            "layers": layers,
            "series": {stat: {key: {str(t): x for t, x in ser.items()} for key, ser in d.items()}
                       for stat, d in series.items()},
            "reports": {str(s): r["report"] for s, r in runs.items()},
        }
    comparison = {"name": spec.name, "description": spec.description, "preset": spec.preset,
                  "seeds": spec.seeds, "every": spec.every, "variants": variants}
    figures = _figures(comparison, out)
    comparison["figures"] = figures
    (out / "comparison.json").write_text(json.dumps(comparison, indent=2))
    (out / "comparison.md").write_text(_markdown(comparison))
    return comparison


def _fmt(x: Any, fmt: str = ".4g") -> str:
    return "—" if x is None else format(x, fmt)


def _markdown(c: dict[str, Any]) -> str:
    lines = [f"# Experiment {c['name']}", ""]
    if c["description"]:
        lines += [c["description"].strip(), ""]
    lines += [f"Preset {c['preset']}, seeds {c['seeds']}, probes every {c['every']} steps. "
              "Numbers are means over the seeds that finished; alert counts are summed over them.", "",
              "| variant | overrides | seeds | loss | val_loss | tokens/s | alerts by rule |",
              "|---|---|---|---:|---:|---:|---|"]
    for name, v in c["variants"].items():
        ov = ", ".join(f"{k}={json.dumps(x)}" for k, x in v["overrides"].items()) or "(preset)"
        if not v["seeds"]:
            lines.append(f"| {name} | {ov} | none finished | — | — | — | — |")
            continue
        al = ", ".join(f"{r}: {n}" for r, n in v["alerts_by_rule"].items()) or "none"
        lines.append(f"| {name} | {ov} | {v['seeds']} | {_fmt(v['loss'])} | {_fmt(v['val_loss'])} | "
                     f"{_fmt(v['tokens_per_s'], '.0f')} | {al} |")
    lines += ["", "## Final beta median and regime occupancy per layer", ""]
    for name, v in c["variants"].items():
        if not v.get("layers"):
            lines += [f"**{name}**: no beta statistics (additive residual, or no probe step logged).", ""]
            continue
        lines += [f"**{name}**", "", "| layer | beta p50 | identity | projection | reflection | negative |",
                  "|---|---:|---:|---:|---:|---:|"]
        for key, st in v["layers"].items():
            lines.append(f"| {key} | {_fmt(st['beta_p50'], '.3f')} | "
                         + " | ".join(_fmt(st[f'occ_{g}'], '.3f') for g in REGIMES) + " |")
        lines.append("")
    if c.get("figures"):
        lines += ["## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in c["figures"]] + [""]
    reports = [(n, s, p) for n, v in c["variants"].items() for s, p in v.get("reports", {}).items() if p]
    if reports:
        lines += ["## Run reports", ""] + [f"- {n} seed {s}: {p}" for n, s, p in reports] + [""]
    return "\n".join(lines)


def _figures(c: dict[str, Any], out: Path) -> list[str]:
    """PNG figures through matplotlib's object API on Agg: no pyplot, no global figure state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = {k: v for k, v in c["variants"].items() if v["seeds"]}
    if not done:
        return []
    names = list(done)
    files: list[str] = []

    def save(fig: Figure, fname: str) -> None:
        FigureCanvasAgg(fig)
        if fig.get_layout_engine() is None:
            fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        files.append(fname)

    # validation loss per variant: bars at the mean, one point per seed
    fig = Figure(figsize=(max(4.0, 1.2 * len(names) + 2), 3.6))
    ax = fig.add_subplot()
    for i, n in enumerate(names):
        v = done[n]
        if v["val_loss"] is not None:
            ax.bar(i, v["val_loss"], color=f"C{i % 10}", alpha=0.6)
        pts = [r["val_loss"] for r in v["per_seed"].values() if r["val_loss"] is not None]
        ax.scatter([i] * len(pts), pts, color="k", s=14, zorder=3)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel("final validation loss")
    vals = [p for n in names for p in (r["val_loss"] for r in done[n]["per_seed"].values()) if p is not None]
    if vals:
        lo, hi = min(vals), max(vals)
        pad = max(0.05, (hi - lo) * 0.5)
        ax.set_ylim(max(0.0, lo - pad), hi + pad)
    ax.set_title(f"{c['name']}: validation loss (bars: mean, points: seeds)")
    save(fig, "val_loss.png")

    with_beta = [n for n in names if done[n]["layers"]]
    if with_beta:
        keys = sorted({k for n in with_beta for k in done[n]["layers"]}, key=_layer_order)
        fig = Figure(figsize=(max(5.0, 0.45 * len(keys) + 3), 3.8))
        ax = fig.add_subplot()
        for n in with_beta:
            ys = [done[n]["layers"].get(k, {}).get("beta_p50") for k in keys]
            ax.plot(range(len(keys)), [float("nan") if y is None else y for y in ys], marker="o", ms=4,
                    label=n, color=f"C{names.index(n) % 10}")
        for y, lab in ((0.0, "identity"), (1.0, "projection"), (2.0, "reflection")):
            ax.axhline(y, color="0.8", lw=0.8, zorder=0)
            ax.text(len(keys) - 0.5, y, lab, fontsize=7, color="0.5", va="bottom", ha="right")
        ax.set_xticks(range(len(keys)), keys, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("final beta median")
        ax.set_title(f"{c['name']}: beta median per layer")
        ax.legend(fontsize=7)
        save(fig, "beta_per_layer.png")

        fig = Figure(figsize=(max(5.0, 0.45 * len(keys) + 3), 2.4 * len(with_beta) + 0.6))
        axes = fig.subplots(len(with_beta), 1, squeeze=False)[:, 0]
        colors = {"identity": "0.75", "projection": "C0", "reflection": "C3"}
        for ax, n in zip(axes, with_beta, strict=True):
            bottom = [0.0] * len(keys)
            for g in ("identity", "projection", "reflection"):  # disjoint beta ranges: stacked
                ys = [done[n]["layers"].get(k, {}).get(f"occ_{g}") or 0.0 for k in keys]
                ax.bar(range(len(keys)), ys, bottom=bottom, color=colors[g], label=g)
                bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
            # beta > 1 overlaps projection and reflection: a marker per layer, not a stacked bar
            neg = [done[n]["layers"].get(k, {}).get("occ_negative") or 0.0 for k in keys]
            ax.plot(range(len(keys)), neg, ls="none", marker="_", ms=14, mew=2.5, color="C1",
                    label="negative eigenvalue (beta > 1)")
            ax.set_ylim(0, 1.05)
            ax.set_ylabel("token fraction")
            ax.set_title(f"{n}: regime occupancy", fontsize=9)
            ax.set_xticks(range(len(keys)), keys, rotation=60, ha="right", fontsize=7)
        axes[0].legend(fontsize=7, ncol=4, loc="upper right")
        save(fig, "regime_occupancy.png")

    with_beta_series = [n for n in names if done[n]["series"]["beta_p50"]]
    if with_beta_series:  # beta median per layer over training: blue identity, white projection, red reflection
        n_rows = max(len(done[n]["series"]["beta_p50"]) for n in with_beta_series)
        fig = Figure(figsize=(3.6 * len(with_beta_series) + 1.6, 0.2 * n_rows + 1.6), layout="constrained")
        axes = fig.subplots(1, len(with_beta_series), squeeze=False)[0]
        for j, n in enumerate(with_beta_series):
            d = done[n]["series"]["beta_p50"]
            rows = sorted(d, key=_layer_order)
            steps = sorted({int(t) for ser in d.values() for t in ser})
            grid = [[d[k].get(str(t), math.nan) for t in steps] for k in rows]
            im = axes[j].imshow(grid, aspect="auto", cmap="coolwarm", vmin=0.0, vmax=2.0, interpolation="nearest",
                                extent=(steps[0] - 0.5, steps[-1] + 0.5, len(rows) - 0.5, -0.5))
            axes[j].set_yticks(range(len(rows)), rows if j == 0 else [""] * len(rows), fontsize=6)
            axes[j].set_title(n, fontsize=9)
            axes[j].set_xlabel("step")
        fig.colorbar(im, ax=list(axes), label="beta median (0 identity, 1 projection, 2 reflection)", shrink=0.9)
        save(fig, "beta_over_training.png")

    with_series = [n for n in names if any(done[n]["series"][s] for s in ("h_norm_drift", "k_cos_step"))]
    if with_series:
        fig = Figure(figsize=(4.2 * len(with_series) + 1, 6.2))
        axes = fig.subplots(2, len(with_series), squeeze=False)
        for j, n in enumerate(with_series):
            for i, (stat, label) in enumerate((("h_norm_drift", "h_norm_drift (k norm / first)"),
                                                ("k_cos_step", "k_cos_step (|cos| to previous step)"))):
                ax = axes[i, j]
                d = done[n]["series"][stat]
                for li, (key, ser) in enumerate(d.items()):
                    xs = [int(t) for t in ser]
                    ax.plot(xs, list(ser.values()), lw=1, label=key, color=f"C{li % 10}")
                ax.set_title(f"{n}", fontsize=9)
                ax.set_xlabel("step")
                if j == 0:
                    ax.set_ylabel(label, fontsize=8)
                if d and len(d) <= 12:
                    ax.legend(fontsize=6, ncol=2)
        save(fig, "direction_stability.png")
    return files


# ---- command line ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deltascope experiment", description=__doc__.splitlines()[0],
        epilog="Built-in specs: " + ", ".join(builtin_specs()) + ". Runs whose summary.json exists are "
               "skipped, so the same command resumes an interrupted experiment.")
    p.add_argument("spec", metavar="SPEC", help="spec file (.toml, .yaml) or a built-in spec name")
    p.add_argument("--out", type=Path, help="experiment directory (default runs/experiments/<name>)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default the spec's)")
    p.add_argument("--device", help="auto, cpu or cuda[:N] (default the spec's, else auto)")
    p.add_argument("--devices", help="comma-separated devices, one worker process each, e.g. cuda:0,cuda:1 "
                   "(list one twice to run two variants side by side on it)")
    p.add_argument("--only", help="comma-separated variants to run (default all); the comparison covers "
                   "every finished run")
    p.add_argument("--no-compare", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """``deltascope experiment``; returns the exit code (2 and one line on stderr for a user mistake)."""
    a = _parser().parse_args(argv)

    def fail(msg: str) -> int:
        print(f"deltascope: error: {msg}", file=sys.stderr)
        return 2

    if a.steps is not None and a.steps < 1:
        return fail(f"--steps must be at least 1, got {a.steps}")
    if a.device and a.devices:
        return fail("give --device or --devices, not both")
    devices = [d.strip() for d in a.devices.split(",")] if a.devices else None
    try:
        spec = load_spec(a.spec)
        out = a.out or Path("runs/experiments") / spec.name
        only = [v.strip() for v in a.only.split(",")] if a.only else None
        if only is not None and (unknown := [v for v in only if v not in spec.variants]):
            return fail(f"--only: no variant {unknown[0]!r} in spec {spec.name} "
                        f"(it has {', '.join(spec.variants)})")
        for dev in devices or [a.device]:  # validates --device / --devices before anything runs
            train_config(spec, out, next(iter(spec.variants)), spec.seeds[0], a.steps, dev)
    except SpecError as e:
        return fail(str(e))
    except ValidationError as e:
        return fail(_one_line(e))
    from ddl.data import DataError

    if devices is not None:
        failed = run_parallel(spec, a.spec, out, devices, a.steps, only)
        print(out / "comparison.md")
        if failed:
            print(f"deltascope: {failed} worker(s) failed; run the same command to resume ({out})", file=sys.stderr)
        return 1 if failed else 0
    try:
        run_experiment(spec, out, a.steps, a.device, only, compare_after=not a.no_compare)
    except DataError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        print(f"deltascope: interrupted; run the same command to resume ({out})", file=sys.stderr)
        return 130
    if not a.no_compare:
        print(out / "comparison.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
