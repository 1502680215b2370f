"""The front end across failures, with real processes: SIGKILL and restart, Triton absent at start, Triton
dying mid-task; and scripts/start_server.sh starting and stopping both servers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from tests.conftest import CACHE, REPO_ROOT, free_port
from tests.e2e.test_frontend_flow import LONG_STEPS, wait_status, wait_step
from tests.servers import TritonServer, wait_for_http


def test_sigkill_mid_task_then_restart_keeps_records_and_results(frontend_factory):
    server = frontend_factory()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        done = client.post("/v1/tasks/", json={"infer_steps": 2, "target_video_length": 5}).json()["task_id"]
        assert wait_status(client, done)["status"] == "completed"
        video = client.get(f"/v1/tasks/{done}/result").content
        running = client.post("/v1/tasks/", json={"infer_steps": LONG_STEPS}).json()["task_id"]
        pending = client.post("/v1/tasks/", json={"infer_steps": 2, "target_video_length": 5}).json()["task_id"]
        wait_step(client, running, 2)

    server.kill()
    server.start()
    server.wait_up()

    with httpx.Client(base_url=server.url, timeout=30) as client:
        listing = client.get("/v1/tasks/").json()
        assert {done, running, pending} <= set(listing)
        interrupted = client.get(f"/v1/tasks/{running}/status").json()
        assert interrupted["status"] == "failed" and "interrupted" in interrupted["error"]
        assert interrupted["success"] is False
        assert client.get(f"/v1/tasks/{done}/status").json()["status"] == "completed"
        assert client.get(f"/v1/tasks/{done}/result").content == video
        assert client.get(f"/v1/files/download/{done}.mp4").content == video
        assert wait_status(client, pending)["status"] == "completed"  # pending tasks run after a restart


def test_without_triton_the_front_end_is_busy_then_runs_when_triton_comes_and_fails_tasks_when_it_dies(
        frontend_factory, model_repository):
    ports = (free_port(), free_port(), free_port())
    server = frontend_factory(triton_url=f"127.0.0.1:{ports[1]}", ready=False)
    triton = TritonServer.create(model_repository, CACHE / "logs" / "tritonserver-private.log", ports)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            status = client.get("/v1/service/status").json()
            assert status["service_status"] == "busy" and status["ready"] is False
            assert client.get("/readyz").status_code == 503
            queued = client.post("/v1/tasks/", json={"prompt": "waits for Triton", "infer_steps": 2})
            assert queued.status_code == 200 and queued.json()["task_status"] == "pending"

            triton.start()
            triton.wait_ready()
            server.wait_up()  # readyz: the front end found Triton by itself
            record = wait_status(client, queued.json()["task_id"])
            assert record["status"] == "completed", record
            assert record["message"]["height"] == client.get("/v1/service/metadata").json()["defaults"]["height"]

            doomed = client.post("/v1/tasks/", json={"infer_steps": LONG_STEPS}).json()["task_id"]
            wait_step(client, doomed, 2)
            triton.kill()
            record = wait_status(client, doomed, timeout_s=30)
            assert record["status"] == "failed" and "model server" in record["error"], record
            assert "\n" not in record["error"]
            # the front end keeps answering, and says it is not ready
            assert client.get("/healthz").status_code == 200
            deadline = time.monotonic() + 10
            while client.get("/readyz").status_code != 503:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert client.get("/v1/service/status").json()["service_status"] == "busy"
    finally:
        triton.kill()


def test_start_server_script_starts_both_and_stops_both_on_sigterm(model_repository, tmp_path):
    port, http_port, grpc_port, metrics_port = free_port(), free_port(), free_port(), free_port()
    log = open(tmp_path / "start_server.log", "wb")
    process = subprocess.Popen(
        ["bash", "scripts/start_server.sh", "--port", str(port), "--model-repository", str(model_repository),
         "--triton-http-port", str(http_port), "--triton-grpc-port", str(grpc_port),
         "--triton-metrics-port", str(metrics_port), "--", "--data-dir", str(tmp_path / "data")],
        cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/readyz", 180, process)
        checked = subprocess.run([sys.executable, "scripts/check_status.py", "--url", url], cwd=REPO_ROOT,
                                 capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0 and '"service_status": "idle"' in checked.stdout, checked.stderr
        stopped = subprocess.run([sys.executable, "scripts/stop_running_task.py", "--url", url], cwd=REPO_ROOT,
                                 capture_output=True, text=True, timeout=60)
        assert stopped.returncode == 0 and "do_nothing" in stopped.stdout
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        for probe in (f"{url}/healthz", f"http://127.0.0.1:{http_port}/v2/health/live"):
            try:
                httpx.get(probe, timeout=2)
                raise AssertionError(f"{probe} still answers after SIGTERM")
            except httpx.TransportError:
                pass
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
