"""The task lifecycle (frontend.tasks.TaskManager) with a fake executor: queue, slots, state machine, cancel,
failure, readiness and restart recovery. No HTTP, no Triton."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from frontend.files import Folder
from frontend.metrics import Metrics
from frontend.protocol import TaskRecord, TaskStatus
from frontend.store import SQLiteTaskStore
from frontend.tasks import (
    INTERRUPTED_AT_RESTART, INTERRUPTED_AT_SHUTDOWN, DuplicateTaskError, Execution, ExecutionError,
    InvalidTransition, QueueFullError, ServiceBusyError, TaskFinishedError, TaskManager, TaskNotFoundError,
    transition,
)


class FakeExecutor:
    """`steps` progress callbacks `delay_s` apart; message["fail"] raises ExecutionError, ["crash"] a bug."""

    def __init__(self, steps: int = 5, delay_s: float = 0.002, ready: bool = True):
        self.steps = steps
        self.delay_s = delay_s
        self.ready = ready
        self.started: list[str] = []
        self.finished: list[str] = []
        self.cancelled: list[str] = []
        self.running = 0
        self.max_running = 0

    def prepare(self, record: TaskRecord) -> dict:
        if record.message.get("unrunnable"):
            raise ExecutionError("height: must be a multiple of 16 in 64..512, got 32")
        return {"prepared": True}

    async def run(self, record: TaskRecord, on_progress) -> Execution:
        assert record.message["prepared"] is True
        self.started.append(record.task_id)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        steps = record.message.get("steps", self.steps)
        try:
            for step in range(1, steps + 1):
                await asyncio.sleep(self.delay_s)
                await on_progress(step, steps)
            if record.message.get("fail"):
                raise ExecutionError("model said no\nsecond line")
            if record.message.get("crash"):
                raise KeyError("bug")
        except asyncio.CancelledError:
            self.cancelled.append(record.task_id)
            raise
        finally:
            self.running -= 1
        self.finished.append(record.task_id)
        return Execution(video=f"video of {record.task_id}".encode(), used={"target_video_length": 17})


def new_record(task_id: str, **message) -> TaskRecord:
    return TaskRecord(task_id=task_id, status=TaskStatus.PENDING, message={"task_id": task_id, **message},
                      created_at="2025-01-01T00:00:00Z", save_video_path=f"{task_id}.mp4")


async def make_manager(tmp_path: Path, executor: FakeExecutor | None = None, **options) -> TaskManager:
    store = await SQLiteTaskStore.open(tmp_path / "tasks.sqlite3")
    manager = TaskManager(store, executor or FakeExecutor(), Folder(tmp_path / "outputs"), metrics=Metrics(),
                          **options)
    await manager.start()
    return manager


async def shutdown(manager: TaskManager) -> None:
    await manager.close()
    await manager._store.close()


async def wait_finished(manager: TaskManager, task_id: str, timeout_s: float = 5.0) -> TaskRecord:
    async def poll() -> TaskRecord:
        while True:
            record = await manager.get(task_id)
            if record.status.finished:
                return record
            await asyncio.sleep(0.002)

    return await asyncio.wait_for(poll(), timeout_s)


def run(coroutine):
    return asyncio.run(coroutine)


def test_tasks_run_one_after_another_in_fifo_order(tmp_path):
    async def scenario():
        executor = FakeExecutor()
        manager = await make_manager(tmp_path, executor)
        answers = [await manager.submit(new_record(name)) for name in ("t1", "t2", "t3")]
        assert [a.status for a in answers] == [TaskStatus.PROCESSING, TaskStatus.PENDING, TaskStatus.PENDING]
        assert [a.queue_position for a in answers] == [None, 1, 2]
        records = [await wait_finished(manager, name) for name in ("t1", "t2", "t3")]
        assert all(r.status is TaskStatus.COMPLETED and r.success for r in records)
        assert executor.started == ["t1", "t2", "t3"] and executor.max_running == 1
        # each started after the previous one completed
        assert records[0].completion_time <= records[1].start_time <= records[1].completion_time <= records[2].start_time
        await shutdown(manager)

    run(scenario())


def test_two_slots_run_two_tasks_at_once(tmp_path):
    async def scenario():
        executor = FakeExecutor(steps=10)
        manager = await make_manager(tmp_path, executor, slots=2)
        for name in ("a", "b", "c"):
            await manager.submit(new_record(name))
        for name in ("a", "b", "c"):
            await wait_finished(manager, name)
        assert executor.max_running == 2
        await shutdown(manager)

    run(scenario())


def test_completed_task_has_its_result_file_and_the_values_used(tmp_path):
    async def scenario():
        manager = await make_manager(tmp_path)
        await manager.submit(new_record("done", target_video_length=20))
        record = await wait_finished(manager, "done")
        assert record.message["target_video_length"] == 17  # what the executor says it used
        assert record.progress.step == record.progress.total_steps == 5
        assert (tmp_path / "outputs" / "done.mp4").read_bytes() == b"video of done"
        assert not [p for p in (tmp_path / "outputs").iterdir() if p.name.endswith(".tmp")]
        await shutdown(manager)

    run(scenario())


def test_progress_is_visible_while_the_task_runs(tmp_path):
    async def scenario():
        manager = await make_manager(tmp_path, FakeExecutor(steps=200, delay_s=0.002))
        await manager.submit(new_record("slow"))
        await asyncio.sleep(0.1)
        record = await manager.get("slow")
        assert record.status is TaskStatus.PROCESSING
        assert 0 < record.progress.step < 200 and record.progress.total_steps == 200
        await manager.cancel("slow")
        await shutdown(manager)

    run(scenario())


def test_queue_limit_raises_queue_full_with_a_retry_after(tmp_path):
    async def scenario():
        manager = await make_manager(tmp_path, FakeExecutor(steps=1000), max_queue_size=1)
        await manager.submit(new_record("active"))
        await manager.submit(new_record("queued"))
        with pytest.raises(QueueFullError) as refused:
            await manager.submit(new_record("refused"))
        assert refused.value.retry_after_s >= 1
        assert await manager.get("refused") is None
        await shutdown(manager)

    run(scenario())


def test_strict_mode_refuses_while_anything_runs(tmp_path):
    async def scenario():
        manager = await make_manager(tmp_path, FakeExecutor(steps=1000), strict_busy=True)
        await manager.submit(new_record("first"))
        with pytest.raises(ServiceBusyError):
            await manager.submit(new_record("second"))
        await shutdown(manager)

    run(scenario())


def test_concurrent_submissions_respect_the_queue_limit(tmp_path):
    async def scenario():
        manager = await make_manager(tmp_path, FakeExecutor(steps=1000), max_queue_size=2)
        results = await asyncio.gather(*(manager.submit(new_record(f"c{i}")) for i in range(6)),
                                       return_exceptions=True)
        accepted = [r for r in results if isinstance(r, TaskRecord)]
        assert len(accepted) == 3  # one running + two waiting
        assert sum(isinstance(r, QueueFullError) for r in results) == 3
        await shutdown(manager)

    run(scenario())


def test_duplicate_task_id_is_refused_even_after_it_finished(tmp_path):
    async def scenario():
        manager = await make_manager(tmp_path)
        await manager.submit(new_record("same"))
        with pytest.raises(DuplicateTaskError):
            await manager.submit(new_record("same"))
        await wait_finished(manager, "same")
        with pytest.raises(DuplicateTaskError):
            await manager.submit(new_record("same"))
        await shutdown(manager)

    run(scenario())


def test_cancelling_a_pending_task_removes_it_from_the_queue(tmp_path):
    async def scenario():
        executor = FakeExecutor(steps=20)
        manager = await make_manager(tmp_path, executor)
        await manager.submit(new_record("a"))
        await manager.submit(new_record("b"))
        await manager.submit(new_record("c"))
        cancelled = await manager.cancel("b")
        assert cancelled.status is TaskStatus.CANCELLED and cancelled.success is False
        assert (await manager.get("c")).queue_position == 1
        await wait_finished(manager, "c")
        assert executor.started == ["a", "c"]
        await shutdown(manager)

    run(scenario())


def test_cancelling_the_running_task_ends_it_cancelled_and_the_next_one_runs(tmp_path):
    async def scenario():
        executor = FakeExecutor(steps=1000, delay_s=0.005)
        manager = await make_manager(tmp_path, executor)
        await manager.submit(new_record("long"))
        await manager.submit(new_record("next", steps=3))
        await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        began = loop.time()
        record = await manager.cancel("long")
        assert loop.time() - began < 0.5
        assert record.status is TaskStatus.CANCELLED and record.error == "cancelled by request"
        assert 0 < record.progress.step < 1000
        assert executor.cancelled == ["long"]
        assert (await wait_finished(manager, "next")).status is TaskStatus.COMPLETED
        assert not (tmp_path / "outputs" / "long.mp4").exists()
        stored = await manager._store.get("long")
        assert stored.status is TaskStatus.CANCELLED
        await shutdown(manager)

    run(scenario())


def test_stop_running_cancels_the_running_task_or_does_nothing(tmp_path):
    async def scenario():
        manager = await make_manager(tmp_path, FakeExecutor(steps=1000))
        assert await manager.stop_running() is None
        await manager.submit(new_record("victim"))
        await asyncio.sleep(0.02)
        stopped = await manager.stop_running()
        assert stopped.task_id == "victim" and stopped.status is TaskStatus.CANCELLED
        assert await manager.stop_running() is None
        await shutdown(manager)

    run(scenario())


def test_cancel_unknown_or_finished_task_raises(tmp_path):
    async def scenario():
        manager = await make_manager(tmp_path)
        with pytest.raises(TaskNotFoundError):
            await manager.cancel("nope")
        await manager.submit(new_record("quick"))
        await wait_finished(manager, "quick")
        with pytest.raises(TaskFinishedError) as finished:
            await manager.cancel("quick")
        assert finished.value.record.status is TaskStatus.COMPLETED
        await shutdown(manager)

    run(scenario())


def test_executor_error_fails_the_task_with_a_one_line_error_and_the_next_runs(tmp_path):
    async def scenario():
        manager = await make_manager(tmp_path)
        await manager.submit(new_record("bad", fail=True))
        await manager.submit(new_record("good"))
        bad = await wait_finished(manager, "bad")
        assert bad.status is TaskStatus.FAILED and bad.success is False
        assert bad.error == "model said no second line"
        assert (await wait_finished(manager, "good")).status is TaskStatus.COMPLETED
        await shutdown(manager)

    run(scenario())


def test_a_task_that_cannot_run_as_asked_fails_when_it_starts(tmp_path):
    async def scenario():
        executor = FakeExecutor()
        manager = await make_manager(tmp_path, executor)
        await manager.submit(new_record("unrunnable", unrunnable=True))
        record = await wait_finished(manager, "unrunnable")
        assert record.status is TaskStatus.FAILED and record.error.startswith("height:")
        assert executor.started == []
        await shutdown(manager)

    run(scenario())


def test_a_bug_in_the_executor_fails_the_task_without_details(tmp_path):
    async def scenario():
        manager = await make_manager(tmp_path)
        await manager.submit(new_record("buggy", crash=True))
        record = await wait_finished(manager, "buggy")
        assert record.status is TaskStatus.FAILED and record.error == "internal error (KeyError)"
        await shutdown(manager)

    run(scenario())


def test_a_result_that_cannot_be_written_fails_the_task_saying_why_and_the_next_runs(tmp_path):
    async def scenario():
        manager = await make_manager(tmp_path)
        (tmp_path / "outputs" / "blocked.mp4").mkdir(parents=True)  # appeared after the POST was checked
        await manager.submit(new_record("blocked"))
        await manager.submit(new_record("fine"))
        record = await wait_finished(manager, "blocked")
        assert record.status is TaskStatus.FAILED
        assert record.error == "could not write the result to save_video_path: Is a directory"
        assert (await wait_finished(manager, "fine")).status is TaskStatus.COMPLETED
        await shutdown(manager)

    run(scenario())


def test_tasks_wait_while_the_executor_is_not_ready_and_start_on_wake(tmp_path):
    async def scenario():
        executor = FakeExecutor(ready=False)
        manager = await make_manager(tmp_path, executor)
        assert not manager.would_start_now()
        answer = await manager.submit(new_record("waits"))
        assert answer.status is TaskStatus.PENDING
        await asyncio.sleep(0.05)
        assert executor.started == []
        executor.ready = True
        manager.wake()
        assert (await wait_finished(manager, "waits")).status is TaskStatus.COMPLETED
        await shutdown(manager)

    run(scenario())


def test_restart_fails_interrupted_tasks_and_runs_pending_ones_in_order(tmp_path):
    async def before_crash():
        store = await SQLiteTaskStore.open(tmp_path / "tasks.sqlite3")
        interrupted = new_record("was-running")
        transition(interrupted, TaskStatus.PROCESSING)
        await store.put(interrupted)
        await store.put(new_record("p1"))
        await store.put(new_record("p2"))
        await store.close()

    async def after_restart():
        executor = FakeExecutor()
        manager = await make_manager(tmp_path, executor)
        record = await manager.get("was-running")
        assert record.status is TaskStatus.FAILED and record.error == INTERRUPTED_AT_RESTART
        await wait_finished(manager, "p2")
        assert executor.started == ["p1", "p2"]
        await shutdown(manager)

    run(before_crash())
    run(after_restart())


def test_shutdown_fails_the_running_task_and_keeps_pending_ones(tmp_path):
    async def scenario():
        manager = await make_manager(tmp_path, FakeExecutor(steps=1000))
        await manager.submit(new_record("active"))
        await manager.submit(new_record("waiting"))
        await asyncio.sleep(0.02)
        store = manager._store
        await manager.close()
        assert (await store.get("active")).error == INTERRUPTED_AT_SHUTDOWN
        assert (await store.get("waiting")).status is TaskStatus.PENDING
        await store.close()

    run(scenario())


def test_state_machine_refuses_moves_out_of_a_final_state():
    record = new_record("x")
    with pytest.raises(InvalidTransition):
        transition(record, TaskStatus.COMPLETED)  # pending cannot complete without running
    transition(record, TaskStatus.PROCESSING)
    assert record.start_time is not None
    transition(record, TaskStatus.COMPLETED)
    assert record.success and record.completion_time is not None
    for target in TaskStatus:
        with pytest.raises(InvalidTransition):
            transition(record, target)


def test_metrics_follow_the_task_states(tmp_path):
    async def scenario():
        manager = await make_manager(tmp_path)
        await manager.submit(new_record("m"))
        await wait_finished(manager, "m")
        text = manager.metrics.render().decode()
        assert 'wan_frontend_tasks{state="completed"} 1.0' in text
        assert 'wan_frontend_tasks{state="processing"} 0.0' in text
        assert "wan_frontend_step_seconds_count 4.0" in text
        await shutdown(manager)

    run(scenario())
