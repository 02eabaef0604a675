"""deltascope experiment: specs validate to one-line errors, built-ins load, a tiny 2-variant
experiment trains, compares and resumes; every built-in spec trains each variant at toy size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ddl.data import prepare_corpus
from ddl.experiment import builtin_specs, load_spec, main

BUILTINS = ("beta_range", "beta_fixed", "dv_compressors", "value_head", "baseline")


def write(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


GOOD = """
name = "t"
preset = "tiny"
steps = 4
seeds = [0]
every = 2
[variants.a]
"""


@pytest.mark.parametrize("text, needle", [
    (GOOD + "colour = 1\n", "variants.a.colour"),
    (GOOD.replace('preset = "tiny"', 'preset = "huge"'), "unknown preset 'huge'"),
    (GOOD.replace("steps = 4", "steps = 0"), "steps"),
    (GOOD.replace("seeds = [0]", "seeds = []"), "seeds"),
    (GOOD.replace("every = 2", ""), "every"),
    (GOOD + "[variants.b]\nd_v = 0\n", "variants.b.d_v"),
    (GOOD + '[variants.c]\nresidual = "additive"\nd_v = 4\n', "variants.c"),
    ("extra_field = 1\n" + GOOD, "extra_field"),
    (GOOD + "[train]\nlr = -1\n", "train: lr"),
    (GOOD + "[train]\nmax_steps = 3\n", "train: max_steps is set by the experiment"),
    ("name = [", "not valid TOML"),
])
def test_spec_errors_are_one_line(tmp_path, text, needle, capsys):
    assert main([str(write(tmp_path, text)), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o").exists()


def test_yaml_spec_and_unknown_name(tmp_path, capsys):
    spec = load_spec(write(tmp_path, "name: y\npreset: tiny\nsteps: 3\nseeds: [1, 2]\nevery: 1\n"
                                     "variants:\n  a: {d_v: 2}\n", "s.yaml"))
    assert spec.seeds == [1, 2] and spec.variants == {"a": {"d_v": 2}}
    assert main(["no_such_spec"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_spec" in err[0] and "beta_range" in err[0]


def test_builtin_specs_load():
    assert set(BUILTINS) <= set(builtin_specs())
    for name in BUILTINS:
        spec = load_spec(name)
        assert spec.preset == "tiny" and spec.seeds == [0] and len(spec.variants) >= 2
    assert load_spec("beta_fixed").variants["fixed_0"] == {"beta_fixed": 0.0}
    assert len(load_spec("dv_compressors").variants) == 5


def test_cli_forwards_experiment():
    r = subprocess.run([sys.executable, "-m", "ddl.cli", "experiment", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "SPEC" in r.stdout and "baseline" in r.stdout


@pytest.fixture()
def cache(tmp_path):
    d = tmp_path / "cache"
    os.environ["DELTASCOPE_CACHE"] = str(d)
    prepare_corpus(d, vocab_size=512)
    yield d
    os.environ.pop("DELTASCOPE_CACHE", None)


TINY = """
name = "tiny2"
preset = "tiny"
steps = 4
seeds = [0]
every = 2

[train]
batch_size = 4
seq_len = 32
vocab_size = 512
warmup = 1
eval_every = 1000
eval_batches = 2
log_every = 1000
device = "cpu"
mlflow_uri = "sqlite:///{db}"

[train.overrides]
n_layer = 2

[variants.bmax2]
beta_max = 2.0

