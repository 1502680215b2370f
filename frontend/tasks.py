"""The task lifecycle: FIFO queue, state machine, concurrency slots, cancellation, crash recovery.

Plain asyncio; nothing here knows about HTTP or Triton. The work itself is an `Executor` (the Triton
pipeline in production, a fake in unit tests); records go to a `TaskStore`; results to a `Folder`.

State machine:  pending -> processing -> completed | failed | cancelled
                pending -> cancelled (removed from the queue)
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import re
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Protocol

from frontend.files import Folder
from frontend.metrics import Metrics
from frontend.protocol import Progress, TaskRecord, TaskStatus
from frontend.store import TaskStore

log = logging.getLogger("frontend.tasks")

ProgressCallback = Callable[[int, int], Awaitable[None]]

INTERRUPTED_AT_RESTART = "interrupted: the server stopped while this task was running"
INTERRUPTED_AT_SHUTDOWN = "interrupted: the server shut down while this task was running"
CANCELLED_BY_REQUEST = "cancelled by request"

_ALLOWED = {
    TaskStatus.PENDING: {TaskStatus.PROCESSING, TaskStatus.CANCELLED},
    TaskStatus.PROCESSING: {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED},
}


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Execution:
    """What an executor hands back: the mp4 and the request fields with the values actually used."""

    video: bytes
    used: dict[str, Any]


class ExecutionError(Exception):
    """The work failed; `str()` is the one-line error the task record shows."""


class Executor(Protocol):
    @property
    def ready(self) -> bool:
        """True when a task started now would run (the model server is up)."""

    def prepare(self, record: TaskRecord) -> dict[str, Any]:
        """When the task starts: the message fields to fill in (defaults known only now); ExecutionError if
        the task cannot run as asked."""

    async def run(self, record: TaskRecord, on_progress: ProgressCallback) -> Execution:
        """Generate the task's video; raise ExecutionError on failure. Cancelled by cancelling the caller."""


class InvalidTransition(RuntimeError):
    pass


class DuplicateTaskError(Exception):
    pass


