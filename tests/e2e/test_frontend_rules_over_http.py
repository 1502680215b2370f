"""API validation rules through real uvicorn (its own path decoding and body handling): the right 4xx, one-line
`detail` without server paths, and nothing written outside the data folder. (Each rule also has a unit test
in tests/unit/test_frontend_validation.py and test_frontend_files.py; this file has its own name because
pytest imports test modules by basename.)"""

from __future__ import annotations

import http.client
import os
import time

import httpx
import pytest

from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def prepared(frontend_server):
    """A sibling `outputs_evil/` next to `outputs/`, a secret outside the data folder, links that lead out."""
    data = frontend_server.data_dir
    outputs = data / "outputs"
    (data / "outputs_evil").mkdir(exist_ok=True)
    (data / "outputs_evil" / "secret.mp4").write_bytes(b"evil secret")
    outside = data.parent / "outside.mp4"
    outside.write_bytes(b"outside secret")
    if not (outputs / "leak.mp4").is_symlink():
        os.symlink(outside, outputs / "leak.mp4")
        os.symlink(data / "outputs_evil", outputs / "leakdir")
    (outputs / "ok.mp4").write_bytes(b"inside")
    return frontend_server


@pytest.fixture
def client(prepared):
    root = prepared.data_dir.parent
    before = {p for p in root.rglob("*") if not p.is_relative_to(prepared.data_dir)}
    with httpx.Client(base_url=prepared.url, timeout=30) as http:
        yield http
    after = {p for p in root.rglob("*") if not p.is_relative_to(prepared.data_dir)}
    assert after == before, "something was written outside the data folder"
    assert not (REPO_ROOT / "escape.mp4").exists() and not (root / "escape.mp4").exists()


def raw_get(url: str, path: str) -> tuple[int, bytes]:
    """GET with the path sent exactly as written (httpx would normalise `..` away)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.parametrize("path", [
    "/v1/files/download/..%2Foutputs_evil%2Fsecret.mp4",  # sibling prefix: a string-prefix check passes it
    "/v1/files/download/../outputs_evil/secret.mp4",
    "/v1/files/download/..%2F..%2Foutside.mp4",
    "/v1/files/download/%2E%2E/outputs_evil/secret.mp4",
    "/v1/files/download/%2Fetc%2Fpasswd",
    "/v1/files/download//etc/passwd",
    "/v1/files/download/leak.mp4",
    "/v1/files/download/leakdir/secret.mp4",
])
def test_download_traversal_and_symlinks_are_403(client, prepared, path):
    status, body = raw_get(prepared.url, path)
    assert status == 403, body
    assert b"secret" not in body and str(prepared.data_dir).encode() not in body
    assert body == b'{"detail":"access to this path is not allowed"}'


def test_download_inside_works_and_missing_is_404(client):
    assert client.get("/v1/files/download/ok.mp4").content == b"inside"
    assert client.get("/v1/files/download/nope.mp4").status_code == 404


@pytest.mark.parametrize("body, status, words", [
    ({"task_id": "bad id!"}, 400, "task_id"),
    ({"task_id": "x" * 65}, 400, "task_id"),
    ({"save_video_path": "../escape.mp4"}, 422, "save_video_path"),
    ({"save_video_path": "../../escape.mp4"}, 422, "save_video_path"),
    ({"save_video_path": str(REPO_ROOT / "escape.mp4")}, 422, "save_video_path"),
    ({"save_video_path": "leakdir/escape.mp4"}, 422, "save_video_path"),
    ({"save_video_path": "escape.avi"}, 422, "save_video_path"),
    ({"infer_steps": 0}, 422, "infer_steps"),
    ({"infer_steps": 1001}, 422, "infer_steps"),
    ({"target_video_length": 0}, 422, "target_video_length"),
    ({"target_video_length": 10_000}, 422, "target_video_length"),
    ({"seed": -1}, 422, "seed"),
    ({"height": 100}, 422, "height"),
    ({"width": 4096}, 422, "width"),
    ({"guidance_scale": -1}, 422, "guidance_scale"),
    ({"sample_shift": 0}, 422, "sample_shift"),
    ({"image_path": "../../etc/passwd"}, 400, "image_path"),
    ({"image_path": "http://169.254.169.254/"}, 400, "URL"),
])
def test_invalid_requests_get_the_right_4xx_with_a_one_line_detail(client, prepared, body, status, words):
    response = client.post("/v1/tasks/", json=body)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and words in detail
    assert str(prepared.data_dir) not in response.text and "Traceback" not in response.text


def test_oversized_bodies_are_413_declared_or_streamed(client):
    big = b'{"prompt": "' + b"a" * (2 << 20) + b'"}'
    response = client.post("/v1/tasks/", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413

    def chunks():
        for _ in range(40):
            yield b"a" * (64 << 10)

    # no Content-Length: chunked, counted while it streams in
    streamed = client.post("/v1/tasks/", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and streamed.json() == {"detail": "request body too large"}


def test_unknown_task_ids_answer_the_lightx2v_404(client):
    response = client.get("/v1/tasks/NO-SUCH-TASK/status")
    assert response.status_code == 404 and response.json() == {"status": "not_found", "task_id": "NO-SUCH-TASK"}
    assert client.get("/v1/tasks/NO-SUCH-TASK/result").status_code == 404
    assert client.delete("/v1/tasks/NO-SUCH-TASK").status_code == 404


def test_form_route_without_image_runs_and_with_a_bad_image_is_400(client):
    bad = client.post("/v1/tasks/form", data={"prompt": "x"}, files={"image_file": ("x.png", b"not an image")})
    assert bad.status_code == 400 and "image" in bad.json()["detail"]
    good = client.post("/v1/tasks/form", data={"prompt": "x", "infer_steps": "1", "target_video_length": "1"},
                       files={"unused": ("", b"")})
    assert good.status_code == 200, good.text
    task_id = good.json()["task_id"]
    for _ in range(600):
        if client.get(f"/v1/tasks/{task_id}/status").json()["status"] == "completed":
            break
        time.sleep(0.05)
    assert client.get(f"/v1/tasks/{task_id}/status").json()["status"] == "completed"
