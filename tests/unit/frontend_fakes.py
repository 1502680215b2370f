"""Test doubles for the front end's unit tests: a fake Triton pipeline client and app/service builders."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from frontend.protocol import ModelInfo
from frontend.settings import Settings
from frontend.triton_client import Generation, PipelineError

TINY_INFO = ModelInfo(
    model_name="wan-tiny", model_kind="t2v", backend="onnxruntime", default_height=96, default_width=160,
    default_num_frames=17, default_num_inference_steps=8, default_guidance_scale=5.0, default_shift=3.0,
    default_fps=16, min_height=32, max_height=480, min_width=32, max_width=832, max_num_frames=81,
    max_num_inference_steps=1000)


class FakeTritonClient:
    """Stands in for TritonPipelineClient: `steps` progress responses `step_delay_s` apart, then a result.

    Set `ready = False` to play "Triton down"; `fail_with` to make the next steps raise."""

    def __init__(self, info: ModelInfo = TINY_INFO, step_delay_s: float = 0.002, ready: bool = True):
        self.info = info
        self.step_delay_s = step_delay_s
        self.ready = ready
        self.fail_with: PipelineError | None = None
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.cancelled: list[str] = []
        self.finished: list[str] = []
        self.max_concurrent = 0
        self._running = 0

    async def probe(self, timeout_s: float = 2.0) -> bool:
        return self.ready

    async def model_info(self, timeout_s: float = 5.0) -> ModelInfo:
        if not self.ready:
            raise PipelineError("model server unavailable", unavailable=True)
        return self.info

    async def generate(self, inputs: dict[str, Any], on_progress, request_id: str = "") -> Generation:
        self.calls.append((request_id, dict(inputs)))
        self._running += 1
        self.max_concurrent = max(self.max_concurrent, self._running)
        total = inputs["num_inference_steps"]
        try:
            for step in range(1, total + 1):
                await asyncio.sleep(self.step_delay_s)
                if not self.ready:
                    raise PipelineError("model server unavailable (Triton could not be reached)", unavailable=True)
                if self.fail_with is not None:
                    raise self.fail_with
                await on_progress(step, total)
        except asyncio.CancelledError:
            self.cancelled.append(request_id)
            raise
        finally:
            self._running -= 1
        self.finished.append(request_id)
        return Generation(video=b"FAKE-MP4:" + request_id.encode(), metadata={"num_frames": inputs["num_frames"]})

    async def close(self) -> None:
        return None


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values = {"data_dir": tmp_path / "data", "triton_poll_interval": 0.05}
    values.update(overrides)
    return Settings(**values)


def wait_status(client, task_id: str, statuses: tuple[str, ...] = ("completed", "failed", "cancelled"),
                timeout_s: float = 10.0) -> dict:
    """Poll GET /v1/tasks/{id}/status (a TestClient or httpx client) until the status is one of `statuses`."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        record = client.get(f"/v1/tasks/{task_id}/status").json()
        if record.get("status") in statuses:
            return record
        if time.monotonic() > deadline:
            raise TimeoutError(f"task {task_id} still {record.get('status')} after {timeout_s} s")
        time.sleep(0.01)


def wait_until(predicate, timeout_s: float = 10.0, interval_s: float = 0.01) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval_s)


class AppHarness:
    """A front-end app on a fake Triton client, driven by Starlette's TestClient (lifespan included)."""

    def __init__(self, tmp_path: Path, fake: FakeTritonClient | None = None, **settings: Any):
        from fastapi.testclient import TestClient

        from frontend.app import create_app
        from frontend.serving import VideoService

        self.tmp_path = tmp_path
        self.settings = make_settings(tmp_path, **settings)
        self.fake = fake or FakeTritonClient()
        self.service = VideoService(self.settings, client=self.fake)
        self.client = TestClient(create_app(self.settings, self.service), raise_server_exceptions=False)

    def __enter__(self) -> "AppHarness":
        self.client.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        self.client.__exit__(*exc_info)

    @property
    def outputs(self) -> Path:
        return self.settings.output_dir


def files_outside(root: Path, data_dir: Path) -> set[Path]:
    """Every file under `root` that is not inside `data_dir` (to prove nothing was written elsewhere)."""
    return {path for path in root.rglob("*") if not path.is_relative_to(data_dir) and not path.is_dir()}
