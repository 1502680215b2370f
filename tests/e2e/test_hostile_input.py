"""Hostile input through real uvicorn (its own URL decoding, body and header handling) and the session
tritonserver: malformed and mistyped JSON, huge and non-finite numbers, NUL and control characters, long
prompts, path tricks on every path-like field and route, oversized and slow uploads, and API keys.

Every refusal is a 4xx with a one-line `detail`; no request gets a 500, reads or writes outside the data
folder, or sees a server path."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import CACHE, REPO_ROOT
from tests.e2e.conftest import FrontendServer
from tests.e2e.test_frontend_flow import wait_status

LIMITS = ["--max-request-bytes", "65536", "--max-upload-bytes", "131072", "--body-timeout", "2",
          "--max-prompt-chars", "1000", "--max-list-limit", "50"]
KEY = "hostile-suite-key-0123456789"
SECRET = b"TOP-SECRET-OUTSIDE-THE-DATA-FOLDER"


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory, triton_server):
    """A front end with small limits, and bait around its data folder: a sibling `outputs_evil/` and
    `inputs_evil/`, secrets outside, and links inside that lead out."""
    root = tmp_path_factory.mktemp("hostile")
    data = root / "server_data"
    for name in ("outputs", "inputs", "outputs_evil", "inputs_evil"):
        (data / name).mkdir(parents=True)
    (root / "secret.mp4").write_bytes(SECRET)
    (root / "secret.png").write_bytes(png() + SECRET)
    (data / "outputs_evil" / "secret.mp4").write_bytes(SECRET)
    (data / "inputs_evil" / "secret.png").write_bytes(png() + SECRET)
    os.symlink(root / "secret.mp4", data / "outputs" / "leak.mp4")
    os.symlink(data / "outputs_evil", data / "outputs" / "leakdir")
    os.symlink(root / "secret.png", data / "inputs" / "leak.png")
    os.symlink(root, data / "inputs" / "leakdir")
    (data / "outputs" / "ok.mp4").write_bytes(b"inside")
    front = FrontendServer.create(data, triton_server.grpc_url, CACHE / "logs" / "frontend-hostile.log", LIMITS)
    front.start()
    try:
        front.wait_up()
        yield front
    finally:
        front.stop()


def snapshot(root: Path, data: Path) -> dict[str, int]:
    return {str(path): path.lstat().st_mtime_ns for path in root.rglob("*")
            if not path.is_relative_to(data / "outputs") and not path.is_relative_to(data / "inputs")
            and path.name not in ("tasks.sqlite3", "tasks.sqlite3-wal", "tasks.sqlite3-shm")}


@pytest.fixture
def client(server):
    """An HTTP client; afterwards, nothing outside outputs/ and inputs/ (and the database) has changed."""
    root = server.data_dir.parent
    before = snapshot(root, server.data_dir)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http
    assert snapshot(root, server.data_dir) == before, "something outside the data folders changed"
    assert not any(REPO_ROOT.glob("escape*")) and not any(root.glob("escape*"))


def assert_refused(response: httpx.Response | tuple[int, bytes], server, statuses=(400, 403, 404, 408, 413, 422),
                   words: str = "") -> str:
    status, body = (response.status_code, response.content) if isinstance(response, httpx.Response) else response
    assert status in statuses, (status, body[:300])
    assert SECRET not in body and b"Traceback" not in body
    for path in (str(server.data_dir), str(REPO_ROOT), "/tmp/"):
        assert path.encode() not in body, body[:300]
    detail = json.loads(body).get("detail") if body.startswith(b"{") else None
    if detail is not None:
        assert isinstance(detail, str) and "\n" not in detail and detail.strip()
        assert words in detail, detail
    return detail or ""


def raw(server, request: bytes, timeout_s: float = 10) -> tuple[int, bytes]:
    """Send bytes exactly as written (no client-side normalising); (status, body)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout_s) as sock:
        sock.sendall(request)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
            if length and len(body) >= int(length[0].split(b":")[1]):
                break
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def get_raw(server, path: str, headers: str = "") -> tuple[int, bytes]:
    return raw(server, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n".encode())


def post_json_bytes(client, body: bytes, content_type: str = "application/json") -> httpx.Response:
    return client.post("/v1/tasks/", content=body, headers={"content-type": content_type})


# ---- JSON bodies -------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, words", [
    (b'{"prompt": ', "not valid JSON"),
    (b"{'prompt': 'single quotes'}", "not valid JSON"),
    (b'{"prompt": "x",}', "not valid JSON"),
    (b"", "not valid JSON"),
    (b"[]", ""), (b"null", ""), (b'"a string"', ""), (b"42", ""),
    (b'{"prompt": 5}', "prompt"), (b'{"prompt": ["a"]}', "prompt"), (b'{"prompt": {"$ne": 1}}', "prompt"),
    (b'{"negative_prompt": 1.5}', "negative_prompt"), (b'{"task_id": 7}', "task_id"),
    (b'{"infer_steps": "many"}', "infer_steps"), (b'{"infer_steps": [4]}', "infer_steps"),
    (b'{"infer_steps": 2.5}', "infer_steps"), (b'{"seed": {}}', "seed"), (b'{"height": true}', "height"),
    (b'{"save_video_path": 1}', "save_video_path"), (b'{"image_path": ["a"]}', "image_path"),
    (b'{"seed": 18446744073709551616}', "seed"), (b'{"seed": -1}', "seed"),
    (b'{"infer_steps": 100000000000000000000}', "infer_steps"), (b'{"height": 1e308}', "height"),
    (b'{"width": -1e308}', "width"), (b'{"target_video_length": 1e999}', "target_video_length"),
    (b'{"guidance_scale": NaN}', "guidance_scale"), (b'{"guidance_scale": Infinity}', "guidance_scale"),
    (b'{"sample_shift": -Infinity}', "sample_shift"), (b'{"seed": NaN}', "seed"),
    (b'{"infer_steps": Infinity}', "infer_steps"), (b'{"fps": 1e400}', "fps"),
    (b'{"guidance_scale": 1e308}', "guidance_scale"),
])
def test_malformed_mistyped_and_out_of_range_json_is_4xx(client, server, body, words):
    assert_refused(post_json_bytes(client, body), server, (422,), words)


