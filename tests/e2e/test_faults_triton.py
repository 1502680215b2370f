"""Faults of the model server, with real processes: a private tritonserver serving a copy of the built
repository whose `dit` model can be told to fail (tests/e2e/faults/dit_fault_model.py), killed and restarted
on the same ports; the front end (real uvicorn) in front of it. Each test asserts the end state of every task
it made."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import CACHE, free_port
from tests.e2e.test_frontend_flow import LONG_STEPS, wait_status, wait_step
from tests.servers import TritonServer

FAULTS = Path(__file__).parent / "faults"
SMALL = {"infer_steps": 6, "target_video_length": 1, "height": 64, "width": 64}


@pytest.fixture(scope="module")
def faulty_repository(model_repository, tmp_path_factory) -> Path:
    """The built repository with the fault-plan wrapper around the real `dit` model."""
    variant = tmp_path_factory.mktemp("faulty") / "model_repository"
    shutil.copytree(model_repository, variant, ignore=shutil.ignore_patterns("__pycache__"))
    dit = variant / "dit" / "1"
    (dit / "model.py").rename(dit / "real_model.py")
    shutil.copy(FAULTS / "dit_fault_model.py", dit / "model.py")
    return variant


@pytest.fixture(scope="module")
def private_triton(faulty_repository):
    server = TritonServer.create(faulty_repository, CACHE / "logs" / "tritonserver-faults.log",
                                 (free_port(), free_port(), free_port()))
    server.start()
    server.wait_ready()
    yield server
    server.kill()


@pytest.fixture
def triton(private_triton, faulty_repository):
    """The private server, up (a test before may have killed it), with no fault planned."""
    plan_fault(faulty_repository, None)
    if private_triton.process.poll() is not None:
        private_triton.start()
        private_triton.wait_ready()
    yield private_triton
    plan_fault(faulty_repository, None)


def plan_fault(repository: Path, plan: dict | None) -> None:
    path = repository / "dit" / "1" / "fault_plan.json"
    if plan is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(json.dumps(plan), encoding="utf-8")


def restart_on_the_same_ports(triton: TritonServer) -> None:
    triton.kill()
    triton.start()
    triton.wait_ready()


def statuses(client: httpx.Client, ids: list[str]) -> list[str]:
    return [client.get(f"/v1/tasks/{task_id}/status").json()["status"] for task_id in ids]


def post(client: httpx.Client, **body) -> str:
    answer = client.post("/v1/tasks/", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()["task_id"]


def test_an_engine_error_mid_generation_fails_that_task_clearly_and_the_next_one_runs(
        triton, faulty_repository, frontend_factory):
    plan_fault(faulty_repository, {"fail_at_call": 3, "mode": "raise"})  # dit runs once a step: step 3
    server = frontend_factory(triton_url=triton.grpc_url)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        doomed = post(client, **SMALL)
        after = post(client, **SMALL)
        record = wait_status(client, doomed)
        assert record["status"] == "failed" and record["success"] is False
        assert record["progress"] == {"step": 2, "total_steps": 6}
        error = record["error"]
        assert error.startswith("dit:") and "injected engine failure at call 3" in error, error
        assert "\n" not in error and "At:" not in error and "Traceback" not in error
        assert str(faulty_repository) not in error and "/tmp/" not in error  # the engine's path is not echoed
        assert client.get(f"/v1/tasks/{doomed}/result").status_code == 404
        assert not (server.data_dir / "outputs" / f"{doomed}.mp4").exists()

        assert wait_status(client, after)["status"] == "completed"
        assert client.get(f"/v1/tasks/{after}/result").status_code == 200
        assert client.get("/v1/service/status").json()["service_status"] == "idle"
        assert statuses(client, [doomed, after]) == ["failed", "completed"]


def test_a_crashed_engine_fails_few_tasks_then_the_queue_waits_until_triton_is_restarted(
        triton, faulty_repository, frontend_factory):
    # Triton keeps a component whose stub process died READY, and fails every call to it: only the
    # front end's failure breaker keeps the queue from draining into failures.
    plan_fault(faulty_repository, {"fail_at_call": 3, "mode": "exit"})
    server = frontend_factory("--failure-threshold", "2", "--failure-cooldown", "600", triton_url=triton.grpc_url)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        ids = [post(client, **SMALL) for _ in range(4)]
        first, second = wait_status(client, ids[0]), wait_status(client, ids[1])
        for record in (first, second):
            assert record["status"] == "failed" and "is not healthy" in record["error"], record
        assert first["progress"]["step"] == 2 and second["progress"]["step"] == 0
        time.sleep(1.0)  # the poller would have started the next task by now
        assert statuses(client, ids) == ["failed", "failed", "pending", "pending"]
        status = client.get("/v1/service/status").json()
        assert status["service_status"] == "busy" and status["ready"] is False and status["queue_length"] == 2
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "the last 2 tasks failed" in ready.json()["detail"]

        plan_fault(faulty_repository, None)
        restart_on_the_same_ports(triton)  # the operator's fix; the front end notices by itself
        assert [wait_status(client, task_id)["status"] for task_id in ids[2:]] == ["completed", "completed"]
        assert statuses(client, ids) == ["failed", "failed", "completed", "completed"]
        assert client.get("/v1/service/status").json()["service_status"] == "idle"


def test_triton_killed_mid_task_fails_it_within_seconds_keeps_the_queue_and_resumes_when_back(
        triton, frontend_factory):
    server = frontend_factory(triton_url=triton.grpc_url)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        running = post(client, infer_steps=LONG_STEPS)
        queued = [post(client, **SMALL), post(client, **SMALL)]
        wait_step(client, running, 2)

        triton.kill()
        killed_at = time.monotonic()
        record = wait_status(client, running, timeout_s=10)
        failed_after = time.monotonic() - killed_at
        assert failed_after < 5, failed_after
        assert record["status"] == "failed" and record["success"] is False
        assert record["error"] == "model server unavailable (Triton could not be reached)"
        assert 2 <= record["progress"]["step"] < LONG_STEPS

        status = client.get("/v1/service/status").json()
        assert status["service_status"] == "busy" and status["ready"] is False
        assert client.get("/readyz").status_code == 503
        late = post(client, **SMALL)  # still taken while Triton is away: it waits too
        time.sleep(1.0)
        waiting = queued + [late]
        records = [client.get(f"/v1/tasks/{task_id}/status").json() for task_id in waiting]
        assert [(r["status"], r["queue_position"]) for r in records] == [("pending", 1), ("pending", 2),
                                                                         ("pending", 3)]
        assert client.get("/v1/service/status").json()["queue_length"] == 3

        triton.start()  # same ports
        triton.wait_ready()
        finals = [wait_status(client, task_id, timeout_s=60) for task_id in waiting]
        assert [r["status"] for r in finals] == ["completed"] * 3
        for earlier, later in zip(finals, finals[1:]):
            assert earlier["completion_time"] <= later["start_time"]  # FIFO kept across the outage
        assert client.get("/v1/service/status").json()["service_status"] == "idle"
        listing = client.get("/v1/tasks/").json()
        assert sorted(listing) == sorted([running, *waiting])
        assert statuses(client, [running, *waiting]) == ["failed", "completed", "completed", "completed"]
