"""Every validation rule of docs API.md (/v1 contract), through the real app on a fake Triton client: the
right 4xx, a one-line `detail` without server paths, and nothing written outside the data folder."""

from __future__ import annotations

import base64
import io
import os

import pytest
from PIL import Image

from frontend.protocol import generate_task_id, normalize_save_video_path, round_frames
from tests.unit.frontend_fakes import AppHarness, files_outside, wait_status


@pytest.fixture
def app(tmp_path):
    with AppHarness(tmp_path, max_request_bytes=64 << 10, max_upload_bytes=256 << 10) as harness:
        before = files_outside(tmp_path, harness.settings.data_dir)
        yield harness
        assert files_outside(tmp_path, harness.settings.data_dir) == before, "wrote outside the data folder"


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def assert_clean_error(response, status: int, tmp_path) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    detail = body["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail
    assert str(tmp_path) not in response.text
    return detail


# ---- task_id ----------------------------------------------------------------------------------------


def test_generated_task_ids_are_five_groups_of_four():
    import re

    assert re.fullmatch(r"[A-Z0-9]{4}(-[A-Z0-9]{4}){4}", generate_task_id())


@pytest.mark.parametrize("task_id", ["has space", "a/b", "x" * 65, "dots.dots", "ünicode", "running"])
def test_bad_task_ids_are_refused_with_400(app, tmp_path, task_id):
    detail = assert_clean_error(app.client.post("/v1/tasks/", json={"task_id": task_id}), 400, tmp_path)
    assert "task_id" in detail


def test_a_client_chosen_task_id_is_used_and_must_be_unused(app, tmp_path):
    answer = app.client.post("/v1/tasks/", json={"task_id": "my_task-01", "prompt": "cats"})
    assert answer.status_code == 200 and answer.json()["task_id"] == "my_task-01"
    assert answer.json()["save_video_path"] == "my_task-01.mp4"
    wait_status(app.client, "my_task-01")
    detail = assert_clean_error(app.client.post("/v1/tasks/", json={"task_id": "my_task-01"}), 400, tmp_path)
    assert "already exists" in detail


# ---- save_video_path --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "/etc/evil.mp4", "../escape.mp4", "a/../../escape.mp4", "sub/../../x.mp4", "video.avi", "noext", ".mp4",
    "a\\..\\b.mp4", "bad\x00name.mp4", "line\nbreak.mp4", "dir/", "x" * 1100 + ".mp4",
])
def test_save_video_path_outside_outputs_or_not_mp4_is_422(app, tmp_path, path):
    detail = assert_clean_error(app.client.post("/v1/tasks/", json={"save_video_path": path}), 422, tmp_path)
    assert detail.startswith("save_video_path")


def test_save_video_path_is_normalised_and_may_use_subfolders(app):
    answer = app.client.post("/v1/tasks/", json={"save_video_path": "./runs//day1/./cat.mp4"})
    assert answer.status_code == 200 and answer.json()["save_video_path"] == "runs/day1/cat.mp4"
    assert wait_status(app.client, answer.json()["task_id"])["status"] == "completed"
    assert (app.outputs / "runs" / "day1" / "cat.mp4").is_file()