class QueueFullError(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__("Service busy")
        self.retry_after_s = retry_after_s


class ServiceBusyError(Exception):
    pass


class ShuttingDownError(Exception):
    """The server is draining before it stops: no new task is taken (answered 503)."""


class TaskNotFoundError(Exception):
    pass


class TaskFinishedError(Exception):
    def __init__(self, record: TaskRecord):
        super().__init__(f"task already {record.status.value}")
        self.record = record


def transition(record: TaskRecord, new: TaskStatus, error: str | None = None) -> None:
    """Move `record` to `new`, stamping times and `success`; raises InvalidTransition."""
    if new not in _ALLOWED.get(record.status, set()):
        raise InvalidTransition(f"{record.status.value} -> {new.value}")
    record.status = new
    now = utc_now()
    if new is TaskStatus.PROCESSING:
        record.start_time = now
        record.queue_position = None
    else:
        record.completion_time = now
        record.queue_position = None
        record.error = error
        record.success = new is TaskStatus.COMPLETED


class TaskManager:
    def __init__(self, store: TaskStore, executor: Executor, outputs: Folder, *, slots: int = 1,
                 max_queue_size: int = 10, strict_busy: bool = False, metrics: Metrics | None = None,
                 progress_persist_interval_s: float = 2.0, cancel_wait_s: float = 2.0):
        self._store = store
        self._executor = executor
        self._outputs = outputs
        self.slots = slots
        self.max_queue_size = max_queue_size
        self.strict_busy = strict_busy
        self.metrics = metrics or Metrics()
        self._persist_interval = progress_persist_interval_s
        self._cancel_wait = cancel_wait_s
        self._active: dict[str, TaskRecord] = {}  # pending and processing records, the live copies
        self._queue: deque[str] = deque()
        self._running: dict[str, asyncio.Task] = {}
        self._finishing: set[str] = set()  # result being written: too late to cancel
        self._stop_reason: dict[str, tuple[TaskStatus, str]] = {}
        self._reserved: set[str] = set()  # ids being admitted right now
        self._started: set[str] = set()  # running tasks whose coroutine has begun (safe to cancel)
        self._durations: deque[float] = deque(maxlen=20)
        self._closed = False
        self.draining = False

    # ---- start and stop -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Recover after a restart: running tasks failed as interrupted, pending ones queued again in order."""
        self._outputs.ensure()
        for record in await self._store.list_unfinished():
            if record.status is TaskStatus.PROCESSING:
                transition(record, TaskStatus.FAILED, INTERRUPTED_AT_RESTART)
                await self._store.put(record)
                log.warning("task failed: %s", INTERRUPTED_AT_RESTART, extra={"task_id": record.task_id})
            else:
                self._active[record.task_id] = record
                self._queue.append(record.task_id)
        self.metrics.set_counts(await self._store.count_by_status())
        if self._queue:
            log.info("%d pending task(s) queued again", len(self._queue))
        self._update_gauges()
        self.wake()

    async def drain(self, grace_s: float) -> None:
        """Graceful shutdown, first half: refuse new tasks (ShuttingDownError), start no pending one, give the
        running ones `grace_s` seconds to finish, then stop them (failed, interrupted). Pending tasks stay
        pending in the store: the next start runs them."""
        self.draining = True
        self._update_gauges()
        running = list(self._running.values())
        if running and grace_s > 0:
            log.info("shutting down: %d running task(s) get %g s to finish", len(running), grace_s)
            await asyncio.wait(running, timeout=grace_s)
        await self._stop_all(INTERRUPTED_AT_SHUTDOWN)

    async def close(self) -> None:
        """Stop taking work; a running task ends failed (interrupted); pending ones stay pending."""
        self._closed = True
        self.draining = True
        await self._stop_all(INTERRUPTED_AT_SHUTDOWN)

    async def _stop_all(self, reason: str) -> None:
        for task_id in list(self._running):
            self._stop(task_id, TaskStatus.FAILED, reason)
        if self._running:
            await asyncio.wait(list(self._running.values()), timeout=10)

    # ---- questions ----------------------------------------------------------------------------------

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def running_count(self) -> int:
        return len(self._running)

    def running_records(self) -> list[TaskRecord]:
        records = [self._active[task_id] for task_id in self._running]
        return sorted((record.model_copy(deep=True) for record in records), key=lambda r: r.start_time or "")

    def _free_slots(self) -> int:
        if self._closed or self.draining or not self._executor.ready:
            return 0
        return max(0, self.slots - len(self._running))

    def would_start_now(self) -> bool:
        """A task submitted now would start at once (the model server is ready, a slot is free)."""
        return len(self._queue) + len(self._reserved) < self._free_slots()

    def _view(self, record: TaskRecord) -> TaskRecord:
        copy = record.model_copy(deep=True)
        if copy.status is TaskStatus.PENDING and copy.task_id in self._queue:
            copy.queue_position = self._queue.index(copy.task_id) + 1
        return copy

    async def get(self, task_id: str) -> TaskRecord | None:
        if task_id in self._active:
            return self._view(self._active[task_id])
        return await self._store.get(task_id)

    def unfinished_records(self) -> list[TaskRecord]:
        """The live pending and processing records (not copies: read, do not change)."""
        return list(self._active.values())

    async def list(self, status: TaskStatus | None = None, limit: int | None = None,
                   offset: int = 0) -> list[TaskRecord]:
        """Newest first; live records (pending, processing) as they are now."""
        records = []
        for stored in await self._store.list(status, limit, offset):
            record = self._view(self._active[stored.task_id]) if stored.task_id in self._active else stored
            if status is None or record.status is status:
                records.append(record)
        return records

    def retry_after_s(self) -> int:
        """A guess of when a slot frees up, for the Retry-After header."""
        average = sum(self._durations) / len(self._durations) if self._durations else 10.0
        rounds = math.ceil((len(self._queue) + len(self._running)) / self.slots) or 1
        return int(min(3600, max(1, average * rounds)))

    # ---- commands -----------------------------------------------------------------------------------

    async def submit(self, record: TaskRecord) -> TaskRecord:
        """Queue a new pending record; it starts at once when a slot is free. Raises DuplicateTaskError,
        QueueFullError or ServiceBusyError (strict mode)."""
        task_id = record.task_id
        if self.draining:
            self.metrics.rejected.labels("shutting_down").inc()
            raise ShuttingDownError("server is shutting down")
        if task_id in self._active or task_id in self._reserved:
            raise DuplicateTaskError(task_id)
        # Capacity is decided here, before any await, counting the admissions already granted: concurrent
        # POSTs are admitted in arrival order and never beyond the limit.
        waiting = len(self._queue) + len(self._reserved)  # admissions ahead of this one
        free = self._free_slots()
        if self.strict_busy and waiting >= free:
            self.metrics.rejected.labels("busy").inc()
            raise ServiceBusyError("Service busy")
        if waiting + 1 - free > self.max_queue_size:
            self.metrics.rejected.labels("queue_full").inc()
            raise QueueFullError(self.retry_after_s())
        self._reserved.add(task_id)
        try:
            if await self._store.get(task_id) is not None:
                raise DuplicateTaskError(task_id)
            if self.draining:  # the signal came while this one was being admitted
                raise ShuttingDownError("server is shutting down")
            record.status = TaskStatus.PENDING
            await self._store.put(record)
            self._active[task_id] = record
            self._queue.append(task_id)
            self.metrics.transition(None, TaskStatus.PENDING)
        finally:
            self._reserved.discard(task_id)
        log.info("task queued", extra={"task_id": task_id})
        self.wake()
        return self._view(record)

    async def cancel(self, task_id: str) -> TaskRecord:
        """Cancel a pending or running task and answer its record (cancelled). Raises TaskNotFoundError, or
        TaskFinishedError with the record when it has already ended."""
        record = self._active.get(task_id)
        if record is None:
            stored = await self._store.get(task_id)
            if stored is None:
                raise TaskNotFoundError(task_id)
            raise TaskFinishedError(stored)
        if record.status.finished:  # ended a moment ago; its record is being saved
            raise TaskFinishedError(self._view(record))
        if record.status is TaskStatus.PENDING:
            self._queue.remove(task_id)
            transition(record, TaskStatus.CANCELLED, CANCELLED_BY_REQUEST)
            self.metrics.transition(TaskStatus.PENDING, TaskStatus.CANCELLED)
            await self._persist(record)
            del self._active[task_id]
            self._update_gauges()
            log.info("task cancelled while pending", extra={"task_id": task_id})
            return self._view(record)
        task = self._running[task_id]
        mine = self._stop(task_id, TaskStatus.CANCELLED, CANCELLED_BY_REQUEST)
        # The Triton call is cancelled locally at once; waiting lets the answer show the final state.
        await asyncio.wait([task], timeout=self._cancel_wait)
        if record.status is TaskStatus.COMPLETED or (not mine and record.status.finished):
            raise TaskFinishedError(self._view(record))  # it completed, or another request stopped it
        return self._view(record)

    def _stop(self, task_id: str, outcome: TaskStatus, error: str) -> bool:
        """Ask a running task to end as `outcome`; False when it is already ending (stopped by someone else,
        or writing its result). A task whose coroutine has not begun is not cancelled (that would skip its
        bookkeeping): it sees the request as it begins."""
        if task_id in self._finishing or task_id in self._stop_reason:
            return False
        self._stop_reason[task_id] = (outcome, error)
        if task_id in self._started:
            self._running[task_id].cancel()
        return True

    async def stop_running(self) -> TaskRecord | None:
        """Cancel the longest-running task (lightx2v's `DELETE /v1/tasks/running`); None when none runs."""
        candidates = [record for record in self.running_records() if record.task_id not in self._finishing]
        if not candidates:
            return None
        try:
            return await self.cancel(candidates[0].task_id)
        except (TaskNotFoundError, TaskFinishedError):
            return None

    def wake(self) -> None:
        """Start queued tasks while slots are free and the executor is ready (call when readiness changes)."""
        while self._queue and self._free_slots() > 0:
            task_id = self._queue.popleft()
            record = self._active[task_id]
            transition(record, TaskStatus.PROCESSING)
            self.metrics.transition(TaskStatus.PENDING, TaskStatus.PROCESSING)
            self._running[task_id] = asyncio.create_task(self._run(record), name=f"task-{task_id}")
        self._update_gauges()

    # ---- the work -----------------------------------------------------------------------------------

    async def _run(self, record: TaskRecord) -> None:
        task_id = record.task_id
        started = time.monotonic()
        last_step_at: float | None = None
        last_saved_at = started

        async def on_progress(step: int, total_steps: int) -> None:
            nonlocal last_step_at, last_saved_at
            now = time.monotonic()
            if last_step_at is not None and step > record.progress.step:
                self.metrics.step_seconds.observe(now - last_step_at)
            if step >= 1:  # step 1 also carries the text encoding: time from it onwards
                last_step_at = now
            record.progress = Progress(step=step, total_steps=total_steps)
            if now - last_saved_at >= self._persist_interval:
                last_saved_at = now
                await self._persist(record)

        self._started.add(task_id)
        log.info("task started", extra={"task_id": task_id})
        outcome, error = TaskStatus.COMPLETED, None
        try:
            if task_id in self._stop_reason:  # stopped before it began
                raise asyncio.CancelledError
            record.message.update(self._executor.prepare(record))
            await self._persist(record)
            execution = await self._executor.run(record.model_copy(deep=True), on_progress)
            self._finishing.add(task_id)
            record.message.update(execution.used)
            await self._write_result(record, execution.video)
        except asyncio.CancelledError:
            outcome, error = self._stop_reason.get(task_id, (TaskStatus.FAILED, INTERRUPTED_AT_SHUTDOWN))
        except ExecutionError as failure:
            outcome, error = TaskStatus.FAILED, one_line(str(failure))
        except Exception as failure:  # a bug or a disk error: the record says so, the server keeps going
            log.exception("task crashed", extra={"task_id": task_id})
            outcome, error = TaskStatus.FAILED, f"internal error ({type(failure).__name__})"
        transition(record, outcome, error)
        self.metrics.transition(TaskStatus.PROCESSING, outcome)
        self.metrics.task_seconds.labels(outcome.value).observe(time.monotonic() - started)
        if outcome is TaskStatus.COMPLETED:
            self._durations.append(time.monotonic() - started)
        await self._persist(record)
        self._finishing.discard(task_id)
        self._stop_reason.pop(task_id, None)
        self._started.discard(task_id)
        self._running.pop(task_id, None)
        self._active.pop(task_id, None)
        log.info("task %s%s", outcome.value, f": {error}" if error else "", extra={"task_id": task_id})
        if not self._closed:
            self.wake()
        self._update_gauges()

    async def _write_result(self, record: TaskRecord, video: bytes) -> None:
        try:
            await self._outputs.write(record.save_video_path, video)
        except OSError as failure:  # disk full, or the path changed since the POST was checked
            log.exception("task result not written", extra={"task_id": record.task_id})
            reason = failure.strerror or type(failure).__name__
            raise ExecutionError(f"could not write the result to save_video_path: {reason}") from None

    async def _persist(self, record: TaskRecord) -> None:
        try:
            await self._store.put(record)
        except Exception:
            log.exception("could not save the task record", extra={"task_id": record.task_id})

    def _update_gauges(self) -> None:
        self.metrics.queue_length.set(len(self._queue))
        self.metrics.running.set(len(self._running))


# An absolute path inside a message (`/srv/models/dit/1/model.onnx`); not a URL's `//host/...` nor `3/8`.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/([^\s/'\"`,;:()\[\]]+)/(?:[^\s/'\"`,;:()\[\]]+/)*"
                            r"([^\s/'\"`,;:()\[\]]*)")


def redact_paths(text: str, top_folders: frozenset[str] | None = None) -> str:
    """Server paths out of a message for clients: `/srv/models/model.onnx` becomes `.../model.onnx`. Only paths
    that start with a folder of this machine's `/` are paths (an API route such as `/v1/tasks/form` stays)."""
    top = _root_folders() if top_folders is None else top_folders
    return _ABSOLUTE_PATH.sub(lambda match: ".../" + match.group(2) if match.group(1) in top else match.group(0),
                              text)


@functools.lru_cache(maxsize=1)
def _root_folders() -> frozenset[str]:
    try:
        return frozenset(os.listdir("/"))
    except OSError:
        return frozenset()


# The stack that Triton's Python backend appends to an exception's message: "At: /x/model.py(37): execute ...".
_BACKEND_STACK = re.compile(r"\s+At:(?:\s+\S+\(\d+\):\s*\S+)+\s*$")


def one_line(text: str, limit: int = 500) -> str:
    """A task's `error`: one line, no stack, no server paths, at most `limit` characters."""
    line = redact_paths(_BACKEND_STACK.sub("", " ".join(text.split())))
    return line if len(line) <= limit else line[: limit - 3] + "..."
