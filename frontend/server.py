"""uvicorn with a graceful shutdown that knows about tasks.

The first SIGTERM or SIGINT does not stop the server at once: it calls `drain()` (the service refuses new
tasks with 503, gives the running ones `--shutdown-grace` seconds, then stops them and saves every record)
while uvicorn keeps answering status, results and health. When the drain is done, uvicorn's own shutdown
runs (close the listener, finish open requests, lifespan end). A second signal skips the wait.
"""

from __future__ import annotations

import asyncio
import logging
from types import FrameType
from typing import Awaitable, Callable

import uvicorn

log = logging.getLogger("frontend.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]):
        super().__init__(config)
        self._drain = drain
        self._drain_signal: int | None = None
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler may interrupt the event loop anywhere: only note the request; on_tick acts on it.
        if self._drain_signal is None and not self.should_exit:
            self._drain_signal = sig
            return
        super().handle_exit(sig, frame)  # second signal: shut down now

    async def on_tick(self, counter: int) -> bool:
        if self._drain_signal is not None and self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain(), name="drain")
        if self._drain_task is not None and self._drain_task.done() and not self.should_exit:
            if not self._drain_task.cancelled() and self._drain_task.exception() is not None:
                log.error("drain failed: %s", self._drain_task.exception())
            super().handle_exit(self._drain_signal, None)  # uvicorn's shutdown, signal re-raised at the end
        return await super().on_tick(counter)