def test_save_video_path_through_a_symlink_that_leads_out_is_422(app, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.symlink(outside, app.outputs / "link")
    detail = assert_clean_error(app.client.post("/v1/tasks/", json={"save_video_path": "link/x.mp4"}), 422, tmp_path)
    assert "output folder" in detail
    assert list(outside.iterdir()) == []


def test_save_video_path_with_a_name_over_the_file_system_limit_is_422(app, tmp_path):
    detail = assert_clean_error(app.client.post("/v1/tasks/", json={"save_video_path": "é" * 130 + ".mp4"}), 422,
                                tmp_path)
    assert "at most 240 bytes" in detail
    assert app.client.post("/v1/tasks/", json={"save_video_path": "x" * 236 + ".mp4"}).status_code == 200


@pytest.mark.parametrize("existing, path, words", [
    ("folder", "taken.mp4", "names an existing folder"),
    ("file", "taken.mp4/inner.mp4", "one of its folders is an existing file"),
    ("file", "taken.mp4/deeper/inner.mp4", "one of its folders is an existing file"),
])
def test_save_video_path_that_could_not_be_written_is_422_before_anything_runs(app, tmp_path, existing, path, words):
    taken = app.outputs / "taken.mp4"
    taken.mkdir() if existing == "folder" else taken.write_bytes(b"an earlier result")
    detail = assert_clean_error(app.client.post("/v1/tasks/", json={"save_video_path": path}), 422, tmp_path)
    assert words in detail
    assert app.client.get("/v1/tasks/").json() == {}


def test_normalize_save_video_path_rules():
    assert normalize_save_video_path("./a.mp4") == "a.mp4"
    assert normalize_save_video_path("A/B.MP4") == "A/B.MP4"
    for bad in ("../a.mp4", "/a.mp4", "a.mov", ""):
        with pytest.raises(ValueError):
            normalize_save_video_path(bad)


# ---- numbers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("infer_steps", 0), ("infer_steps", 1001), ("infer_steps", -5), ("infer_steps", "many"), ("infer_steps", 2.5),
    ("target_video_length", 0), ("target_video_length", 82), ("target_video_length", 100000),
    ("seed", -1), ("seed", 2**63), ("height", 100), ("height", 0), ("height", 496), ("width", 24),
    ("width", 848), ("guidance_scale", -0.5), ("guidance_scale", 1000), ("guidance_scale", "high"),
    ("sample_shift", 0), ("sample_shift", -1.0), ("fps", 0), ("fps", 1000), ("prompt", 12), ("prompt", ["a"]),
])
def test_out_of_range_or_mistyped_numbers_are_422(app, tmp_path, field, value):
    detail = assert_clean_error(app.client.post("/v1/tasks/", json={field: value}), 422, tmp_path)
    assert field in detail
    assert app.client.get("/v1/tasks/").json() == {}


def test_limits_come_from_the_model_config(app, tmp_path):
    # the fake model allows 32..480 x 32..832 and 81 frames; 480x832x81 is fine
    answer = app.client.post("/v1/tasks/", json={"height": 480, "width": 832, "target_video_length": 81,
                                                 "infer_steps": 1})
    assert answer.status_code == 200
    detail = assert_clean_error(app.client.post("/v1/tasks/", json={"height": 512}), 422, tmp_path)
    assert "32..480" in detail


def test_frame_count_is_rounded_to_4k_plus_1_and_recorded(app):
    answer = app.client.post("/v1/tasks/", json={"target_video_length": 20, "infer_steps": 1})
    record = app.client.get(f"/v1/tasks/{answer.json()['task_id']}/status").json()
    assert record["message"]["target_video_length"] == 21
    assert app.fake.calls == [] or app.fake.calls[0][1]["num_frames"] == 21
    assert [round_frames(n, 81) for n in (1, 2, 3, 4, 5, 80, 81)] == [1, 1, 5, 5, 5, 81, 81]
    assert round_frames(81, 77) == 77


def test_defaults_are_explicit_and_not_sticky(app):
    first = app.client.post("/v1/tasks/", json={"infer_steps": 3, "seed": 7, "height": 64}).json()["task_id"]
    second = app.client.post("/v1/tasks/", json={"prompt": "defaults please"}).json()["task_id"]
    wait_status(app.client, second)
    used = app.client.get(f"/v1/tasks/{second}/status").json()["message"]
    assert used == {"task_id": second, "prompt": "defaults please", "negative_prompt": "", "image_path": "",
                    "save_video_path": f"{second}.mp4", "infer_steps": 8, "target_video_length": 17, "seed": 42,
                    "height": 96, "width": 160, "guidance_scale": 5.0, "sample_shift": 3.0, "fps": 16}
    assert app.client.get(f"/v1/tasks/{first}/status").json()["message"]["infer_steps"] == 3
    null_body = app.client.post("/v1/tasks/", json={"infer_steps": None, "seed": None}).json()["task_id"]
    assert app.client.get(f"/v1/tasks/{null_body}/status").json()["message"]["infer_steps"] == 8


