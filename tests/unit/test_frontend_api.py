"""The /v1 routes on a fake Triton client: the lightx2v flow, listing, service status, stop, Triton going away
and coming back, metrics, and settings."""

from __future__ import annotations

import time

import pytest

from frontend.settings import Settings, parse_settings
from tests.unit.frontend_fakes import AppHarness, FakeTritonClient, wait_status, wait_until


@pytest.fixture
def app(tmp_path):
    with AppHarness(tmp_path) as harness:
        yield harness


@pytest.mark.parametrize("route", ["/v1/tasks/", "/v1/tasks"])
def test_lightx2v_flow_post_poll_result(app, route):
    answer = app.client.post(route, json={"prompt": "cats boxing", "negative_prompt": "blurry"})
    assert answer.status_code == 200 and not answer.history  # no redirect
    body = answer.json()
    assert set(body) == {"task_id", "task_status", "save_video_path"} and body["task_status"] == "processing"
    record = wait_status(app.client, body["task_id"])
    assert record["status"] == "completed" and record["success"] is True and record["error"] is None
    assert record["progress"] == {"step": 8, "total_steps": 8}
    assert record["created_at"].endswith("Z") and record["start_time"] and record["completion_time"]
    result = app.client.get(f"/v1/tasks/{body['task_id']}/result")
    assert result.status_code == 200 and result.headers["content-type"] == "video/mp4"
    request_id, inputs = app.fake.calls[-1]
    assert request_id == body["task_id"]
    assert inputs == {"prompt": "cats boxing", "negative_prompt": "blurry", "seed": 42, "num_inference_steps": 8,
                      "num_frames": 17, "height": 96, "width": 160, "guidance_scale": 5.0, "shift": 3.0, "fps": 16}


def test_list_is_keyed_by_id_newest_first_with_filters(app):
    ids = [app.client.post("/v1/tasks/", json={"infer_steps": 1}).json()["task_id"] for _ in range(3)]
    for task_id in ids:
        wait_status(app.client, task_id)
    listing = app.client.get("/v1/tasks/").json()
    assert list(listing) == ids[::-1]
    assert listing[ids[0]]["task_id"] == ids[0]
    assert list(app.client.get("/v1/tasks?limit=2").json()) == ids[:0:-1]
    assert app.client.get("/v1/tasks/?status=failed").json() == {}
    assert len(app.client.get("/v1/tasks/?status=completed").json()) == 3


def test_three_tasks_posted_at_once_run_in_order_with_queue_positions(app):
    app.fake.step_delay_s = 0.01
    answers = [app.client.post("/v1/tasks/", json={"infer_steps": 5}).json() for _ in range(3)]
    assert [a["task_status"] for a in answers] == ["processing", "pending", "pending"]
    positions = [app.client.get(f"/v1/tasks/{a['task_id']}/status").json()["queue_position"] for a in answers]
    assert positions == [None, 1, 2]
    records = [wait_status(app.client, a["task_id"]) for a in answers]
    assert [request_id for request_id, _ in app.fake.calls] == [a["task_id"] for a in answers]
    assert app.fake.max_concurrent == 1
    assert records[0]["completion_time"] <= records[1]["start_time"] <= records[2]["start_time"]


def test_full_queue_answers_429_with_retry_after(tmp_path):
    with AppHarness(tmp_path, max_queue_size=1) as app:
        app.fake.step_delay_s = 0.05
        assert app.client.post("/v1/tasks/", json={"infer_steps": 200}).status_code == 200
        assert app.client.post("/v1/tasks/", json={"infer_steps": 200}).status_code == 200
        refused = app.client.post("/v1/tasks/", json={"infer_steps": 200})
        assert refused.status_code == 429 and refused.json() == {"detail": "Service busy"}
        assert int(refused.headers["retry-after"]) >= 1
        app.client.delete("/v1/tasks/running")


def test_strict_busy_mode_answers_400_service_busy(tmp_path):
    with AppHarness(tmp_path, strict_busy=True) as app:
        app.fake.step_delay_s = 0.05
        assert app.client.post("/v1/tasks/", json={"infer_steps": 200}).status_code == 200
        refused = app.client.post("/v1/tasks/", json={})
        assert refused.status_code == 400 and refused.json() == {"detail": "Service busy"}
        app.client.delete("/v1/tasks/running")


