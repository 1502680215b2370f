"""Access control (frontend.auth): API keys on every /v1 route, open health/metrics, the start-up warning for a
server exposed without keys, and the key settings."""

from __future__ import annotations

import logging

import pytest

from frontend.api_router import router
from frontend.auth import KeyChecker, exposure_warning, is_loopback, needs_key, read_key_file
from frontend.settings import parse_settings
from tests.unit.frontend_fakes import AppHarness, wait_status

KEY_A = "alpha-key-0123456789"
KEY_B = "bravo-key-9876543210"


@pytest.fixture
def app(tmp_path):
    with AppHarness(tmp_path, api_key=(KEY_A, KEY_B)) as harness:
        yield harness


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def v1_routes() -> list[tuple[str, str]]:
    """(method, path) of every /v1 route the front end has, path parameters filled in."""
    routes = []
    for route in router.routes:
        path = getattr(route, "path", "")
        if not path.startswith("/v1"):
            continue
        concrete = path.replace("{task_id}", "SOME-TASK").replace("{file_path:path}", "a.mp4")
        for method in sorted(route.methods):
            routes.append((method, concrete))
    return routes


def test_checker_accepts_every_configured_key_and_nothing_else():
    checker = KeyChecker([KEY_A, KEY_B])
    assert checker.enabled
    assert checker.allows(f"Bearer {KEY_A}") and checker.allows(f"bearer {KEY_B}")
    assert checker.allows(f"  Bearer   {KEY_A}  ")
    for header in (None, "", "Bearer", "Bearer ", f"Basic {KEY_A}", KEY_A, f"Bearer {KEY_A}x",
                   f"Bearer {KEY_A[:-1]}", f"Bearer {KEY_A},{KEY_B}", "Bearer \udcff"):
        assert not checker.allows(header), header


def test_without_keys_everything_is_allowed():
    checker = KeyChecker([])
    assert not checker.enabled and checker.allows(None)


def test_key_file_skips_blank_lines_and_comments(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# deploy keys\n{KEY_A}\n\n  {KEY_B}  # ci\n", encoding="utf-8")
    assert read_key_file(path) == [KEY_A, KEY_B]


@pytest.mark.parametrize("path, protected", [
    ("/v1/tasks/", True), ("/v1/tasks", True), ("/v1/files/download/x.mp4", True), ("/v1", True),
    ("/v1/service/status", True), ("/healthz", False), ("/readyz", False), ("/metrics", False),
    ("/docs", False), ("/openapi.json", False), ("/v10/x", False),
])
def test_only_v1_paths_need_a_key(path, protected):
    assert needs_key(path) is protected


def test_every_v1_route_answers_401_without_a_valid_key(app):
    routes = v1_routes()
    assert len(routes) >= 10
    for method, path in routes:
        for headers in ({}, bearer("wrong-key-0123456789"), {"Authorization": f"Basic {KEY_A}"}):
            response = app.client.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path, headers)
            if method != "HEAD":
                assert response.json() == {"detail": "missing or invalid API key (send 'Authorization: Bearer KEY')"}
            assert response.headers["www-authenticate"].startswith("Bearer")


def test_either_key_opens_every_v1_route(app):
    for method, path in v1_routes():
        for key in (KEY_A, KEY_B):
            assert app.client.request(method, path, headers=bearer(key)).status_code != 401, (method, path)


def test_the_lightx2v_flow_works_with_a_key(app):
    task_id = app.client.post("/v1/tasks/", json={"infer_steps": 2}, headers=bearer(KEY_A)).json()["task_id"]
    app.client.headers.update(bearer(KEY_B))
    assert wait_status(app.client, task_id)["status"] == "completed"
    assert app.client.get(f"/v1/tasks/{task_id}/result").status_code == 200


def test_health_readiness_metrics_and_docs_stay_open(app):
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert app.client.get(path).status_code == 200, path


def test_a_refused_request_queues_nothing(app):
    assert app.client.post("/v1/tasks/", json={"task_id": "sneaky"}).status_code == 401
    assert app.client.get("/v1/tasks/sneaky/status", headers=bearer(KEY_A)).status_code == 404


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("example.org", False),
])
def test_loopback_addresses(host, loopback):
    assert is_loopback(host) is loopback
    warning = exposure_warning(host, keys_enabled=False)
    assert (warning is None) is loopback
    assert exposure_warning(host, keys_enabled=True) is None


def test_the_server_warns_at_start_when_exposed_without_keys(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="frontend"):
        with AppHarness(tmp_path, host="0.0.0.0"):
            pass
    assert any("without API keys" in record.getMessage() for record in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="frontend"):
        with AppHarness(tmp_path, host="0.0.0.0", api_key=(KEY_A,)):
            pass
    assert not any("without API keys" in record.getMessage() for record in caplog.records)


def test_keys_come_from_repeated_flags_or_a_comma_separated_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("WAN_API_KEY", f"{KEY_A}, {KEY_B}")
    assert parse_settings([]).api_key == (KEY_A, KEY_B)
    assert parse_settings(["--api-key", KEY_B]).api_key == (KEY_B,)  # flags replace the environment
    monkeypatch.delenv("WAN_API_KEY")
    settings = parse_settings(["--api-key", KEY_A, "--api-key", KEY_B])
    assert settings.api_key == (KEY_A, KEY_B)
    assert KEY_A not in repr(settings)
    assert parse_settings([]).api_key == ()


def test_short_keys_and_missing_key_files_stop_the_program(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_settings(["--api-key", "short"])
    with pytest.raises(SystemExit):
        parse_settings(["--api-key-file", str(tmp_path / "missing")])
    assert "api-key" in capsys.readouterr().err


def test_keys_from_a_file_work(tmp_path):
    (tmp_path / "keys").write_text(KEY_B + "\n", encoding="utf-8")
    with AppHarness(tmp_path, api_key_file=tmp_path / "keys") as app:
        assert app.client.get("/v1/service/status").status_code == 401
        assert app.client.get("/v1/service/status", headers=bearer(KEY_B)).status_code == 200