@pytest.mark.parametrize("body", [
    b'{"seed": ' + b"9" * 5000 + b"}",  # more digits than Python's int parser allows
    b"[" * 30_000 + b"]" * 30_000,  # deeper than the JSON parser's recursion (and under the body limit)
    b'{"use_prompt_enhancer": ' + b"[" * 20_000 + b"]" * 20_000 + b"}",  # an ignored field, just as deep
    b'{"prompt": "\xff\xfe\xfd"}',  # not UTF-8
], ids=["huge-int", "deep-array", "deep-ignored-field", "not-utf8"])
def test_bodies_the_parser_cannot_take_are_400(client, server, body):
    assert_refused(post_json_bytes(client, body), server, (400,))


@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "image_path", "save_video_path", "task_id"])
@pytest.mark.parametrize("text", ["nul\u0000byte", "bell\u0007", "esc\u001b[2J", "del\u007f", "\ud800lone",
                                  "x\udc00"])
def test_nul_control_characters_and_lone_surrogates_in_strings_are_4xx(client, server, field, text):
    value = text + ".mp4" if field == "save_video_path" else text
    body = json.dumps({field: value}).encode()  # the escapes (\u0000, \ud800) travel as JSON escapes
    assert_refused(post_json_bytes(client, body), server, (400, 422), field)


def test_a_body_of_the_wrong_content_type_is_422(client, server):
    assert_refused(post_json_bytes(client, b'{"prompt": "x"}', "text/plain"), server, (422,))


def test_a_long_prompt_is_cut_and_a_body_over_the_limit_is_413(client, server):
    long = client.post("/v1/tasks/", json={"prompt": "cat " * 15_000, "infer_steps": 1, "target_video_length": 1,
                                           "height": 64, "width": 64})
    assert long.status_code == 200, long.text
    record = wait_status(client, long.json()["task_id"])
    assert record["status"] == "completed" and len(record["message"]["prompt"]) == 1000
    huge = client.post("/v1/tasks/", json={"prompt": "cat " * 20_000})
    assert assert_refused(huge, server, (413,)) == "request body too large"


