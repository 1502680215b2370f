"""Graceful shutdown and the races around cancelling (frontend.tasks, frontend.server), with a fake executor:
the drain on SIGTERM, a cancel that arrives before a task's coroutine has begun, two cancels at once, and
concurrent admissions in arrival order."""

from __future__ import annotations

import asyncio
import signal

import pytest
import uvicorn

from frontend.protocol import TaskRecord, TaskStatus
from frontend.server import DrainingServer
from frontend.tasks import (
    CANCELLED_BY_REQUEST, INTERRUPTED_AT_SHUTDOWN, QueueFullError, ShuttingDownError, TaskFinishedError,
)
from tests.unit.frontend_fakes import AppHarness
from tests.unit.test_frontend_tasks import FakeExecutor, make_manager, new_record, run, shutdown, wait_finished


def test_drain_lets_a_short_task_finish_and_keeps_pending_ones_pending(tmp_path):
    async def scenario():
        manager = await make_manager(tmp_path, FakeExecutor(steps=20, delay_s=0.005))
        await manager.submit(new_record("short"))
        await manager.submit(new_record("waiting"))
        await manager.drain(grace_s=5)
        store = manager._store
        assert (await store.get("short")).status is TaskStatus.COMPLETED
        waiting = await store.get("waiting")
        assert waiting.status is TaskStatus.PENDING and waiting.start_time is None
        await shutdown(manager)

    run(scenario())


def test_drain_stops_a_task_that_outlives_the_grace_period_and_saves_its_state(tmp_path):
    async def scenario():
        executor = FakeExecutor(steps=10_000, delay_s=0.002)
        manager = await make_manager(tmp_path, executor)
        await manager.submit(new_record("long"))
        await asyncio.sleep(0.05)
        began = asyncio.get_running_loop().time()
        await manager.drain(grace_s=0.2)
        assert 0.2 <= asyncio.get_running_loop().time() - began < 2
        record = await manager._store.get("long")
        assert record.status is TaskStatus.FAILED and record.error == INTERRUPTED_AT_SHUTDOWN
        assert record.progress.step > 0 and executor.cancelled == ["long"]
        await shutdown(manager)

    run(scenario())


def test_while_draining_new_tasks_are_refused_and_nothing_starts(tmp_path):
    async def scenario():
        executor = FakeExecutor(steps=10_000)
        manager = await make_manager(tmp_path, executor)
        await manager.submit(new_record("running"))
        await manager.submit(new_record("queued"))
        drain = asyncio.create_task(manager.drain(grace_s=0.3))
        await asyncio.sleep(0.01)
        with pytest.raises(ShuttingDownError):
            await manager.submit(new_record("late"))
        assert not manager.would_start_now()
        await drain
        assert executor.started == ["running"]
        assert await manager._store.get("late") is None
        await shutdown(manager)

    run(scenario())


def test_grace_zero_stops_at_once(tmp_path):
    async def scenario():
        manager = await make_manager(tmp_path, FakeExecutor(steps=10_000))
        await manager.submit(new_record("x"))
        await asyncio.sleep(0.02)
        await asyncio.wait_for(manager.drain(grace_s=0), 2)
        assert (await manager._store.get("x")).status is TaskStatus.FAILED
        await shutdown(manager)

    run(scenario())


def test_a_cancel_before_the_task_coroutine_begins_still_ends_it_and_frees_the_slot(tmp_path):
    async def scenario():
        manager = await make_manager(tmp_path, FakeExecutor(steps=3))
        await manager.submit(new_record("a"))  # started: its asyncio task exists but has not run yet
        answer = await manager.cancel("a")
        assert answer.status is TaskStatus.CANCELLED and answer.error == CANCELLED_BY_REQUEST
        await manager.submit(new_record("b"))
        assert (await wait_finished(manager, "b")).status is TaskStatus.COMPLETED
        await shutdown(manager)

    run(scenario())


def test_close_right_after_a_task_starts_records_it_interrupted(tmp_path):
    async def scenario():
        manager = await make_manager(tmp_path, FakeExecutor(steps=3))
        await manager.submit(new_record("a"))
        store = manager._store
        await asyncio.wait_for(manager.close(), 2)
        assert (await store.get("a")).error == INTERRUPTED_AT_SHUTDOWN
        await store.close()

    run(scenario())


@pytest.mark.parametrize("which", ["pending", "running"])
def test_two_cancels_at_once_exactly_one_wins(tmp_path, which):
    async def scenario():
        manager = await make_manager(tmp_path, FakeExecutor(steps=10_000))
        await manager.submit(new_record("running"))
        await manager.submit(new_record("pending"))
        await asyncio.sleep(0.02)
        answers = await asyncio.gather(manager.cancel(which), manager.cancel(which), return_exceptions=True)
        won = [a for a in answers if isinstance(a, TaskRecord)]
        lost = [a for a in answers if isinstance(a, TaskFinishedError)]
        assert len(won) == 1 and len(lost) == 1, answers
        assert won[0].status is TaskStatus.CANCELLED and lost[0].record.status is TaskStatus.CANCELLED
        assert (await manager._store.get(which)).status is TaskStatus.CANCELLED
        text = manager.metrics.render().decode()
        assert 'wan_frontend_tasks{state="cancelled"} 1.0' in text
        await shutdown(manager)

    run(scenario())


def test_concurrent_admissions_are_granted_in_arrival_order(tmp_path):
    async def scenario():
        manager = await make_manager(tmp_path, FakeExecutor(steps=10_000), max_queue_size=2)
        results = await asyncio.gather(*(manager.submit(new_record(f"c{i}")) for i in range(6)),
                                       return_exceptions=True)
        assert [type(r).__name__ for r in results] == ["TaskRecord"] * 3 + ["QueueFullError"] * 3
        assert all(isinstance(r, QueueFullError) for r in results[3:])
        await shutdown(manager)

    run(scenario())


def test_the_api_answers_503_while_draining(tmp_path):
    with AppHarness(tmp_path) as app:
        app.service.manager.draining = True
        refused = app.client.post("/v1/tasks/", json={})
        assert refused.status_code == 503 and refused.json() == {"detail": "server is shutting down; retry later"}
        assert int(refused.headers["Retry-After"]) > 0
        assert app.client.get("/readyz").status_code == 503
        assert app.client.get("/v1/service/status").json()["service_status"] == "busy"
        assert app.client.get("/healthz").status_code == 200


def test_the_first_signal_drains_before_uvicorn_stops_and_a_second_one_skips_the_wait():
    async def scenario():
        release = asyncio.Event()
        drained = []

        async def drain():
            await release.wait()
            drained.append(True)

        server = DrainingServer(uvicorn.Config(app=lambda *args: None), drain=drain)
        server.handle_exit(signal.SIGTERM, None)
        assert not await server.on_tick(1) and not server.should_exit  # draining, still serving
        await asyncio.sleep(0.01)
        assert not await server.on_tick(2)
        release.set()
        await asyncio.sleep(0.01)
        assert await server.on_tick(3) and server.should_exit and drained == [True]

        impatient = DrainingServer(uvicorn.Config(app=lambda *args: None), drain=asyncio.Event().wait)
        impatient.handle_exit(signal.SIGTERM, None)
        await impatient.on_tick(1)
        impatient.handle_exit(signal.SIGTERM, None)
        assert await impatient.on_tick(2) and impatient.should_exit
        impatient._drain_task.cancel()

    run(scenario())
