"""Confined paths, atomic writes and downloads (Range, HEAD, traversal, symlinks)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from frontend.files import PathOutsideRoot, atomic_write, contained_path
from tests.unit.frontend_fakes import AppHarness, files_outside


@pytest.fixture
def layout(tmp_path):
    """outputs/ with a video, a sibling outputs_evil/ with a secret, and links in and out."""
    outputs = tmp_path / "outputs"
    (outputs / "sub").mkdir(parents=True)
    (outputs / "video.mp4").write_bytes(bytes(range(256)) * 4)
    evil = tmp_path / "outputs_evil"
    evil.mkdir()
    (evil / "secret.mp4").write_bytes(b"secret")
    os.symlink(evil / "secret.mp4", outputs / "leak.mp4")
    os.symlink(evil, outputs / "leakdir")
    os.symlink(outputs / "video.mp4", outputs / "sub" / "alias.mp4")
    return outputs


@pytest.mark.parametrize("name", [
    "../outputs_evil/secret.mp4", "/etc/passwd", "leak.mp4", "leakdir/secret.mp4", "sub/../../outputs_evil/x",
    "..", ".", "", "a\x00b",
])
def test_contained_path_refuses_everything_that_leads_out(layout, name):
    with pytest.raises(PathOutsideRoot):
        contained_path(layout, name)


def test_contained_path_accepts_names_inside_including_links_that_stay_inside(layout):
    assert contained_path(layout, "video.mp4") == layout.resolve() / "video.mp4"
    assert contained_path(layout, "sub/alias.mp4") == layout.resolve() / "video.mp4"
    assert contained_path(layout, "new/dir/file.mp4") == layout.resolve() / "new" / "dir" / "file.mp4"


def test_atomic_write_creates_folders_and_leaves_no_temporary_files(tmp_path):
    root = tmp_path / "outputs"
    atomic_write(root, "a/b/c.mp4", b"first")
    atomic_write(root, "a/b/c.mp4", b"second")
    assert (root / "a" / "b" / "c.mp4").read_bytes() == b"second"
    assert [p.name for p in (root / "a" / "b").iterdir()] == ["c.mp4"]


def test_atomic_write_replaces_a_symlink_instead_of_writing_through_it(layout):
    atomic_write(layout, "sub/alias.mp4", b"new")
    assert not (layout / "sub" / "alias.mp4").is_symlink()
    assert (layout / "video.mp4").read_bytes() == bytes(range(256)) * 4


def test_atomic_write_refuses_a_symlinked_folder_that_leads_out(layout):
    with pytest.raises(PathOutsideRoot):
        atomic_write(layout, "leakdir/x.mp4", b"no")
    assert not (layout.parent / "outputs_evil" / "x.mp4").exists()


# ---- the download route -----------------------------------------------------------------------------


@pytest.fixture
def app(tmp_path):
    with AppHarness(tmp_path) as harness:
        outputs = harness.outputs
        (outputs / "sub").mkdir(parents=True, exist_ok=True)
        (outputs / "video.mp4").write_bytes(bytes(range(256)) * 4)
        evil = harness.settings.data_dir / "outputs_evil"
        evil.mkdir()
        (evil / "secret.mp4").write_bytes(b"secret")
        (tmp_path / "outside.mp4").write_bytes(b"outside")
        os.symlink(tmp_path / "outside.mp4", outputs / "leak.mp4")
        os.symlink(evil, outputs / "leakdir")
        before = files_outside(tmp_path, harness.settings.data_dir)
        yield harness
        assert files_outside(tmp_path, harness.settings.data_dir) == before


def test_download_streams_a_file_with_length_and_disposition(app):
    response = app.client.get("/v1/files/download/video.mp4")
    assert response.status_code == 200 and response.content == bytes(range(256)) * 4
    assert response.headers["content-type"] == "video/mp4"
    assert response.headers["content-length"] == "1024"
    assert response.headers["content-disposition"] == 'attachment; filename="video.mp4"'
    assert response.headers["accept-ranges"] == "bytes"


def test_download_range_gives_206_with_the_bytes_asked_for(app):
    response = app.client.get("/v1/files/download/video.mp4", headers={"Range": "bytes=10-19"})
    assert response.status_code == 206
    assert response.content == bytes(range(10, 20))
    assert response.headers["content-range"] == "bytes 10-19/1024"
    tail = app.client.get("/v1/files/download/video.mp4", headers={"Range": "bytes=-4"})
    assert tail.status_code == 206 and tail.content == bytes(range(252, 256))
    assert app.client.get("/v1/files/download/video.mp4", headers={"Range": "bytes=5000-"}).status_code == 416


def test_download_head_answers_headers_only(app):
    response = app.client.head("/v1/files/download/video.mp4")
    assert response.status_code == 200 and response.content == b""
    assert response.headers["content-length"] == "1024"


@pytest.mark.parametrize("path", [
    "..%2Foutputs_evil%2Fsecret.mp4",  # the sibling-prefix case a string-prefix check lets through
    "..%2F..%2Foutside.mp4",
    "%2Fetc%2Fpasswd",
    "leak.mp4",  # symlink to a file outside
    "leakdir%2Fsecret.mp4",  # symlinked folder outside
    "sub%2F..%2F..%2Foutputs_evil%2Fsecret.mp4",
    "video.mp4%00.txt",
])
def test_download_outside_the_output_folder_is_403(app, tmp_path, path):
    response = app.client.get(f"/v1/files/download/{path}")
    assert response.status_code == 403, response.text
    assert response.json() == {"detail": "access to this path is not allowed"}
    assert b"secret" not in response.content and str(tmp_path) not in response.text


@pytest.mark.parametrize("path", ["missing.mp4", "sub", "sub%2Fnothing.mp4"])
def test_download_of_a_missing_file_or_a_folder_is_404(app, path):
    response = app.client.get(f"/v1/files/download/{path}")
    assert response.status_code == 404 and response.json() == {"detail": "file not found"}


def test_result_route_streams_the_completed_video_with_range_and_head(app):
    from tests.unit.frontend_fakes import wait_status

    task_id = app.client.post("/v1/tasks/", json={"prompt": "cats", "infer_steps": 2}).json()["task_id"]
    assert wait_status(app.client, task_id)["status"] == "completed"
    full = app.client.get(f"/v1/tasks/{task_id}/result")
    assert full.status_code == 200 and full.content == b"FAKE-MP4:" + task_id.encode()
    assert full.headers["content-disposition"] == f'attachment; filename="{task_id}.mp4"'
    part = app.client.get(f"/v1/tasks/{task_id}/result", headers={"Range": "bytes=0-3"})
    assert part.status_code == 206 and part.content == b"FAKE"
    head = app.client.head(f"/v1/tasks/{task_id}/result")
    assert head.status_code == 200 and head.headers["content-length"] == str(len(full.content))
    same = app.client.get(f"/v1/files/download/{task_id}.mp4")
    assert same.content == full.content


def test_result_of_a_completed_task_whose_file_was_deleted_is_404(app):
    from tests.unit.frontend_fakes import wait_status

    task_id = app.client.post("/v1/tasks/", json={"infer_steps": 1}).json()["task_id"]
    wait_status(app.client, task_id)
    (app.outputs / f"{task_id}.mp4").unlink()
    response = app.client.get(f"/v1/tasks/{task_id}/result")
    assert response.status_code == 404


def test_no_absolute_server_path_in_any_answer(app, tmp_path):
    for url in ["/v1/service/metadata", "/v1/service/status", "/v1/tasks/", "/v1/files/download/..%2Fx",
                "/v1/files/download/nothing.mp4"]:
        assert str(tmp_path) not in app.client.get(url).text
    assert str(Path.cwd()) not in app.client.get("/v1/service/metadata").text