# ---- path tricks on every path-like field and route -------------------------------------------------


@pytest.mark.parametrize("path", [
    "../escape.mp4", "../../escape.mp4", "a/../../escape.mp4", "./../escape.mp4", "/tmp/escape.mp4",
    str(REPO_ROOT / "escape.mp4"), "..\\escape.mp4", "a\\..\\..\\escape.mp4", "leakdir/escape.mp4",
    "leak.mp4/escape.mp4", "../outputs_evil/escape.mp4", "escape.mp4\u0000.png", "escape.avi", ".mp4",
    "x" * 2000 + ".mp4", "//escape.mp4", "\\\\server\\share\\escape.mp4", "~/escape.mp4/..",
])
def test_save_video_path_tricks_are_422(client, server, path):
    response = client.post("/v1/tasks/", json={"save_video_path": path})
    assert_refused(response, server, (422,), "save_video_path")


def test_odd_but_harmless_save_paths_stay_inside_the_output_folder(client, server):
    outputs = server.data_dir / "outputs"
    for name in ("%2e%2e/escape.mp4", "%2e%2e%2fescape.mp4", "..%5cescape.mp4", "~/escape.mp4"):
        answer = client.post("/v1/tasks/", json={"save_video_path": name, "infer_steps": 1,
                                                 "target_video_length": 1, "height": 64, "width": 64})
        assert answer.status_code == 200, answer.text
        assert wait_status(client, answer.json()["task_id"])["status"] == "completed"
        assert (outputs / name).is_file() and (outputs / name).resolve().is_relative_to(outputs.resolve())


@pytest.mark.parametrize("image_path", [
    "../../secret.png", "../inputs_evil/secret.png", "/etc/passwd", str(REPO_ROOT / "README.md"),
    "leak.png", "leakdir/secret.png", "..\\..\\secret.png", "file:///etc/passwd",
    "http://127.0.0.1:1/latest/meta-data", "https://169.254.169.254/", "data:text/plain;base64,aGVsbG8=",
    "data:image/png;base64,!!!!", "bm90IGFuIGltYWdl", "%2e%2e%2f%2e%2e%2fsecret.png",
])
def test_image_path_tricks_are_400_and_read_nothing(client, server, image_path):
    assert_refused(client.post("/v1/tasks/", json={"image_path": image_path}), server, (400, 422))


@pytest.mark.parametrize("task_id", ["../x", "a/b", "..", ".", "x" * 65, "running", "a b", "ü", "a\\b"])
def test_client_task_ids_outside_the_pattern_are_400(client, server, task_id):
    assert_refused(client.post("/v1/tasks/", json={"task_id": task_id}), server, (400,), "task_id")


ID_TRICKS = ["..%2F..%2Fetc%2Fpasswd", "%2e%2e", "%2E%2E%2F%2E%2E", "%252e%252e%252fsecret", "%00", "a%00b",
             "..%5C..%5Cwin.ini", "%C0%AE%C0%AE", "%FF%FE", "x" * 5000]


@pytest.mark.parametrize("task_id", ID_TRICKS)
@pytest.mark.parametrize("route", ["/v1/tasks/{}/status", "/v1/tasks/{}/result"])
def test_task_routes_with_path_tricks_are_404(server, client, task_id, route):
    assert_refused(get_raw(server, route.format(task_id)), server, (404,))


@pytest.mark.parametrize("task_id", ID_TRICKS)
def test_delete_with_path_tricks_is_404(server, client, task_id):
    request = f"DELETE /v1/tasks/{task_id} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    assert_refused(raw(server, request), server, (404, 405))