def test_service_status_is_busy_while_a_task_runs_and_idle_after(app):
    assert app.client.get("/v1/service/status").json() == {
        "service_status": "idle", "task_id": None, "start_time": None, "queue_length": 0, "ready": True}
    app.fake.step_delay_s = 0.02
    task_id = app.client.post("/v1/tasks/", json={"infer_steps": 200}).json()["task_id"]
    status = app.client.get("/v1/service/status").json()
    assert status["service_status"] == "busy" and status["task_id"] == task_id and status["start_time"]
    assert app.client.delete("/v1/tasks/running").json()["stop_status"] == "success"
    assert app.client.get("/v1/service/status").json()["service_status"] == "idle"


def test_with_two_slots_the_service_is_idle_while_one_slot_is_free(tmp_path):
    with AppHarness(tmp_path, slots=2) as app:
        app.fake.step_delay_s = 0.02
        first = app.client.post("/v1/tasks/", json={"infer_steps": 300}).json()["task_id"]
        status = app.client.get("/v1/service/status").json()
        assert status["service_status"] == "idle" and status["task_id"] == first
        second = app.client.post("/v1/tasks/", json={"infer_steps": 300}).json()
        assert second["task_status"] == "processing"
        assert app.client.get("/v1/service/status").json()["service_status"] == "busy"
        app.client.delete(f"/v1/tasks/{first}")
        app.client.delete(f"/v1/tasks/{second['task_id']}")


def test_stop_running_cancels_within_a_step_and_the_next_task_runs(app):
    assert app.client.delete("/v1/tasks/running").json() == {"stop_status": "do_nothing",
                                                             "reason": "No running task found."}
    app.fake.step_delay_s = 0.01
    long_id = app.client.post("/v1/tasks/", json={"infer_steps": 500}).json()["task_id"]
    next_id = app.client.post("/v1/tasks/", json={"infer_steps": 2}).json()["task_id"]
    wait_until(lambda: app.client.get(f"/v1/tasks/{long_id}/status").json()["progress"]["step"] >= 3)
    began = time.monotonic()
    answer = app.client.delete("/v1/tasks/running")
    assert time.monotonic() - began < 1.0
    assert answer.json()["stop_status"] == "success" and long_id in answer.json()["reason"]
    record = app.client.get(f"/v1/tasks/{long_id}/status").json()
    assert record["status"] == "cancelled" and record["success"] is False
    assert record["progress"]["step"] < 500
    assert app.fake.cancelled == [long_id]
    assert wait_status(app.client, next_id)["status"] == "completed"


def test_delete_by_id_cancels_pending_and_running_tasks(app):
    app.fake.step_delay_s = 0.01
    running = app.client.post("/v1/tasks/", json={"infer_steps": 500}).json()["task_id"]
    pending = app.client.post("/v1/tasks/", json={"infer_steps": 500}).json()["task_id"]
    answer = app.client.delete(f"/v1/tasks/{pending}")
    assert answer.status_code == 200 and answer.json()["status"] == "cancelled"
    answer = app.client.delete(f"/v1/tasks/{running}")
    assert answer.status_code == 200 and answer.json()["status"] == "cancelled"
    assert [request_id for request_id, _ in app.fake.calls] == [running]


def test_model_error_fails_the_task_with_its_message(app):
    from frontend.triton_client import PipelineError

    app.fake.fail_with = PipelineError("height must be a multiple of 16")
    task_id = app.client.post("/v1/tasks/", json={"infer_steps": 3}).json()["task_id"]
    record = wait_status(app.client, task_id)
    assert record["status"] == "failed" and record["error"] == "height must be a multiple of 16"
    assert app.client.get(f"/v1/tasks/{task_id}/result").status_code == 404


def test_triton_going_away_fails_the_running_task_and_pending_ones_wait_until_it_is_back(app):
    app.fake.step_delay_s = 0.01
    first = app.client.post("/v1/tasks/", json={"infer_steps": 300}).json()["task_id"]
    second = app.client.post("/v1/tasks/", json={"infer_steps": 2}).json()["task_id"]
    wait_until(lambda: app.client.get(f"/v1/tasks/{first}/status").json()["progress"]["step"] >= 2)
    app.fake.ready = False
    record = wait_status(app.client, first)
    assert record["status"] == "failed" and "model server unavailable" in record["error"]
    status = app.client.get("/v1/service/status").json()
    assert status["service_status"] == "busy" and status["ready"] is False
    assert app.client.get("/readyz").status_code == 503
    assert app.client.get("/healthz").status_code == 200
    time.sleep(0.2)
    assert app.client.get(f"/v1/tasks/{second}/status").json()["status"] == "pending"
    app.fake.ready = True
    assert wait_status(app.client, second)["status"] == "completed"
    assert app.client.get("/readyz").status_code == 200


