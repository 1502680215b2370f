"""Faults of the front end itself, with real processes (uvicorn, the session tritonserver): SIGKILL during a
task and at two points of a result write (tests/e2e/faults/paused_write.py stops the real write there), and
SIGTERM's graceful shutdown (finish within the grace period, or stop and record). Each test asserts the end
state of every task it made and that no partial mp4 is ever served."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import av
import httpx
import pytest

from tests.conftest import CACHE
from tests.e2e.conftest import FrontendServer
from tests.e2e.test_frontend_flow import LONG_STEPS, wait_status, wait_step

SMALL = {"infer_steps": 2, "target_video_length": 5, "height": 64, "width": 64}


def post(client: httpx.Client, **body) -> str:
    answer = client.post("/v1/tasks/", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()["task_id"]


def frames_in(data: bytes, tmp_path: Path) -> int:
    """Decode every frame of an mp4 (a truncated file raises or comes up short)."""
    path = tmp_path / f"check-{time.monotonic_ns()}.mp4"
    path.write_bytes(data)
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def temporary_files(data_dir: Path) -> list[Path]:
    return [path for path in data_dir.rglob("*.tmp")]


def restarted(server: FrontendServer, triton_url: str) -> FrontendServer:
    """The ordinary front end on the same port and data folder (after a kill)."""
    again = FrontendServer.create(server.data_dir, triton_url, CACHE / "logs" / f"frontend-restart-{server.port}.log",
                                  port=server.port)
    again.start()
    again.wait_up()
    return again


def wait_for_file(path: Path, process, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert process.poll() is None, "the front end exited"
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


def test_sigkill_during_a_task_loses_no_record_and_runs_the_pending_ones_after_restart(frontend_factory,
                                                                                      triton_server, tmp_path):
    server = frontend_factory()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        done = post(client, **SMALL)
        assert wait_status(client, done)["status"] == "completed"
        video = client.get(f"/v1/tasks/{done}/result").content
        running = post(client, infer_steps=LONG_STEPS)
        pending = [post(client, **SMALL), post(client, **SMALL)]
        withdrawn = post(client, **SMALL)
        assert client.delete(f"/v1/tasks/{withdrawn}").json()["status"] == "cancelled"
        wait_step(client, running, 2)

    server.kill()
    server = restarted(server, triton_server.grpc_url)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            listing = client.get("/v1/tasks/").json()
            assert sorted(listing) == sorted([done, running, *pending, withdrawn])  # nothing lost, no duplicate
            interrupted = listing[running]
            assert interrupted["status"] == "failed" and interrupted["success"] is False
            assert interrupted["error"] == "interrupted: the server stopped while this task was running"
            assert interrupted["progress"]["step"] >= 0 and interrupted["completion_time"]
            assert listing[withdrawn]["status"] == "cancelled"
            assert client.get(f"/v1/tasks/{done}/result").content == video
            finals = [wait_status(client, task_id) for task_id in pending]
            assert [r["status"] for r in finals] == ["completed", "completed"]
            assert finals[0]["completion_time"] <= finals[1]["start_time"]
            every = [done, running, *pending, withdrawn]
            assert [client.get(f"/v1/tasks/{t}/status").json()["status"] for t in every] == \
                ["completed", "failed", "completed", "completed", "cancelled"]
            assert temporary_files(server.data_dir) == []
    finally:
        server.stop()


@pytest.mark.parametrize("stage", ["mid_write", "after_replace"])
def test_sigkill_during_a_result_write_never_serves_a_partial_mp4_and_cleans_temporary_files(
        frontend_factory, triton_server, tmp_path, stage):
    server = frontend_factory()  # starts the data folder with the ordinary front end, then swaps the process
    server.stop()
    marker = tmp_path / "paused"
    server.command = [sys.executable, "-m", "tests.e2e.faults.paused_write", str(marker), stage, *server.command[3:]]
    server.start()
    server.wait_up()
    outputs = server.data_dir / "outputs"
    with httpx.Client(base_url=server.url, timeout=30) as client:
        task = post(client, save_video_path="clips/result.mp4", **SMALL)
        queued = post(client, **SMALL)
        wait_for_file(marker, server.process)
        if stage == "mid_write":  # the kill lands with half an mp4 in a temporary file, nothing renamed
            leftovers = temporary_files(server.data_dir)
            assert len(leftovers) == 1 and leftovers[0].parent == outputs / "clips"
            assert not (outputs / "clips" / "result.mp4").exists()
        else:
            assert (outputs / "clips" / "result.mp4").exists() and temporary_files(server.data_dir) == []
    server.kill()

    server = restarted(server, triton_server.grpc_url)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            record = client.get(f"/v1/tasks/{task}/status").json()
            assert record["status"] == "failed"
            assert record["error"] == "interrupted: the server stopped while this task was running"
            assert client.get(f"/v1/tasks/{task}/result").status_code == 404
            assert temporary_files(server.data_dir) == []  # cleaned at start
            download = client.get("/v1/files/download/clips/result.mp4")
            if stage == "mid_write":
                assert download.status_code == 404
            else:  # the rename is atomic: what is there is the whole video
                assert download.status_code == 200 and frames_in(download.content, tmp_path) == 5
            assert wait_status(client, queued)["status"] == "completed"
            retry = post(client, save_video_path="clips/result.mp4", **SMALL)  # the client tries again
            assert wait_status(client, retry)["status"] == "completed"
            assert frames_in(client.get(f"/v1/tasks/{retry}/result").content, tmp_path) == 5
            assert sorted(client.get("/v1/tasks/").json()) == sorted([task, queued, retry])
    finally:
        server.stop()


def sigterm(server: FrontendServer) -> float:
    os.killpg(server.process.pid, signal.SIGTERM)
    return time.monotonic()


def test_sigterm_refuses_new_tasks_lets_the_running_one_finish_and_keeps_the_queue(frontend_factory,
                                                                                   triton_server):
    server = frontend_factory("--shutdown-grace", "120")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        running = post(client, infer_steps=60)
        pending = post(client, **SMALL)
        wait_step(client, running, 2)
        sent = sigterm(server)
        time.sleep(0.3)  # the drain begins on uvicorn's next tick (0.1 s)
        refused = client.post("/v1/tasks/", json=SMALL)
        assert refused.status_code == 503 and refused.json() == {"detail": "server is shutting down; retry later"}
        assert int(refused.headers["Retry-After"]) > 0
        assert client.get("/readyz").status_code == 503
        assert client.get(f"/v1/tasks/{running}/status").json()["status"] == "processing"  # still answering
        server.process.wait(60)
        assert time.monotonic() - sent < 60

    server = restarted(server, triton_server.grpc_url)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            finished = client.get(f"/v1/tasks/{running}/status").json()
            assert finished["status"] == "completed" and finished["progress"] == {"step": 60, "total_steps": 60}
            assert client.get(f"/v1/tasks/{running}/result").status_code == 200
            assert wait_status(client, pending)["status"] == "completed"  # kept pending, run by the next start
            assert sorted(client.get("/v1/tasks/").json()) == sorted([running, pending])
    finally:
        server.stop()


def test_sigterm_stops_a_task_that_outlives_the_grace_period_and_records_it(frontend_factory, triton_server):
    server = frontend_factory("--shutdown-grace", "1")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        running = post(client, infer_steps=1000)
        pending = post(client, **SMALL)
        wait_step(client, running, 2)
        sent = sigterm(server)
        server.process.wait(30)
        assert time.monotonic() - sent < 1 + 10  # the grace period, then uvicorn's own shutdown

    server = restarted(server, triton_server.grpc_url)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            stopped = client.get(f"/v1/tasks/{running}/status").json()
            assert stopped["status"] == "failed"
            assert stopped["error"] == "interrupted: the server shut down while this task was running"
            assert 2 <= stopped["progress"]["step"] < 1000
            assert wait_status(client, pending)["status"] == "completed"
            assert [client.get(f"/v1/tasks/{t}/status").json()["status"] for t in (running, pending)] == \
                ["failed", "completed"]
    finally:
        server.stop()
