"""Every bad input gets a 4xx ``{"detail": "..."}`` naming the problem, and the server stays up."""

from __future__ import annotations

import json

import pytest

from server import Settings, create_app
from server.limits import too_deep
from tests.server.conftest import Run, batch


def detail(r) -> str:
    body = r.json()
    assert isinstance(body["detail"], str), body
    return body["detail"]


def test_missing_token_is_401_naming_the_header(client, run):
    r = client.post(f"{run.base}/stats", json=batch("b", [1]))
    assert r.status_code == 401 and "Authorization" in detail(r)
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("header", ["Basic abc", "Bearer", "Bearer   ", "token"])
def test_malformed_authorization_is_401(client, run, header):
    r = client.post(f"{run.base}/stats", json=batch("b", [1]), headers={"Authorization": header})
    assert r.status_code == 401 and "Bearer" in detail(r)


def test_wrong_token_and_another_runs_token_are_403(client, run):
    other = Run(client, "other")
    for token in ("dsr_not-a-token", other.token):
        r = client.post(f"{run.base}/stats", json=batch("b", [1]),
                        headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 403 and f"run {run.id}" in detail(r)
    assert run.get("")["last_step"] is None  # nothing stored


def test_unknown_run_is_404(client, run):
    r = client.post("/api/v1/runs/999/stats", json=batch("b", [1]), headers=run.headers)
    assert r.status_code == 404 and "unknown run 999" in detail(r)
    for path in ("", "/layers", "/health", "/alerts", "/history?stat=loss"):
        r = client.get(f"/api/v1/runs/999{path}")
        assert r.status_code == 404 and "999" in detail(r), path
    r = client.get("/api/v1/runs/compare", params={"a": run.id, "b": 12345})
    assert r.status_code == 404 and "12345" in detail(r)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_values_are_422_naming_the_key(run, client, literal):
    body = json.dumps(batch("b", [1])).replace('"beta_p50/mlp/L01": 0.6', f'"beta_p50/mlp/L01": {literal}')
    assert literal in body
    r = client.post(f"{run.base}/stats", content=body,
                    headers={**run.headers, "content-type": "application/json"})
    assert r.status_code == 422
    assert "beta_p50/mlp/L01" in detail(r) and "finite" in detail(r)


@pytest.mark.parametrize("key, why", [
    ("beta_p50/attn/L3", "not canonical"),
    ("beta_bogus/attn/L03", "unknown stat 'beta_bogus'"),
    ("beta_p50/ffn/L03", "not canonical"),
    ("my loss", "not a plain name"),
    ("beta_p50", "per-site stat"),
])
def test_non_canonical_keys_are_422_naming_the_key(run, key, why):
    r = run.post({"batch_id": "b", "records": [{"step": 1, "scalars": {key: 1.0}}]})
    assert r.status_code == 422 and key in detail(r) and why in detail(r), detail(r)


@pytest.mark.parametrize("body, where", [
    ({"records": [{"step": 1, "scalars": {}}]}, "batch_id"),
    ({"batch_id": "b", "records": []}, "records"),
    ({"batch_id": "b", "records": [{"step": -1, "scalars": {}}]}, "records[0].step"),
    ({"batch_id": "b", "records": [{"step": 1, "scalars": {"loss": "3.0"}}]}, "scalars.loss"),
    ({"batch_id": "b c", "records": [{"step": 1}]}, "batch_id"),
    ({"batch_id": "b", "records": [{"step": 1, "extra": 1}]}, "extra"),
    ({"batch_id": "b", "records": [{"step": 1, "hists": {"beta_hist/attn/L00": {
        "lo": 1.0, "hi": 0.0, "counts": [1.0]}}}]}, "lo < hi"),
    ({"batch_id": "b", "records": [{"step": 1, "hists": {"beta_p50/attn/L00": {
        "lo": 0.0, "hi": 1.0, "counts": [1.0]}}}]}, "unknown histogram"),
    ([1, 2, 3], "dictionary"),
])
def test_invalid_batches_are_422_naming_the_field(run, body, where):
    r = run.post(body)
    assert r.status_code == 422 and where in detail(r), detail(r)


def test_malformed_json_is_422(run, client):
    r = client.post(f"{run.base}/stats", content=b'{"batch_id": "b", "records": [',
                    headers={**run.headers, "content-type": "application/json"})
    assert r.status_code == 422 and "malformed JSON" in detail(r)
    r = client.post("/api/v1/runs", content=b"\xff\xfe not json", headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500


def test_deeply_nested_json_is_400(client, run):
    deep = '{"name": "x", "config": ' + "[" * 5000 + "]" * 5000 + "}"
    r = client.post("/api/v1/runs", content=deep, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "nested deeper" in detail(r)
    moderate = {"name": "x", "config": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {
        "i": {"j": {"k": {"l": {"m": {"n": {"o": {"p": {"q": {"r": 1}}}}}}}}}}}}}}}}}}}
    r = client.post("/api/v1/runs", json=moderate)
    assert r.status_code == 422 and "config" in detail(r) and "16 levels" in detail(r)


