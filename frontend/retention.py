"""Retention of result and input files: a policy (`plan`, pure) and a background sweep that applies it.

- `max_age_s`: a file older than this is deleted.
- `max_bytes`: while the files together are larger, the oldest are deleted first, but never one younger
  than `min_age_s` (a client that just got "completed" always has that long to download its video).
- Files that a pending or running task still needs (its input image, the result it is writing) and
  temporary files of writes in progress are never deleted.

A file's age is its modification time: results are written once, atomically, when their task completes;
inputs when their task is submitted. Task records are kept; a deleted result answers 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

log = logging.getLogger("frontend.retention")

# tempfile.mkstemp(prefix=".NAME.", suffix=".tmp") as files.atomic_write makes them: 8 random characters.
TEMPORARY_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


@dataclass(frozen=True)
class Policy:
    max_age_s: float = 0.0  # 0: no age limit
    max_bytes: int = 0  # 0: no size limit
    min_age_s: float = 3600.0

    @property
    def enabled(self) -> bool:
        return self.max_age_s > 0 or self.max_bytes > 0


@dataclass(frozen=True)
class StoredFile:
    path: Path
    size: int
    mtime: float


def plan(files: Iterable[StoredFile], policy: Policy, now: float,
         protected: Callable[[Path], bool] = lambda path: False) -> list[StoredFile]:
    """The files to delete, oldest first. Pure: decides, deletes nothing."""
    if not policy.enabled:
        return []
    kept = sorted(files, key=lambda item: (item.mtime, str(item.path)))
    doomed: list[StoredFile] = []
    if policy.max_age_s > 0:
        expired = [item for item in kept if now - item.mtime > policy.max_age_s and not protected(item.path)]
        doomed.extend(expired)
        kept = [item for item in kept if item not in expired]
    if policy.max_bytes > 0:
        total = sum(item.size for item in kept)
        for item in kept:  # oldest first
            if total <= policy.max_bytes:
                break
            if now - item.mtime < policy.min_age_s or protected(item.path):
                continue
            doomed.append(item)
            total -= item.size
    return doomed


def scan(root: Path) -> list[StoredFile]:
    """Regular files under `root` (links not followed), without temporary files of writes in progress."""
    found = []
    for folder, folders, names in os.walk(root, followlinks=False):
        for name in names:
            if TEMPORARY_NAME.match(name):
                continue
            path = Path(folder) / name
            try:
                info = path.lstat()
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                found.append(StoredFile(path, info.st_size, info.st_mtime))
    return found


def remove_temporary_files(root: Path) -> int:
    """Delete what writes interrupted by a crash left behind (only safe before any write starts)."""
    removed = 0
    for folder, folders, names in os.walk(root, followlinks=False):
        for name in names:
            if TEMPORARY_NAME.match(name):
                with contextlib.suppress(OSError):
                    (Path(folder) / name).unlink()
                    removed += 1
    return removed


def sweep(roots: Iterable[Path], policy: Policy, protected_paths: set[Path], now: float | None = None) -> list[Path]:
    """Apply the policy to the files under `roots` (blocking: run it in a thread); the deleted paths."""
    now = time.time() if now is None else now
    real_roots = [Path(os.path.realpath(root)) for root in roots]  # compared with real protected paths
    files = [item for root in real_roots if root.is_dir() for item in scan(root)]
    deleted = []
    for item in plan(files, policy, now, protected=lambda path: path in protected_paths):
        try:
            current = item.path.lstat()
            if current.st_mtime != item.mtime:  # rewritten since the scan (a new result): keep it
                continue
            item.path.unlink()
            deleted.append(item.path)
        except OSError:
            continue
    return deleted


class RetentionSweeper:
    """Runs `sweep` every `interval_s` on a thread; `protected()` names files that unfinished tasks need."""

    def __init__(self, roots: list[Path], policy: Policy, interval_s: float,
                 protected: Callable[[], set[Path]]):
        self.roots = roots
        self.policy = policy
        self.interval_s = interval_s
        self._protected = protected
        self._task: asyncio.Task | None = None
        self.deleted_total = 0

    def start(self) -> None:
        if self.policy.enabled and self._task is None:
            self._task = asyncio.create_task(self._loop(), name="retention-sweep")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run_once(self) -> list[Path]:
        deleted = await asyncio.to_thread(sweep, self.roots, self.policy, self._protected())
        self.deleted_total += len(deleted)
        if deleted:
            log.info("retention: deleted %d file(s)", len(deleted))
        return deleted

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except Exception:  # never let the sweep die
                log.exception("retention sweep failed")
            await asyncio.sleep(self.interval_s)
