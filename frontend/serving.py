"""The /v1 service logic: turns requests into task records, runs them on Triton, answers questions.

It composes the pieces (settings, store, task manager, Triton client, folders, metrics) and keeps Triton's
readiness and the model's defaults/limits fresh. Nothing here knows about HTTP: the routes translate its
exceptions (`RequestRejected` -> 400, `ParameterError` -> 422, `tasks.*Error`, `files.*`) into answers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import logging
from typing import Any

from frontend.files import FileMissing, Folder, PathOutsideRoot, contained_path
from frontend.metrics import Metrics
from frontend.protocol import (
    MODEL_FIELDS, ModelInfo, ParameterError, Progress, ServiceMetadata, ServiceStatus, TaskRecord, TaskRequest,
    TaskResponse, TaskStatus, generate_task_id, resolve_parameters, task_id_problem,
)
from frontend.settings import Settings
from frontend.store import SQLiteTaskStore, TaskStore
from frontend.tasks import Execution, ExecutionError, ProgressCallback, TaskManager, utc_now
from frontend.triton_client import PipelineError, TritonPipelineClient

log = logging.getLogger("frontend.serving")

I2V_NOT_SERVED = "image-to-video is not available: the served model is text-to-video (leave image_path empty)"
I2V_NOT_SUPPORTED = "image-to-video is not available: this front end does not support image inputs yet"


class RequestRejected(ValueError):
    """A request that cannot be taken as it is (answered 400); the message is one line for the client."""


class TritonExecutor:
    """Runs a task record on the pipeline model; ready while the readiness monitor says so."""

    def __init__(self, service: "VideoService"):
        self._service = service

    @property
    def ready(self) -> bool:
        return self._service.ready

    def prepare(self, record: TaskRecord) -> dict[str, Any]:
        """Every model field with its value, checked against the model's limits as they are now."""
        info = self._service.model_info
        if info is None:
            raise ExecutionError("model server unavailable (no model config yet)")
        try:
            return resolve_parameters(record.message, info, self._service.settings.parameter_overrides())
        except ParameterError as error:
            raise ExecutionError(str(error)) from None

    async def run(self, record: TaskRecord, on_progress: ProgressCallback) -> Execution:
        used = self.prepare(record)
        message = record.message
        inputs = {"prompt": message.get("prompt", ""), "negative_prompt": message.get("negative_prompt", ""),
                  "seed": used["seed"], "num_inference_steps": used["infer_steps"],
                  "num_frames": used["target_video_length"], "height": used["height"], "width": used["width"],
                  "guidance_scale": used["guidance_scale"], "shift": used["sample_shift"], "fps": used["fps"]}
        await on_progress(0, used["infer_steps"])
        try:
            generation = await self._service.client.generate(inputs, on_progress, request_id=record.task_id)
        except PipelineError as error:
            if error.unavailable:
                self._service.mark_unavailable()
            raise ExecutionError(str(error)) from None
        metadata = generation.metadata
        if isinstance(metadata.get("num_frames"), int):
            used["target_video_length"] = metadata["num_frames"]
        return Execution(video=generation.video, used=used)