def test_unknown_and_unsupported_fields_are_ignored(app):
    answer = app.client.post("/v1/tasks/", json={
        "prompt": "x", "brand_new_field": {"a": 1}, "use_prompt_enhancer": True, "num_fragments": 3,
        "audio_path": "a.wav", "video_duration": 5})
    assert answer.status_code == 200
    message = app.client.get(f"/v1/tasks/{answer.json()['task_id']}/status").json()["message"]
    assert "brand_new_field" not in message and "use_prompt_enhancer" not in message


def test_a_long_prompt_is_fine_but_a_huge_body_is_413(app, tmp_path):
    assert app.client.post("/v1/tasks/", json={"prompt": "cat " * 5000}).status_code == 200
    assert_clean_error(app.client.post("/v1/tasks/", json={"prompt": "cat " * 20000}), 413, tmp_path)


def test_a_streamed_body_over_the_limit_is_413(app, tmp_path):
    def chunks():
        for _ in range(100):
            yield b"x" * (8 << 10)

    response = app.client.post("/v1/tasks/", content=chunks(), headers={"content-type": "application/json"})
    assert_clean_error(response, 413, tmp_path)
    response = app.client.post("/v1/tasks/form", content=chunks(),
                               headers={"content-type": "multipart/form-data; boundary=zz"})
    assert_clean_error(response, 413, tmp_path)


def test_a_body_that_is_not_json_or_not_an_object_is_422(app, tmp_path):
    response = app.client.post("/v1/tasks/", content=b"{not json", headers={"content-type": "application/json"})
    assert_clean_error(response, 422, tmp_path)
    assert_clean_error(app.client.post("/v1/tasks/", json=[1, 2]), 422, tmp_path)


# ---- image inputs (no image-to-video model is served yet) -------------------------------------------


@pytest.mark.parametrize("image_path, words", [
    ("not base64 at all!", "neither a file"),
    ("aGVsbG8gd29ybGQ=", "does not decode"),  # base64 of "hello world"
    ("data:text/plain;base64,aGVsbG8=", "data:image"),
    ("data:image/png;base64,aGVsbG8=", "does not decode"),
    ("http://169.254.169.254/latest/meta-data", "URLs are disabled"),
    ("../../etc/passwd", "inside the input folder"),
    ("/etc/passwd", "inside the input folder"),
])
def test_bad_image_inputs_are_400(app, tmp_path, image_path, words):
    detail = assert_clean_error(app.client.post("/v1/tasks/", json={"image_path": image_path}), 400, tmp_path)
    assert words in detail


@pytest.mark.parametrize("encoding", ["bare", "data_uri", "file"])
def test_a_valid_image_is_400_while_no_image_to_video_model_is_served(app, tmp_path, encoding):
    data = png_bytes()
    value = {"bare": base64.b64encode(data).decode(),
             "data_uri": "data:image/png;base64," + base64.b64encode(data).decode(),
             "file": "cat.png"}[encoding]
    if encoding == "file":
        (app.settings.input_dir / "cat.png").write_bytes(data)
    detail = assert_clean_error(app.client.post("/v1/tasks/", json={"image_path": value}), 400, tmp_path)
    assert "image-to-video is not available" in detail


# ---- /v1/tasks/form ---------------------------------------------------------------------------------


