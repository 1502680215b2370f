"""The SQLite task store: what the lifecycle relies on (order, filters, durability across reopen)."""

from __future__ import annotations

import asyncio

import pytest

from frontend.protocol import Progress, TaskRecord, TaskStatus
from frontend.store import SQLiteTaskStore


def record(task_id: str, status: TaskStatus = TaskStatus.PENDING) -> TaskRecord:
    return TaskRecord(task_id=task_id, status=status, message={"prompt": task_id}, created_at="2025-01-01T00:00:00Z",
                      save_video_path=f"{task_id}.mp4")


def run(coroutine):
    return asyncio.run(coroutine)


def test_put_then_get_returns_the_same_record(tmp_path):
    async def scenario():
        store = await SQLiteTaskStore.open(tmp_path / "tasks.sqlite3")
        original = record("a")
        original.progress = Progress(step=3, total_steps=8)
        await store.put(original)
        assert await store.get("a") == original
        assert await store.get("missing") is None
        await store.close()

    run(scenario())


def test_list_is_newest_first_and_filters_by_status_and_limit(tmp_path):
    async def scenario():
        store = await SQLiteTaskStore.open(tmp_path / "tasks.sqlite3")
        for name, status in [("a", TaskStatus.COMPLETED), ("b", TaskStatus.FAILED), ("c", TaskStatus.COMPLETED)]:
            await store.put(record(name, status))
        assert [r.task_id for r in await store.list()] == ["c", "b", "a"]
        assert [r.task_id for r in await store.list(TaskStatus.COMPLETED)] == ["c", "a"]
        assert [r.task_id for r in await store.list(limit=2)] == ["c", "b"]
        assert await store.count_by_status() == {TaskStatus.COMPLETED: 2, TaskStatus.FAILED: 1}
        await store.close()

    run(scenario())


def test_updating_a_record_keeps_its_place_in_creation_order(tmp_path):
    async def scenario():
        store = await SQLiteTaskStore.open(tmp_path / "tasks.sqlite3")
        await store.put(record("first"))
        await store.put(record("second"))
        await store.put(record("first", TaskStatus.PROCESSING))
        assert [r.task_id for r in await store.list()] == ["second", "first"]
        assert [r.task_id for r in await store.list_unfinished()] == ["first", "second"]
        await store.close()

    run(scenario())


def test_records_survive_closing_and_reopening_the_database(tmp_path):
    path = tmp_path / "data" / "tasks.sqlite3"

    async def write():
        store = await SQLiteTaskStore.open(path)
        await store.put(record("kept", TaskStatus.PROCESSING))
        await store.close()

    async def read():
        store = await SQLiteTaskStore.open(path)
        try:
            return [r.task_id for r in await store.list_unfinished()]
        finally:
            await store.close()

    run(write())
    assert run(read()) == ["kept"]


def test_closed_store_refuses_calls(tmp_path):
    async def scenario():
        store = await SQLiteTaskStore.open(tmp_path / "tasks.sqlite3")
        await store.close()
        with pytest.raises(RuntimeError):
            await store.get("a")

    run(scenario())
