"""The /v1 front end through real uvicorn and a real tritonserver: the lightx2v client flow, the queue, stop,
and a responsive event loop while a task runs."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import httpx
import pytest

from tests.conftest import REPO_ROOT

LONG_STEPS = 200  # at the tiny default size each step is a few ms to tens of ms


def wait_status(client: httpx.Client, task_id: str, statuses=("completed", "failed", "cancelled"),
                timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        record = client.get(f"/v1/tasks/{task_id}/status").json()
        if record.get("status") in statuses:
            return record
        assert time.monotonic() < deadline, f"task {task_id} still {record.get('status')}"
        time.sleep(0.05)


def wait_step(client: httpx.Client, task_id: str, step: int, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        record = client.get(f"/v1/tasks/{task_id}/status").json()
        if record["progress"]["step"] >= step or record["status"] != "processing" and record["status"] != "pending":
            return record
        assert time.monotonic() < deadline, f"task {task_id} made no progress"
        time.sleep(0.02)


def decode(path: Path) -> tuple[int, int, int]:
    """(frames, width, height) of an mp4."""
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    return len(frames), frames[0].width, frames[0].height


@pytest.fixture
def client(frontend_server):
    with httpx.Client(base_url=frontend_server.url, timeout=30) as http:
        yield http
        http.delete("/v1/tasks/running")


def test_post_script_flow_downloads_an_mp4_with_the_requested_frames_and_size(frontend_server, tmp_path):
    output = tmp_path / "cats.mp4"
    done = subprocess.run(
        [sys.executable, "scripts/post.py", "--url", frontend_server.url, "--output", str(output), "--quiet",
         "--infer-steps", "3", "--target-video-length", "10", "--height", "64", "--width", "96",
         "--save-video-path", "./cats/cat_boxing_seed42.mp4"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert decode(output) == (9, 96, 64)  # 10 frames round to 4k+1 = 9
    assert (frontend_server.data_dir / "outputs" / "cats" / "cat_boxing_seed42.mp4").read_bytes() == output.read_bytes()


def test_lightx2v_flow_over_post_without_slash_poll_and_result(client, tmp_path):
    answer = client.post("/v1/tasks", json={"prompt": "a fox in the snow", "infer_steps": 2,
                                            "target_video_length": 5, "seed": 7, "unknown_field": 1})
    assert answer.status_code == 200, answer.text
    task = answer.json()
    assert task["task_status"] in ("processing", "pending") and task["save_video_path"] == f"{task['task_id']}.mp4"
    record = wait_status(client, task["task_id"])
    assert record["status"] == "completed", record
    assert record["success"] is True and record["progress"] == {"step": 2, "total_steps": 2}
    message = record["message"]
    assert message["target_video_length"] == 5 and message["seed"] == 7 and message["infer_steps"] == 2
    result = client.get(f"/v1/tasks/{task['task_id']}/result")
    assert result.status_code == 200 and result.headers["content-type"] == "video/mp4"
    assert int(result.headers["content-length"]) == len(result.content)
    path = tmp_path / "result.mp4"
    path.write_bytes(result.content)
    assert decode(path) == (5, message["width"], message["height"])
    part = client.get(f"/v1/tasks/{task['task_id']}/result", headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and part.content == result.content[:100]
    download = client.get(f"/v1/files/download/{task['task_id']}.mp4")
    assert download.content == result.content


def test_three_tasks_posted_at_once_run_one_after_another_in_order(client):
    answers: list[dict] = [None] * 3

    def post(index: int) -> None:
        time.sleep(index * 0.05)  # three clients, a known arrival order
        answers[index] = client.post("/v1/tasks/", json={"infer_steps": 3, "target_video_length": 5}).json()

    threads = [threading.Thread(target=post, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    records = [wait_status(client, answer["task_id"]) for answer in answers]
    assert [r["status"] for r in records] == ["completed"] * 3
    for earlier, later in zip(records, records[1:]):
        assert earlier["created_at"] <= later["created_at"]
        assert earlier["completion_time"] <= later["start_time"], "tasks overlapped or ran out of order"


def test_queue_limit_answers_429_with_retry_after(frontend_factory):
    server = frontend_factory("--max-queue-size", "1")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        first = client.post("/v1/tasks/", json={"infer_steps": LONG_STEPS}).json()
        second = client.post("/v1/tasks/", json={"infer_steps": 2}).json()
        assert first["task_status"] == "processing" and second["task_status"] == "pending"
        refused = client.post("/v1/tasks/", json={"infer_steps": 2})
        assert refused.status_code == 429 and refused.json() == {"detail": "Service busy"}
        assert int(refused.headers["Retry-After"]) >= 1
        assert client.get("/v1/service/status").json()["queue_length"] == 1
        assert client.delete("/v1/tasks/running").json()["stop_status"] == "success"
        assert wait_status(client, second["task_id"])["status"] == "completed"


def test_strict_busy_mode_answers_400_service_busy(frontend_factory):
    server = frontend_factory("--strict-busy")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        first = client.post("/v1/tasks/", json={"infer_steps": LONG_STEPS}).json()
        assert first["task_status"] == "processing"
        refused = client.post("/v1/tasks/", json={"infer_steps": 2})
        assert refused.status_code == 400 and refused.json() == {"detail": "Service busy"}
        client.delete("/v1/tasks/running")
        wait_status(client, first["task_id"])
        assert client.post("/v1/tasks/", json={"infer_steps": 1}).status_code == 200


def test_stop_running_returns_at_once_cancels_within_a_step_and_the_next_task_runs(client):
    long_task = client.post("/v1/tasks/", json={"infer_steps": LONG_STEPS}).json()["task_id"]
    next_task = client.post("/v1/tasks/", json={"infer_steps": 2, "target_video_length": 5}).json()["task_id"]
    wait_step(client, long_task, 2)

    # the event loop is not blocked by inference: status answers quickly while the task runs
    latencies = []
    for _ in range(10):
        began = time.monotonic()
        status = client.get("/v1/service/status")
        latencies.append(time.monotonic() - began)
        assert status.json()["service_status"] == "busy" and status.json()["task_id"] == long_task
    assert max(latencies) < 0.5, latencies

    began = time.monotonic()
    answer = client.delete("/v1/tasks/running")
    assert time.monotonic() - began < 1.0
    assert answer.json()["stop_status"] == "success"
    record = wait_status(client, long_task, timeout_s=5)
    assert record["status"] == "cancelled" and record["success"] is False
    assert record["progress"]["step"] < LONG_STEPS
    assert client.get(f"/v1/tasks/{long_task}/result").status_code == 404
    assert wait_status(client, next_task)["status"] == "completed"
    assert client.delete("/v1/tasks/running").json()["stop_status"] == "do_nothing"


def test_delete_by_id_cancels_a_pending_and_a_running_task(client):
    running = client.post("/v1/tasks/", json={"infer_steps": LONG_STEPS}).json()["task_id"]
    pending = client.post("/v1/tasks/", json={"infer_steps": LONG_STEPS}).json()["task_id"]
    answer = client.delete(f"/v1/tasks/{pending}")
    assert answer.status_code == 200 and answer.json()["status"] == "cancelled"
    wait_step(client, running, 1)
    began = time.monotonic()
    answer = client.delete(f"/v1/tasks/{running}")
    assert time.monotonic() - began < 1.0
    assert answer.status_code == 200 and answer.json()["status"] == "cancelled"
    assert client.delete(f"/v1/tasks/{running}").status_code == 409
    # the model server is free again: a short task completes promptly
    quick = client.post("/v1/tasks/", json={"infer_steps": 1, "target_video_length": 1}).json()["task_id"]
    assert wait_status(client, quick, timeout_s=60)["status"] == "completed"


def test_service_endpoints(client):
    metadata = client.get("/v1/service/metadata").json()
    assert metadata["ready"] is True and metadata["model_kind"] == "t2v"
    assert {"infer_steps", "target_video_length", "height", "width"} <= set(metadata["defaults"])
    assert "/" not in str(metadata["model_name"]) or not str(metadata["model_name"]).startswith("/")
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
    metrics = client.get("/metrics").text
    assert "wan_frontend_tasks{" in metrics and "wan_frontend_step_seconds_bucket" in metrics
    assert "wan_frontend_triton_ready 1.0" in metrics