[variants.bmax1]
beta_max = 1.0
"""


@pytest.mark.slow
def test_tiny_experiment_runs_compares_and_resumes(cache, tmp_path):
    spec = write(tmp_path, TINY.replace("{db}", str(tmp_path / "mlflow.db")))
    out = tmp_path / "exp"
    assert main([str(spec), "--out", str(out)]) == 0
    c = json.loads((out / "comparison.json").read_text())
    assert list(c["variants"]) == ["bmax2", "bmax1"]
    for name in ("bmax2", "bmax1"):
        v = c["variants"][name]
        assert v["seeds"] == [0] and v["per_seed"]["0"]["steps"] == 4
        assert v["loss"] is not None and v["val_loss"] is not None and v["tokens_per_s"] > 0
        assert isinstance(v["alerts_by_rule"], dict)
        assert set(v["layers"]) == {"attn/L00", "mlp/L00", "attn/L01", "mlp/L01"}
        occ = v["layers"]["attn/L00"]
        assert 0 <= occ["beta_p50"] <= 2.0
        assert all(0 <= occ[f"occ_{g}"] <= 1 for g in ("identity", "projection", "reflection", "negative"))
        assert v["series"]["h_norm_drift"]["attn/L00"]
        assert (out / f"{name}-seed0" / "report" / "report.html").is_file()
    md = (out / "comparison.md").read_text()
    assert "bmax2" in md and "bmax1" in md and "beta_max=1.0" in md
    for fig in ("val_loss.png", "beta_per_layer.png", "beta_over_training.png", "regime_occupancy.png",
                "direction_stability.png"):
        assert fig in c["figures"] and (out / fig).stat().st_size > 1000, fig
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*-seed0/summary.json")}
    assert len(mtimes) == 2
    assert main([str(spec), "--out", str(out)]) == 0  # everything done: skipped, comparison rewritten
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert json.loads((out / "comparison.json").read_text())["variants"].keys() == c["variants"].keys()


def test_gates_small_spec_covers_the_checklist_at_124m():
    spec = load_spec("gates_small")
    assert spec.preset == "small" and spec.seeds == [0, 1]
    assert spec.overrides("beta_max_1") == {"beta_max": 1.0} and spec.overrides("additive") == {"residual": "additive"}
    assert {"fixed_0", "fixed_1", "fixed_2", "paper_v", "dv4_cc", "learned"} <= set(spec.variants)


@pytest.mark.parametrize("argv, needle", [
    (["beta_range", "--only", "beta_max_3"], "--only: no variant 'beta_max_3' in spec beta_range"),
    (["beta_range", "--device", "cpu", "--devices", "cpu,cpu"], "--device or --devices"),
])
def test_only_and_devices_misuse_is_one_line(argv, needle, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    assert not (tmp_path / "o").exists()  # nothing started


@pytest.mark.slow
def test_two_workers_split_the_variants_and_one_comparison_covers_both(cache, tmp_path):
    spec = write(tmp_path, TINY.replace("{db}", str(tmp_path / "mlflow.db")).replace('device = "cpu"\n', ""))
    out = tmp_path / "exp"
    assert main([str(spec), "--out", str(out), "--devices", "cpu,cpu"]) == 0
    c = json.loads((out / "comparison.json").read_text())
    for name in ("bmax2", "bmax1"):
        assert c["variants"][name]["per_seed"]["0"]["steps"] == 4
    assert main([str(spec), "--out", str(out), "--only", "bmax1"]) == 0  # done already: skipped, re-compared


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILTINS)
def test_each_builtin_spec_trains_every_variant_at_toy_size(name, cache, tmp_path):
    """The machinery behind each built-in spec, not its findings: every variant builds, trains two
    steps with probes on and lands in the comparison."""
    from ddl.experiment import run_experiment

    spec = load_spec(name)
    toy = spec.model_copy(update={"train": {
        **spec.train, "batch_size": 2, "seq_len": 32, "vocab_size": 512, "warmup": 1, "eval_batches": 1,
        "device": "cpu", "mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "overrides": {"n_layer": 2, "d_model": 64, "n_head": 2, "head_dim": 32}}})
    c = run_experiment(toy, tmp_path / name, steps=2)
    assert list(c["variants"]) == list(spec.variants)
    for v, got in c["variants"].items():
        assert got["seeds"] == [0] and got["per_seed"]["0"]["steps"] == 2, v
        assert got["val_loss"] is not None, v
        if spec.overrides(v).get("residual") != "additive":
            assert got["layers"] and all(0 <= s["beta_p50"] <= 2 for s in got["layers"].values()), v