def test_form_without_an_image_runs_text_to_video_with_the_same_defaults(app):
    answer = app.client.post("/v1/tasks/form", data={"prompt": "cats", "infer_steps": "2", "seed": ""},
                             files={"unused": ("", b"")})
    assert answer.status_code == 200, answer.text
    record = wait_status(app.client, answer.json()["task_id"])
    assert record["status"] == "completed"
    assert record["message"]["infer_steps"] == 2 and record["message"]["seed"] == 42
    assert record["message"]["height"] == 96


def test_form_fields_follow_the_json_rules(app, tmp_path):
    response = app.client.post("/v1/tasks/form", data={"infer_steps": "0"}, files={"x": ("", b"")})
    assert "infer_steps" in assert_clean_error(response, 422, tmp_path)
    response = app.client.post("/v1/tasks/form", data={"save_video_path": "../x.mp4"}, files={"x": ("", b"")})
    assert_clean_error(response, 422, tmp_path)
    response = app.client.post("/v1/tasks/form", data={"task_id": "bad id"}, files={"x": ("", b"")})
    assert_clean_error(response, 400, tmp_path)


def test_form_upload_that_is_not_an_image_is_400(app, tmp_path):
    response = app.client.post("/v1/tasks/form", files={"image_file": ("cat.png", b"MZ\x90\x00 not an image")})
    assert "does not decode" in assert_clean_error(response, 400, tmp_path)


def test_form_upload_of_an_image_is_400_while_image_to_video_is_not_served(app, tmp_path):
    response = app.client.post("/v1/tasks/form", data={"prompt": "cat"},
                               files={"image_file": ("cat.png", png_bytes(), "image/png")})
    assert "image-to-video" in assert_clean_error(response, 400, tmp_path)
    assert list(app.settings.input_dir.iterdir()) == []


def test_form_upload_over_the_limit_is_413(app, tmp_path):
    response = app.client.post("/v1/tasks/form", files={"image_file": ("big.png", b"\0" * (400 << 10))})
    assert_clean_error(response, 413, tmp_path)


def test_form_route_wants_a_form_body(app, tmp_path):
    assert_clean_error(app.client.post("/v1/tasks/form", json={"prompt": "x"}), 400, tmp_path)


# ---- unknown ids and finished tasks -----------------------------------------------------------------


@pytest.mark.parametrize("task_id", ["NOPE-NOPE", "%2e%2e", "a" * 200, "running"])
def test_unknown_task_status_is_404_with_the_lightx2v_body(app, task_id):
    response = app.client.get(f"/v1/tasks/{task_id}/status")
    assert response.status_code == 404
    assert response.json() == {"status": "not_found", "task_id": response.json()["task_id"]}


def test_result_of_an_unknown_or_unfinished_task_is_404(app):
    response = app.client.get("/v1/tasks/NOPE/result")
    assert response.status_code == 404
    assert response.json() == {"detail": "Task not completed or does not exist"}
    app.fake.step_delay_s = 0.05
    task_id = app.client.post("/v1/tasks/", json={"infer_steps": 100}).json()["task_id"]
    assert app.client.get(f"/v1/tasks/{task_id}/result").status_code == 404
    app.client.delete(f"/v1/tasks/{task_id}")


def test_delete_unknown_is_404_and_finished_is_409(app, tmp_path):
    response = app.client.delete("/v1/tasks/NOPE")
    assert response.status_code == 404 and response.json() == {"status": "not_found", "task_id": "NOPE"}
    task_id = app.client.post("/v1/tasks/", json={"infer_steps": 1}).json()["task_id"]
    wait_status(app.client, task_id)
    assert "already completed" in assert_clean_error(app.client.delete(f"/v1/tasks/{task_id}"), 409, tmp_path)


def test_list_filters_are_validated(app, tmp_path):
    assert_clean_error(app.client.get("/v1/tasks/?status=sleeping"), 422, tmp_path)
    assert_clean_error(app.client.get("/v1/tasks/?limit=0"), 422, tmp_path)
