"""The failure breaker (frontend.breaker): a model server that fails every task does not drain the queue."""

from __future__ import annotations

from frontend.breaker import FailureBreaker
from frontend.triton_client import PipelineError
from tests.unit.frontend_fakes import AppHarness, FakeTritonClient, wait_status, wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_closed_until_the_threshold_then_one_trial_after_the_cooldown():
    clock = Clock()
    breaker = FailureBreaker(threshold=3, cooldown_s=30, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.allows(running=5) and not breaker.open
    breaker.record_failure()
    assert breaker.open and not breaker.allows(running=0)
    assert "3 tasks failed" in breaker.reason() and "30 s" in breaker.reason()
    clock.now = 30
    assert breaker.allows(running=0) and not breaker.allows(running=1)  # one trial at a time
    breaker.record_failure()  # the trial failed: another cool-down
    assert not breaker.allows(running=0)
    clock.now = 60
    assert breaker.allows(running=0)
    breaker.record_success()
    assert not breaker.open and breaker.allows(running=3) and breaker.failures == 0


def test_a_success_in_between_resets_the_count():
    breaker = FailureBreaker(threshold=2, cooldown_s=30, clock=Clock())
    for _ in range(5):
        breaker.record_failure()
        breaker.record_success()
    assert not breaker.open


def test_threshold_zero_never_opens():
    breaker = FailureBreaker(threshold=0, cooldown_s=30, clock=Clock())
    for _ in range(100):
        breaker.record_failure()
    assert breaker.allows(running=0) and not breaker.open


def test_a_broken_model_server_fails_a_few_tasks_and_the_rest_wait_in_the_queue(tmp_path):
    fake = FakeTritonClient()
    with AppHarness(tmp_path, fake=fake, failure_threshold=2, failure_cooldown=0.3) as app:
        fake.fail_with = PipelineError("dit: Stub process 'dit_0' is not healthy.")
        ids = [app.client.post("/v1/tasks/", json={"infer_steps": 2}).json()["task_id"] for _ in range(4)]
        assert [wait_status(app.client, task_id)["status"] for task_id in ids[:2]] == ["failed", "failed"]
        status = app.client.get("/v1/service/status").json()
        assert status["service_status"] == "busy" and status["ready"] is False and status["queue_length"] == 2
        ready = app.client.get("/readyz")
        assert ready.status_code == 503 and "the last 2 tasks failed" in ready.json()["detail"]
        assert [app.client.get(f"/v1/tasks/{t}/status").json()["status"] for t in ids[2:]] == ["pending"] * 2

        fake.fail_with = None  # repaired: the trial after the cool-down succeeds, and the queue runs again
        assert [wait_status(app.client, task_id)["status"] for task_id in ids[2:]] == ["completed"] * 2
        wait_until(lambda: app.client.get("/readyz").status_code == 200)