def test_oversized_body_is_413_before_parsing(tmp_path):
    from fastapi.testclient import TestClient

    s = Settings(db_url=f"sqlite:///{tmp_path}/x.db", max_body_bytes=4096)
    with TestClient(create_app(s)) as c:
        run = Run(c)
        big = batch("big", list(range(20)))
        r = c.post(f"{run.base}/stats", json=big, headers=run.headers)
        assert r.status_code == 413 and "max_body_bytes" in detail(r)

        def chunks():  # no Content-Length: counted as it streams
            for _ in range(10):
                yield b" " * 1000

        r = c.post(f"{run.base}/stats", content=chunks(),
                   headers={**run.headers, "content-type": "application/json"})
        assert r.status_code == 413 and "max_body_bytes" in detail(r)
        assert c.get("/healthz").status_code == 200


@pytest.mark.parametrize("params, why", [
    ({"stat": "beta_p50", "site": "attn"}, "both 'site' and 'layer'"),
    ({"stat": "beta_nope", "site": "attn", "layer": 1}, "unknown stat"),
    ({"stat": "beta_p50", "site": "ffn", "layer": 1}, "site"),
    ({"stat": "loss", "max_points": 0}, "max_points"),
    ({}, "stat"),
])
def test_bad_history_queries_are_422(run, client, params, why):
    r = client.get(f"{run.base}/history", params=params)
    assert r.status_code == 422 and why in detail(r), detail(r)


@pytest.mark.parametrize("body, where", [
    ({}, "name"),
    ({"name": ""}, "name"),
    ({"name": "x\x00y"}, "name"),
    ({"name": "x", "beta_max": 0}, "beta_max"),
    ({"name": "x", "tags": {"a": 1}}, "tags"),
    ({"name": "x", "config": {"lr": float("nan")}}, "config"),
])
def test_bad_run_registration_is_422(client, body, where):
    r = client.post("/api/v1/runs", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 422 and where in detail(r), detail(r)


def test_huge_ids_are_422_not_500(client):
    assert client.get(f"/api/v1/runs/{2**70}").status_code == 422
    assert client.get("/api/v1/runs/0").status_code == 422


@pytest.mark.parametrize("depth, deep", [(31, False), (32, False), (33, True)])
def test_depth_check_boundary(depth, deep):
    body = json.dumps({"a": [1, '"[[[[{{{', {"b": "\\\"]]"}]}).encode()
    assert not too_deep(body, 32)
    nested = ("[" * (depth - 1) + '{"s": "[[[["}' + "]" * (depth - 1)).encode()
    assert too_deep(nested, 32) is deep


def test_depth_check_catches_unterminated_nesting_and_leaves_other_garbage_to_the_parser():
    assert too_deep(b"[" * 100, 32) and too_deep(b"[[]" * 100, 32) and too_deep(b'{"a":' * 40, 32)
    assert not too_deep(b"[" * 32, 32) and not too_deep(b"[}" * 100, 32)