def test_front_end_starts_without_triton_and_picks_up_the_model_defaults_later(tmp_path):
    with AppHarness(tmp_path, fake=FakeTritonClient(ready=False)) as app:
        assert app.client.get("/v1/service/status").json()["service_status"] == "busy"
        assert app.client.get("/readyz").status_code == 503
        metadata = app.client.get("/v1/service/metadata").json()
        assert metadata["ready"] is False and metadata["defaults"] == {}
        answer = app.client.post("/v1/tasks/", json={"prompt": "queued while Triton loads"})
        assert answer.status_code == 200 and answer.json()["task_status"] == "pending"
        app.fake.ready = True
        record = wait_status(app.client, answer.json()["task_id"])
        assert record["status"] == "completed"
        assert record["message"]["infer_steps"] == 8 and record["message"]["height"] == 96
        assert app.client.get("/v1/service/metadata").json()["defaults"]["infer_steps"] == 8


def test_server_defaults_override_the_model_defaults(tmp_path):
    with AppHarness(tmp_path, default_infer_steps=2, default_seed=7) as app:
        task_id = app.client.post("/v1/tasks/", json={}).json()["task_id"]
        message = wait_status(app.client, task_id)["message"]
        assert message["infer_steps"] == 2 and message["seed"] == 7
        assert app.client.get("/v1/service/metadata").json()["defaults"]["infer_steps"] == 2


def test_metadata_names_the_model_defaults_and_limits(app):
    metadata = app.client.get("/v1/service/metadata").json()
    assert metadata["model_name"] == "wan-tiny" and metadata["model_kind"] == "t2v"
    assert metadata["backend"] == "onnxruntime" and metadata["ready"] is True
    assert metadata["defaults"]["target_video_length"] == 17
    assert metadata["limits"]["max_height"] == 480


def test_metrics_show_tasks_queue_and_step_time(app):
    task_id = app.client.post("/v1/tasks/", json={"infer_steps": 4}).json()["task_id"]
    wait_status(app.client, task_id)
    text = app.client.get("/metrics").text
    assert 'wan_frontend_tasks{state="completed"} 1.0' in text
    assert "wan_frontend_queue_length 0.0" in text
    assert "wan_frontend_step_seconds_count 3.0" in text
    assert "wan_frontend_triton_ready 1.0" in text


def test_records_and_results_survive_a_restart_of_the_app(tmp_path):
    with AppHarness(tmp_path) as app:
        task_id = app.client.post("/v1/tasks/", json={"infer_steps": 2}).json()["task_id"]
        wait_status(app.client, task_id)
    with AppHarness(tmp_path) as app:
        assert app.client.get(f"/v1/tasks/{task_id}/status").json()["status"] == "completed"
        assert app.client.get(f"/v1/tasks/{task_id}/result").status_code == 200


def test_openapi_docs_are_served(app):
    schema = app.client.get("/openapi.json").json()
    assert "/v1/tasks/" in schema["paths"] and "/v1/tasks/{task_id}/result" in schema["paths"]


def test_logs_name_the_task_in_text_and_json(tmp_path):
    import json
    import logging

    from frontend.__main__ import JsonFormatter, TextFormatter

    record = logging.makeLogRecord({"name": "frontend.tasks", "levelname": "INFO", "msg": "task started",
                                    "task_id": "T-1"})
    assert "[task=T-1] task started" in TextFormatter("%(name)s%(task_tag)s %(message)s").format(record)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["task_id"] == "T-1" and entry["message"] == "task started" and entry["level"] == "INFO"


# ---- settings ---------------------------------------------------------------------------------------


def test_settings_come_from_flags_then_environment_then_defaults(monkeypatch):
    monkeypatch.setenv("WAN_PORT", "9001")
    monkeypatch.setenv("WAN_STRICT_BUSY", "yes")
    monkeypatch.setenv("WAN_TRITON_URL", "triton:8001")
    settings = parse_settings(["--port", "9002", "--max-queue-size", "3", "--default-height", "64"])
    assert settings.port == 9002 and settings.strict_busy is True and settings.triton_url == "triton:8001"
    assert settings.max_queue_size == 3 and settings.default_height == 64
    assert settings.default_infer_steps is None and settings.slots == 1
    assert parse_settings(["--no-strict-busy"]).strict_busy is False
    assert Settings().output_dir.as_posix() == "server_data/outputs"


def test_bad_settings_stop_the_program(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        parse_settings(["--slots", "0"])
    monkeypatch.setenv("WAN_PORT", "eighty")
    with pytest.raises(SystemExit):
        parse_settings([])
    assert "WAN_PORT" in capsys.readouterr().err