class VideoService:
    def __init__(self, settings: Settings, store: TaskStore | None = None,
                 client: TritonPipelineClient | None = None, metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.outputs = Folder(settings.output_dir)
        self.inputs = Folder(settings.input_dir)
        self.client = client or TritonPipelineClient(settings.triton_url, settings.model_name,
                                                     settings.task_timeout)
        self._store = store
        self.model_info: ModelInfo | None = None
        self._triton_ready = False
        self._monitor: asyncio.Task | None = None
        self._recheck = asyncio.Event()
        self.manager: TaskManager | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        self.outputs.ensure()
        self.inputs.ensure()
        if self._store is None:
            self._store = await SQLiteTaskStore.open(self.settings.database_path)
        self.manager = TaskManager(self._store, TritonExecutor(self), self.outputs, slots=self.settings.slots,
                                   max_queue_size=self.settings.max_queue_size,
                                   strict_busy=self.settings.strict_busy, metrics=self.metrics)
        await self.manager.start()
        await self.refresh_readiness()
        self._monitor = asyncio.create_task(self._watch_triton(), name="triton-monitor")

    async def stop(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        if self.manager is not None:
            await self.manager.close()
        await self.client.close()
        if self._store is not None:
            await self._store.close()

    # ---- Triton readiness ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._triton_ready and self.model_info is not None

    def mark_unavailable(self) -> None:
        """A call found Triton gone: stop starting tasks until the monitor sees it back."""
        if self._triton_ready:
            log.warning("Triton unavailable; tasks wait until it is back")
        self._triton_ready = False
        self.metrics.triton_ready.set(0)
        self._recheck.set()

    async def refresh_readiness(self) -> bool:
        ready = await self.client.probe()
        if ready and (self.model_info is None or not self._triton_ready):
            try:  # (re)read defaults and limits whenever the model (re)appears: it may have been rebuilt
                self.model_info = await self.client.model_info()
            except PipelineError as error:
                log.warning("cannot read the model config: %s", error)
                ready = False
        if ready != self._triton_ready:
            log.info("Triton and %s %s", self.settings.model_name, "ready" if ready else "not ready")
        self._triton_ready = ready
        self.metrics.triton_ready.set(1 if self.ready else 0)
        if self.ready and self.manager is not None:
            self.manager.wake()
        return self.ready

    async def _watch_triton(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._recheck.wait(), self.settings.triton_poll_interval)
            self._recheck.clear()
            try:
                await self.refresh_readiness()
            except Exception:  # never let the monitor die
                log.exception("readiness check failed")

    # ---- requests -----------------------------------------------------------------------------------

    def _manager(self) -> TaskManager:
        if self.manager is None:
            raise RuntimeError("service not started")
        return self.manager

    async def create_task(self, request: TaskRequest, image: bytes | None = None) -> TaskResponse:
        """Validate a request (ParameterError, RequestRejected) and queue it (tasks.*Error)."""
        task_id = request.task_id or generate_task_id()
        problem = task_id_problem(task_id)
        if problem:
            raise RequestRejected(problem)
        if image is not None or request.image_path:
            await self._check_image(request.image_path, image)
            kind = self.model_info.model_kind if self.model_info else None
            raise RequestRejected(I2V_NOT_SUPPORTED if kind == "i2v" else I2V_NOT_SERVED)
        message = {"task_id": task_id, "prompt": request.prompt, "negative_prompt": request.negative_prompt,
                   "image_path": request.image_path,
                   "save_video_path": request.save_video_path or f"{task_id}.mp4"}
        message.update({name: getattr(request, name) for name in MODEL_FIELDS})
        if self.model_info is not None:  # else resolved when the task starts, once Triton is back
            message.update(resolve_parameters(message, self.model_info, self.settings.parameter_overrides()))
        await asyncio.to_thread(self._check_save_path, message["save_video_path"])
        record = TaskRecord(task_id=task_id, status=TaskStatus.PENDING, message=message,
                            progress=Progress(step=0, total_steps=message["infer_steps"] or 0),
                            created_at=utc_now(), save_video_path=message["save_video_path"])
        record = await self._manager().submit(record)
        return TaskResponse(task_id=task_id, task_status=record.status, save_video_path=record.save_video_path)

    def _check_save_path(self, relative: str) -> None:
        try:
            contained_path(self.outputs.root, relative)
        except PathOutsideRoot:
            raise ParameterError("save_video_path: must stay inside the output folder") from None

    async def _check_image(self, image_path: str, upload: bytes | None) -> None:
        """Raise RequestRejected unless the image input names/carries a decodable image."""
        if upload is not None:
            await asyncio.to_thread(_verify_image, upload)
            return
        if image_path.startswith(("http://", "https://")):
            if not self.settings.allow_url_fetch:
                raise RequestRejected("image_path URLs are disabled on this server (upload the image instead)")
            return  # fetched and checked by the image-to-video path, when one is served
        if image_path.startswith("data:"):
            header, _, payload = image_path.partition(",")
            if not header.startswith("data:image/") or ";base64" not in header:
                raise RequestRejected("image_path data URI must be data:image/...;base64,...")
            await asyncio.to_thread(_verify_image, _b64decode(payload))
            return
        try:
            await self.inputs.find(image_path)
            return
        except PathOutsideRoot:
            raise RequestRejected("image_path must name a file inside the input folder") from None
        except FileMissing:
            pass
        try:
            data = _b64decode(image_path)
        except RequestRejected:
            raise RequestRejected("image_path is neither a file in the input folder nor base64 image data") \
                from None
        await asyncio.to_thread(_verify_image, data)

    async def get_task(self, task_id: str) -> TaskRecord | None:
        return await self._manager().get(task_id)

    async def list_tasks(self, status: TaskStatus | None, limit: int | None) -> dict[str, TaskRecord]:
        return {record.task_id: record for record in await self._manager().list(status, limit)}

    async def cancel_task(self, task_id: str) -> TaskRecord:
        return await self._manager().cancel(task_id)

    async def stop_running(self) -> TaskRecord | None:
        return await self._manager().stop_running()

    async def result_file(self, task_id: str) -> str | None:
        """The output-relative path of a completed task's video, or None."""
        record = await self._manager().get(task_id)
        if record is None or record.status is not TaskStatus.COMPLETED:
            return None
        return record.save_video_path

    def retry_after_s(self) -> int:
        return self._manager().retry_after_s()

    def status(self) -> ServiceStatus:
        manager = self._manager()
        running = manager.running_records()
        idle = self.ready and manager.would_start_now()  # a new task would start at once
        first = running[0] if running else None
        return ServiceStatus(service_status="idle" if idle else "busy",
                             task_id=first.task_id if first else None,
                             start_time=first.start_time if first else None,
                             queue_length=manager.queue_length, ready=self.ready)

    def metadata(self) -> ServiceMetadata:
        info = self.model_info
        defaults: dict[str, Any] = {}
        limits: dict[str, Any] = {}
        if info is not None:
            defaults = {**info.defaults(), "seed": 42}
            defaults.update({k: v for k, v in self.settings.parameter_overrides().items() if v is not None})
            limits = {"min_height": info.min_height, "max_height": info.max_height, "min_width": info.min_width,
                      "max_width": info.max_width, "max_target_video_length": info.max_num_frames,
                      "max_infer_steps": min(1000, info.max_num_inference_steps),
                      "height_multiple": 16, "target_video_length_rule": "4k+1",
                      "max_queue_size": self.settings.max_queue_size, "slots": self.settings.slots}
        return ServiceMetadata(
            model_name=info.model_name if info else None, model_kind=info.model_kind if info else None,
            backend=info.backend if info else None, triton_model=self.settings.model_name, ready=self.ready,
            defaults=defaults, limits=limits,
            supported_inputs=["prompt", "negative_prompt", *MODEL_FIELDS, "save_video_path", "task_id"])


def _b64decode(text: str) -> bytes:
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestRejected("image data is not valid base64") from None
    if not data:
        raise RequestRejected("image data is empty")
    return data


def _verify_image(data: bytes) -> None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except Exception:  # untrusted bytes: any decoder complaint (incl. decompression bombs) is a bad image
        raise RequestRejected("image does not decode as an image") from None