@pytest.mark.parametrize("path, status", [
    ("..%2Foutputs_evil%2Fsecret.mp4", 403), ("../outputs_evil/secret.mp4", 403), ("..%2F..%2Fsecret.mp4", 403),
    ("%2E%2E/outputs_evil/secret.mp4", 403), ("%2Fetc%2Fpasswd", 403), ("/etc/passwd", 403),
    ("leak.mp4", 403), ("leakdir/secret.mp4", 403), ("ok.mp4%00.png", 403), ("%00", 403),
    ("..%252F..%252Fsecret.mp4", 404), ("%252e%252e%252fsecret.mp4", 404), ("..%5C..%5Csecret.mp4", 404),
    ("..\\..\\secret.mp4", 404), ("%C0%AE%C0%AE/secret.mp4", 404), ("nope.mp4", 404), (".", 403),
    ("", 403), ("leakdir", 403), ("x" * 5000, 404),
])
def test_download_path_tricks_are_403_or_404(server, client, path, status):
    assert_refused(get_raw(server, f"/v1/files/download/{path}"), server, (status,))


def test_downloads_inside_still_work(client):
    assert client.get("/v1/files/download/ok.mp4").content == b"inside"


# ---- queries, headers, methods ------------------------------------------------------------------------


@pytest.mark.parametrize("query", ["limit=abc", "limit=-1", "limit=0", "limit=1e9", "offset=-5",
                                   "limit=" + "9" * 50, "status=../../etc", "status=%00"])
def test_bad_listing_queries_are_422(client, server, query):
    assert_refused(client.get(f"/v1/tasks/?{query}"), server, (422,))


def test_listing_pages_are_capped(client):
    assert len(client.get("/v1/tasks/?limit=100000").json()) <= 50


@pytest.mark.parametrize("header", ["Range: bytes=abc", "Range: bytes=9999999-", "Range: bytes=5-1",
                                    "Range: bytes=" + ",".join(f"{i}-{i}" for i in range(3000)),
                                    "Range: chars=0-1", "If-Range: \u00ff"])
def test_odd_range_headers_never_break_a_download(server, client, header):
    began = time.monotonic()
    status, body = get_raw(server, "/v1/files/download/ok.mp4", header.encode("latin-1").decode("latin-1") + "\r\n")
    assert status in (200, 206, 400, 416) and time.monotonic() - began < 5
    assert b"Traceback" not in body


def test_oversized_headers_and_unknown_methods_are_4xx(server, client):
    try:
        status, _ = get_raw(server, "/v1/service/status", "X-Big: " + "a" * 1_000_000 + "\r\n")
        assert 400 <= status < 500
    except ConnectionError:
        pass  # uvicorn may also just hang up on it
    assert client.get("/healthz").status_code == 200
    assert client.request("PUT", "/v1/tasks/").status_code == 405
    assert client.request("PATCH", "/v1/tasks/x/status").status_code == 405


# ---- uploads ----------------------------------------------------------------------------------------


def test_an_oversized_upload_is_413(client, server):
    response = client.post("/v1/tasks/form", data={"prompt": "x"},
                           files={"image_file": ("big.png", png() + b"\0" * (300 << 10))})
    assert_refused(response, server, (413,))


@pytest.mark.parametrize("filename", ["../../escape.png", "/tmp/escape.png", "..\\..\\escape.png", "a\x00.png",
                                      "%2e%2e%2fescape.png"])
def test_upload_file_names_never_place_a_file(client, server, filename):
    response = client.post("/v1/tasks/form", data={"prompt": "x"}, files={"image_file": (filename, png())})
    assert_refused(response, server, (400, 422))  # a text-to-video model takes no image
    assert not any((server.data_dir / "inputs").glob("*escape*"))


@pytest.mark.parametrize("content_type, body", [
    ("multipart/form-data", b"no boundary at all"),
    ("multipart/form-data; boundary=zz",  # more fields than the form parser takes
     b"--zz\r\n" + b'Content-Disposition: form-data; name="p"\r\n\r\n1\r\n--zz\r\n' * 100),
    ("text/plain", b"prompt=x"),
])
def test_malformed_forms_are_4xx(client, server, content_type, body):
    response = client.post("/v1/tasks/form", content=body, headers={"content-type": content_type})
    assert_refused(response, server, (400, 413, 422))


