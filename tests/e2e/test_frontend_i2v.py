"""Image-to-video through the front end, with real processes: uvicorn + tritonserver serving the tiny i2v
repository (and the t2v one, which must refuse images). An uploaded and a base64 image both complete with the
requested or image-derived size; every bad image input gets a one-line 4xx and leaves no file behind; URL
fetching is off by default, and when on refuses private addresses (loopback included) and redirects to them.

With random weights the frames do not resemble the image; what is checked is what the image decides: the
video's size (and that the model got an image at all: an i2v model fails a task without one)."""

from __future__ import annotations

import base64
import http.server
import io
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from frontend.images import derive_size
from tests.conftest import CACHE, REPO_ROOT
from tests.e2e.test_frontend_flow import decode, wait_status

MAX_IMAGE_BYTES = 64 << 10


def image_bytes(width: int, height: int, fmt: str = "PNG") -> bytes:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    buffer = io.BytesIO()
    Image.fromarray(np.stack([x, y, 255 - x], axis=-1), "RGB").save(buffer, format=fmt)
    return buffer.getvalue()


def tree(root: Path) -> set[str]:
    """Every file under `root` but the task database (which changes with every request)."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.name.startswith("tasks.sqlite3")}


def assert_one_line_4xx(response: httpx.Response, status: int, data_dir: Path) -> str:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in response.text
    assert str(data_dir.parent) not in response.text
    return detail


# ---- servers -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_site():
    """A plain HTTP server on loopback: /cat.png, and redirects to a private address and back to itself."""
    png = image_bytes(48, 32)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path == "/cat.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)
                return
            targets = {"/to-metadata": "http://169.254.169.254/latest/meta-data",
                       "/to-self": f"http://127.0.0.1:{self.server.server_port}/cat.png"}
            if self.path in targets:
                self.send_response(302)
                self.send_header("Location", targets[self.path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def i2v_frontend(tmp_path_factory, triton_server_i2v):
    """A front end on the i2v model, URL fetching off (the default), a small image byte limit."""
    from tests.e2e.conftest import FrontendServer

    data_dir = tmp_path_factory.mktemp("frontend-i2v") / "server_data"
    server = FrontendServer.create(data_dir, triton_server_i2v.grpc_url, CACHE / "logs" / "frontend-i2v.log",
                                   ["--max-image-bytes", str(MAX_IMAGE_BYTES)])
    server.start()
    try:
        server.wait_up()
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(i2v_frontend):
    with httpx.Client(base_url=i2v_frontend.url, timeout=60) as http:
        yield http


def expected_size(client: httpx.Client, image_width: int, image_height: int) -> tuple[int, int]:
    metadata = client.get("/v1/service/metadata").json()
    defaults, limits = metadata["defaults"], metadata["limits"]
    return derive_size(image_width, image_height, height=None, width=None, default_height=defaults["height"],
                       default_width=defaults["width"], min_height=limits["min_height"],
                       max_height=limits["max_height"], min_width=limits["min_width"], max_width=limits["max_width"])


# ---- an i2v model: images complete ----------------------------------------------------------------------


def test_post_i2v_script_uploads_an_image_and_the_video_takes_the_image_derived_size(i2v_frontend, client,
                                                                                   tmp_path):
    assert client.get("/v1/service/metadata").json()["model_kind"] == "i2v"
    image = tmp_path / "wide.png"
    image.write_bytes(image_bytes(96, 48))  # 2:1
    output = tmp_path / "wide.mp4"
    done = subprocess.run(
        [sys.executable, "scripts/post_i2v.py", "--url", i2v_frontend.url, "--image", str(image), "--quiet",
         "--infer-steps", "2", "--target-video-length", "5", "--output", str(output), "--task-id", "upload-1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    height, width = expected_size(client, 96, 48)
    assert width > height  # the image's landscape shape, not the model's default
    assert decode(output) == (5, width, height)
    record = client.get("/v1/tasks/upload-1/status").json()
    assert record["message"]["image_path"] == "upload-1.png"
    assert (record["message"]["height"], record["message"]["width"]) == (height, width)
    assert (i2v_frontend.data_dir / "inputs" / "upload-1.png").read_bytes() == image.read_bytes()


@pytest.mark.parametrize("form", ["data_uri", "bare"])
def test_a_base64_image_completes_with_the_requested_size(i2v_frontend, client, tmp_path, form):
    text = base64.b64encode(image_bytes(40, 40, "JPEG")).decode()
    value = "data:image/jpeg;base64," + text if form == "data_uri" else text
    answer = client.post("/v1/tasks/", json={"prompt": "a cat", "image_path": value, "infer_steps": 2,
                                             "target_video_length": 5, "height": 64, "width": 96})
    assert answer.status_code == 200, answer.text
    task_id = answer.json()["task_id"]
    record = wait_status(client, task_id)
    assert record["status"] == "completed", record
    assert record["message"]["image_path"] == f"{task_id}.jpg"
    video = tmp_path / "b64.mp4"
    video.write_bytes(client.get(f"/v1/tasks/{task_id}/result").content)
    assert decode(video) == (5, 96, 64)


def test_a_path_in_the_input_folder_completes_and_is_not_copied(i2v_frontend, client, tmp_path):
    folder = i2v_frontend.data_dir / "inputs" / "library"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tall.png").write_bytes(image_bytes(32, 64))
    before = tree(i2v_frontend.data_dir / "inputs")
    answer = client.post("/v1/tasks/", json={"image_path": "library/tall.png", "infer_steps": 1,
                                             "target_video_length": 1})
    record = wait_status(client, answer.json()["task_id"])
    assert record["status"] == "completed" and record["message"]["image_path"] == "library/tall.png"
    assert record["message"]["height"] > record["message"]["width"]
    assert tree(i2v_frontend.data_dir / "inputs") == before


def test_an_i2v_model_needs_an_image(i2v_frontend, client):
    detail = assert_one_line_4xx(client.post("/v1/tasks/", json={"prompt": "x", "image_path": ""}), 400,
                                 i2v_frontend.data_dir)
    assert "image-to-video" in detail and "give an image" in detail


# ---- an i2v model: bad inputs -----------------------------------------------------------------------


@pytest.fixture
def traps(i2v_frontend):
    """A sibling `inputs_evil/`, a file outside the data folder, a symlink leading to it from inside inputs/."""
    data = i2v_frontend.data_dir
    (data / "inputs_evil").mkdir(exist_ok=True)
    (data / "inputs_evil" / "secret.png").write_bytes(image_bytes(8, 8))
    outside = data.parent / "outside.png"
    outside.write_bytes(image_bytes(8, 8))
    if not (data / "inputs" / "leak.png").is_symlink():
        (data / "inputs" / "leak.png").symlink_to(outside)
    before_data, before_root = tree(data), tree(data.parent)
    yield data
    assert tree(data) == before_data, "a file was left in the data folder"
    assert tree(data.parent) == before_root, "a file was written outside the data folder"


BIG = np.random.default_rng(3).integers(0, 255, (200, 200, 3), dtype=np.uint8)


def big_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(BIG).save(buffer, format="PNG")
    assert len(buffer.getvalue()) > MAX_IMAGE_BYTES
    return buffer.getvalue()


@pytest.mark.parametrize("upload, image_path, status, words", [
    (b"this is not an image", "", 400, "does not decode"),
    ("big", "", 413, "byte limit"),
    (None, "../outside.png", 400, "inside the input folder"),
    (None, "../inputs_evil/secret.png", 400, "inside the input folder"),
    (None, "library/../../outside.png", 400, "inside the input folder"),
    (None, "/etc/passwd", 400, "inside the input folder"),
    (None, "leak.png", 400, "inside the input folder"),
    (None, "no-such-file.png", 400, "neither a file"),
    (None, base64.b64encode(b"GIF89a but not really").decode(), 400, "does not decode"),
    (None, "data:text/plain;base64,aGVsbG8=", 400, "data:image"),
    (None, "http://example.com/cat.png", 400, "URLs are disabled"),
    (None, "https://127.0.0.1/cat.png", 400, "URLs are disabled"),
], ids=["upload-not-image", "upload-too-large", "dotdot", "sibling-prefix", "dotdot-via-subfolder", "absolute",
        "symlink-out", "missing", "base64-not-image", "data-uri-not-image", "url-disabled", "url-disabled-2"])
def test_every_bad_image_input_is_a_one_line_4xx_and_leaves_no_file(client, traps, upload, image_path, status,
                                                                     words):
    if upload is not None:
        content = big_png() if upload == "big" else upload
        response = client.post("/v1/tasks/form", data={"prompt": "x", "image_path": image_path},
                               files={"image_file": ("cat.png", content, "image/png")})
    else:
        response = client.post("/v1/tasks/", json={"prompt": "x", "image_path": image_path})
    assert words in assert_one_line_4xx(response, status, traps)


# ---- URL fetching ---------------------------------------------------------------------------------------


def test_url_fetching_when_on_refuses_loopback_and_private_addresses(frontend_factory, triton_server_i2v, image_site):
    server = frontend_factory("--allow-url-fetch", triton_url=triton_server_i2v.grpc_url)
    before = tree(server.data_dir)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for url in (f"{image_site}/cat.png", f"http://localhost:{image_site.rsplit(':', 1)[1]}/cat.png",
                    "http://169.254.169.254/latest/meta-data", "http://10.0.0.1/cat.png", "http://[::1]/cat.png"):
            detail = assert_one_line_4xx(client.post("/v1/tasks/", json={"image_path": url}), 400, server.data_dir)
            assert "only public addresses" in detail, (url, detail)
    assert tree(server.data_dir) == before


def test_a_trusted_network_url_is_fetched_but_a_redirect_to_a_private_address_is_not(frontend_factory, triton_server_i2v,
                                                                                      image_site, tmp_path):
    server = frontend_factory("--allow-url-fetch", "--url-fetch-allow-networks", "127.0.0.1/32",
                              triton_url=triton_server_i2v.grpc_url)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        before = tree(server.data_dir / "inputs")
        detail = assert_one_line_4xx(
            client.post("/v1/tasks/", json={"image_path": f"{image_site}/to-metadata"}), 400, server.data_dir)
        assert "link-local" in detail
        assert tree(server.data_dir / "inputs") == before
        answer = client.post("/v1/tasks/", json={"image_path": f"{image_site}/to-self", "infer_steps": 1,
                                                 "target_video_length": 1})
        assert answer.status_code == 200, answer.text
        record = wait_status(client, answer.json()["task_id"])
        assert record["status"] == "completed", record
        assert record["message"]["image_path"] == f"{record['task_id']}.png"
        assert record["message"]["width"] > record["message"]["height"]  # 48x32 landscape


# ---- a t2v model refuses images -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["upload", "base64", "path"])
def test_a_t2v_server_refuses_a_valid_image_and_writes_nothing(frontend_server, kind):
    data = frontend_server.data_dir
    (data / "inputs").mkdir(parents=True, exist_ok=True)
    (data / "inputs" / "placed.png").write_bytes(image_bytes(16, 16))
    before = tree(data)
    with httpx.Client(base_url=frontend_server.url, timeout=30) as client:
        if kind == "upload":
            response = client.post("/v1/tasks/form", data={"prompt": "x"},
                                   files={"image_file": ("cat.png", image_bytes(16, 16), "image/png")})
        else:
            value = base64.b64encode(image_bytes(16, 16)).decode() if kind == "base64" else "placed.png"
            response = client.post("/v1/tasks/", json={"prompt": "x", "image_path": value})
        detail = assert_one_line_4xx(response, 400, data)
    assert detail == "image-to-video is not available: the served model is text-to-video (leave image_path empty)"
    assert tree(data) == before


def test_a_t2v_server_still_says_what_is_wrong_with_a_bad_image(frontend_server):
    with httpx.Client(base_url=frontend_server.url, timeout=30) as client:
        for value, words in (("../../etc/passwd", "inside the input folder"), ("http://10.0.0.1/", "URLs are disabled"),
                             ("aGVsbG8gd29ybGQ=", "does not decode")):
            detail = assert_one_line_4xx(client.post("/v1/tasks/", json={"image_path": value}), 400,
                                         frontend_server.data_dir)
            assert words in detail
