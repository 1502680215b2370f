"""Where task records live: a small async interface and its SQLite implementation.

The interface is all the task lifecycle uses, so a shared store (Postgres, Redis ...) can replace SQLite
later. SQLite calls run on one dedicated thread (SQLite connections are single-threaded), so the event loop
never waits on the disk.
"""

from __future__ import annotations

import asyncio
import sqlite3
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, TypeVar

from frontend.protocol import TaskRecord, TaskStatus

T = TypeVar("T")


class TaskStore(ABC):
    """Task records by id. Listing order is creation order (newest first unless stated)."""

    @abstractmethod
    async def put(self, record: TaskRecord) -> None:
        """Insert or replace the record with this task id."""

    @abstractmethod
    async def get(self, task_id: str) -> TaskRecord | None: ...

    @abstractmethod
    async def list(self, status: TaskStatus | None = None, limit: int | None = None,
                   offset: int = 0) -> list[TaskRecord]:
        """Newest first; `offset` records skipped."""

    @abstractmethod
    async def list_unfinished(self) -> list[TaskRecord]:
        """Pending and processing records, oldest first (the order they were queued in)."""

    @abstractmethod
    async def count_by_status(self) -> dict[TaskStatus, int]: ...

    async def close(self) -> None:
        return None


class SQLiteTaskStore(TaskStore):
    """One table, one JSON record per task; WAL journal, so a killed process loses no committed write."""

    _SCHEMA = """
        CREATE TABLE IF NOT EXISTS tasks (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            task_id TEXT NOT NULL UNIQUE,
            status TEXT NOT NULL,
            record TEXT NOT NULL
        );
        CREATE INDEX IF NOT EXISTS tasks_status ON tasks (status, seq);
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._connection: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: Path) -> "SQLiteTaskStore":
        store = cls(path)
        await store._run(store._connect)
        return store

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.executescript(self._SCHEMA)
        self._connection = connection

    async def _run(self, function: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            raise RuntimeError("store is closed")
        return self._connection

    async def put(self, record: TaskRecord) -> None:
        def write(task_id: str, status: str, data: str) -> None:
            self._db().execute(
                "INSERT INTO tasks (task_id, status, record) VALUES (?, ?, ?) "
                "ON CONFLICT (task_id) DO UPDATE SET status = excluded.status, record = excluded.record",
                (task_id, status, data))

        await self._run(write, record.task_id, record.status.value, record.model_dump_json())

    async def get(self, task_id: str) -> TaskRecord | None:
        def read() -> str | None:
            row = self._db().execute("SELECT record FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
            return row[0] if row else None

        data = await self._run(read)
        return TaskRecord.model_validate_json(data) if data is not None else None

    async def list(self, status: TaskStatus | None = None, limit: int | None = None,
                   offset: int = 0) -> list[TaskRecord]:
        def read() -> list[str]:
            query, args = "SELECT record FROM tasks", []
            if status is not None:
                query += " WHERE status = ?"
                args.append(status.value)
            query += " ORDER BY seq DESC"
            if limit is not None or offset:
                query += " LIMIT ? OFFSET ?"
                args.extend([-1 if limit is None else limit, max(0, offset)])
            return [row[0] for row in self._db().execute(query, args)]

        return [TaskRecord.model_validate_json(data) for data in await self._run(read)]

    async def list_unfinished(self) -> list[TaskRecord]:
        def read() -> list[str]:
            rows = self._db().execute("SELECT record FROM tasks WHERE status IN (?, ?) ORDER BY seq",
                                      (TaskStatus.PENDING.value, TaskStatus.PROCESSING.value))
            return [row[0] for row in rows]

        return [TaskRecord.model_validate_json(data) for data in await self._run(read)]

    async def count_by_status(self) -> dict[TaskStatus, int]:
        def read() -> list[tuple[str, int]]:
            return self._db().execute("SELECT status, COUNT(*) FROM tasks GROUP BY status").fetchall()

        return {TaskStatus(status): count for status, count in await self._run(read)}

    async def close(self) -> None:
        def shut() -> None:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

        await self._run(shut)
        self._thread.shutdown(wait=True)