def test_form_fields_get_the_json_rules(client, server):
    assert_refused(client.post("/v1/tasks/form", data={"prompt": "a\x00b"}), server, (422,), "prompt")
    assert_refused(client.post("/v1/tasks/form", data={"save_video_path": "../x.mp4"}), server, (422,))
    assert_refused(client.post("/v1/tasks/form", data={"infer_steps": "NaN"}), server, (422,), "infer_steps")


@pytest.mark.parametrize("route, content_type", [("/v1/tasks/", "application/json"),
                                                 ("/v1/tasks/form", "multipart/form-data; boundary=zz")])
def test_a_slow_upload_is_cut_off_with_408_and_the_server_keeps_serving(server, client, route, content_type):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        start = (b'{"prompt": "' if route == "/v1/tasks/"
                 else b'--zz\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n')
        sock.sendall(f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: 20000\r\n\r\n".encode() + start + b"slow")
        began = time.monotonic()
        assert client.get("/v1/service/status").status_code == 200  # others are served meanwhile
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        waited = time.monotonic() - began
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b'"request body not received within 2 s"' in data
    assert 1.5 <= waited < 5, waited


def test_a_base64_image_bigger_than_the_body_limit_is_413(client, server):
    blob = base64.b64encode(b"\0" * (100 << 10)).decode()
    assert_refused(client.post("/v1/tasks/", json={"image_path": blob}), server, (413,))


# ---- access control -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, triton_server):
    root = tmp_path_factory.mktemp("keyed")
    (root / "keys").write_text(f"# the suite's key\n{KEY}\n", encoding="utf-8")
    front = FrontendServer.create(root / "server_data", triton_server.grpc_url, CACHE / "logs" / "frontend-keyed.log",
                                  ["--api-key-file", str(root / "keys")])
    front.start()
    try:
        front.wait_up()
        yield front
    finally:
        front.stop()


KEYED_ROUTES = [("POST", "/v1/tasks/"), ("POST", "/v1/tasks"), ("POST", "/v1/tasks/form"), ("GET", "/v1/tasks/"),
                ("GET", "/v1/tasks"), ("GET", "/v1/tasks/T/status"), ("GET", "/v1/tasks/T/result"),
                ("HEAD", "/v1/tasks/T/result"), ("DELETE", "/v1/tasks/running"), ("DELETE", "/v1/tasks/T"),
                ("GET", "/v1/files/download/a.mp4"), ("HEAD", "/v1/files/download/a.mp4"),
                ("GET", "/v1/service/status"), ("GET", "/v1/service/metadata")]


@pytest.mark.parametrize("method, path", KEYED_ROUTES)
def test_with_keys_every_v1_route_is_401_without_a_valid_one(keyed_server, method, path):
    with httpx.Client(base_url=keyed_server.url, timeout=30) as http:
        for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": f"Basic {KEY}"},
                        {"Authorization": f"Bearer {KEY[:-1]}"}, {"X-API-Key": KEY}):
            response = http.request(method, path, headers=headers, json={"task_id": "sneaky"})
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.headers["www-authenticate"].startswith("Bearer")
        allowed = http.request(method, path, headers={"Authorization": f"Bearer {KEY}"})
        assert allowed.status_code != 401


def test_with_keys_health_and_metrics_stay_open_and_a_refused_post_queues_nothing(keyed_server):
    with httpx.Client(base_url=keyed_server.url, timeout=30) as http:
        for path in ("/healthz", "/readyz", "/metrics"):
            assert http.get(path).status_code == 200
        assert http.post("/v1/tasks/", json={"task_id": "not-queued"}).status_code == 401
        http.headers["Authorization"] = f"Bearer {KEY}"
        assert http.get("/v1/tasks/not-queued/status").status_code == 404
        task = http.post("/v1/tasks/", json={"infer_steps": 1, "target_video_length": 1, "height": 64,
                                             "width": 64}).json()["task_id"]
        assert wait_status(http, task)["status"] == "completed"
        assert http.get(f"/v1/tasks/{task}/result").status_code == 200
    assert KEY not in " ".join(keyed_server.command)  # the key file keeps it out of the process list
