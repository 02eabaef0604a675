"""docs/METRICS.md, generated from the stat catalogue: ``python -m probes.catalogue_doc``."""

from __future__ import annotations

from pathlib import Path

from server.catalogue import BETA_BINS, H_NORM_BINS, H_NORM_LOG10_RANGE, HISTOGRAMS, STATS

PATH = Path(__file__).resolve().parent.parent / "docs" / "METRICS.md"


def _cell(text: str) -> str:
    """A pipe inside a table cell ends the cell: escape it (|| h || -> \\|\\| h \\|\\|)."""
    return text.replace("|", "\\|")


def render() -> str:
    """The whole of docs/METRICS.md: one table, one row per metric key."""
    lo, hi = H_NORM_LOG10_RANGE
    lines = [
        "# Metrics",
        "",
        "Generated from `server/catalogue.py` by `python -m probes.catalogue_doc`; do not edit.",
        "Every per-site key has the form `{stat}/{site}/L{layer:02d}` with site `attn` or `mlp`,",
        "e.g. `beta_mean/attn/L03`. Sign-free statistics treat k and -k alike (they erase the same",
        f"subspace). Histograms: {BETA_BINS} equal bins of beta on [0, beta_max]; {H_NORM_BINS} equal",
        f"bins of log10 ||h|| on [{lo:g}, {hi:g}]. A statistic with no data at a log step is absent.",
        "Counts, sums and histograms merge exactly over micro-batches and DDP ranks; the one",
        "exception is `k_abs_concentration`, whose mean direction m is that of each forward pass",
        "(one micro-batch on one rank), averaged over the step's tokens.",
        "",
        "Sampled tokens: the statistics of d-vectors (`h_norm_*`, `h_norm_hist`, `k_*` except",
        "`k_cos_probe`, and `update_ratio`) read token positions 0, s, 2s, ... of every sequence",
        "(with t + 1 for `k_cos_token`), s = `Probe(token_stride=)`, 8 by default; their minima,",
        "maxima and histograms are those of the sample. Gate statistics (`beta_*`, `occ_*`,",
        "`gate_logit_sat`, `beta_hist`), `write_erase` and the non-finite counts of beta and of the",
        "update read every token; `token_stride=1` makes every statistic exact.",
        "",
        "| key | group | unit | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for s in STATS:
        doc = s.doc + (" (sign-free)" if s.sign_free and "sign-free" not in s.doc else "")
        lines.append(f"| `{s.name}/{{site}}/Lxx` | {s.group} | {_cell(s.unit)} | {_cell(doc)} |")
    for name, doc in HISTOGRAMS.items():
        lines.append(f"| `{name}/{{site}}/Lxx` | histogram | counts | {_cell(doc)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    PATH.write_text(render(), encoding="utf-8")
    print(f"wrote {PATH}")
