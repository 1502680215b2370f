"""The /v1 service logic: turns requests into task records, runs them on Triton, answers questions.

It composes the pieces (settings, store, task manager, Triton client, folders, metrics) and keeps Triton's
readiness and the model's defaults/limits fresh. Nothing here knows about HTTP: the routes translate its
exceptions (`RequestRejected` -> 400, `ParameterError` -> 422, `tasks.*Error`, `files.*`) into answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Mapping

from frontend.breaker import FailureBreaker
from frontend.files import Folder, PathOutsideRoot, contained_path, unwritable_reason
from frontend.images import ImageInputs, ImageRejected, ResolvedImage, derive_size
from frontend.metrics import Metrics
from frontend.protocol import (
    MODEL_FIELDS, ModelInfo, ParameterError, Progress, ServiceMetadata, ServiceStatus, TaskRecord, TaskRequest,
    TaskResponse, TaskStatus, generate_task_id, resolve_parameters, task_id_problem,
)
from frontend.retention import Policy, RetentionSweeper, remove_temporary_files
from frontend.settings import Settings
from frontend.store import SQLiteTaskStore, TaskStore
from frontend.tasks import Execution, ExecutionError, ProgressCallback, TaskManager, utc_now
from frontend.triton_client import PipelineError, TritonPipelineClient

log = logging.getLogger("frontend.serving")

I2V_NOT_SERVED = "image-to-video is not available: the served model is text-to-video (leave image_path empty)"
I2V_NEEDS_IMAGE = ("the served model is image-to-video: give an image (image_path, or image_file on "
                   "/v1/tasks/form); an empty image_path means text-to-video, which this model cannot do")


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
        message, overrides = record.message, self._service.settings.parameter_overrides()
        image_path = message.get("image_path") or ""
        if image_path and info.model_kind != "i2v":  # queued before the model's kind was known
            raise ExecutionError(I2V_NOT_SERVED)
        if not image_path and info.model_kind == "i2v":
            raise ExecutionError(I2V_NEEDS_IMAGE)
        try:
            if image_path and (message.get("height") is None or message.get("width") is None):
                width, height = self._service.images.size(image_path)
                message = {**message, **image_size_fields(message, info, overrides, width, height)}
            return resolve_parameters(message, info, overrides)
        except (ParameterError, ImageRejected) as error:
            raise ExecutionError(str(error)) from None

    async def run(self, record: TaskRecord, on_progress: ProgressCallback) -> Execution:
        used = self.prepare(record)
        message = record.message
        inputs = {"prompt": message.get("prompt", ""), "negative_prompt": message.get("negative_prompt", ""),
                  "seed": used["seed"], "num_inference_steps": used["infer_steps"],
                  "num_frames": used["target_video_length"], "height": used["height"], "width": used["width"],
                  "guidance_scale": used["guidance_scale"], "shift": used["sample_shift"], "fps": used["fps"]}
        if message.get("image_path"):
            try:
                inputs["image"] = await asyncio.to_thread(self._service.images.load_rgb, message["image_path"])
            except ImageRejected as error:
                raise ExecutionError(str(error)) from None
        await on_progress(0, used["infer_steps"])
        try:
            generation = await self._service.client.generate(inputs, on_progress, request_id=record.task_id)
        except PipelineError as error:
            self._service.breaker.record_failure()
            if error.unavailable:
                self._service.mark_unavailable()
            raise ExecutionError(str(error)) from None
        self._service.breaker.record_success()
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
        self.images = ImageInputs.from_settings(settings)
        self.client = client or TritonPipelineClient(settings.triton_url, settings.model_name,
                                                     settings.task_timeout)
        self._store = store
        self.model_info: ModelInfo | None = None
        self._triton_ready = False
        self._monitor: asyncio.Task | None = None
        self._recheck = asyncio.Event()
        self.manager: TaskManager | None = None
        self.breaker = FailureBreaker(settings.failure_threshold, settings.failure_cooldown)
        self.retention = RetentionSweeper(
            [self.outputs.root, self.inputs.root],
            Policy(max_age_s=settings.retention_max_age, max_bytes=settings.retention_max_bytes,
                   min_age_s=settings.retention_min_age),
            settings.retention_interval, protected=self._files_in_use)

    # ---- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        self.outputs.ensure()
        self.inputs.ensure()
        for folder in (self.outputs, self.inputs):  # writes cut short by a crash; none runs yet
            removed = await asyncio.to_thread(remove_temporary_files, folder.root)
            if removed:
                log.warning("removed %d temporary file(s) left by an interrupted write in %s/", removed,
                            folder.root.name)
        if self._store is None:
            self._store = await SQLiteTaskStore.open(self.settings.database_path)
        self.manager = TaskManager(self._store, TritonExecutor(self), self.outputs, slots=self.settings.slots,
                                   max_queue_size=self.settings.max_queue_size,
                                   strict_busy=self.settings.strict_busy, metrics=self.metrics)
        await self.manager.start()
        await self.refresh_readiness()
        self._monitor = asyncio.create_task(self._watch_triton(), name="triton-monitor")
        self.retention.start()

    @property
    def draining(self) -> bool:
        return self.manager is not None and self.manager.draining

    async def drain(self) -> None:
        """Graceful shutdown (first SIGTERM): new tasks get 503, the running ones get `shutdown_grace` seconds,
        then they are stopped; every record is saved. `stop()` (uvicorn's lifespan end) follows."""
        log.warning("shutting down: refusing new tasks")
        await self._manager().drain(self.settings.shutdown_grace)

    def _files_in_use(self) -> set:
        """Real paths of the files that unfinished tasks need (kept by the retention sweep)."""
        paths = set()
        for record in self.manager.unfinished_records() if self.manager is not None else []:
            image = record.message.get("image_path") or ""
            for folder, name in ((self.outputs, record.save_video_path), (self.inputs, image)):
                if name and "://" not in name and not name.startswith("data:"):
                    with contextlib.suppress(PathOutsideRoot, OSError, ValueError):
                        paths.add(contained_path(folder.root, name))
        return paths

    async def stop(self) -> None:
        await self.retention.stop()
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
        """A task can start: Triton and the model are ready, and the failure breaker lets one through."""
        running = self.manager.running_count if self.manager is not None else 0
        return self._triton_ready and self.model_info is not None and self.breaker.allows(running)

    def not_ready_reason(self) -> str:
        if self.draining:
            return "shutting down"
        if self._triton_ready and self.model_info is not None and self.breaker.open:
            return self.breaker.reason()
        return "Triton or the pipeline model is not ready"

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
            if ready:  # a server that is back (restarted, perhaps repaired) deserves a try
                self.breaker.reset()
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
        image_input = await self._resolve_image(request.image_path, image)
        cut = self.settings.max_prompt_chars  # the text encoder reads 512 tokens: longer changes nothing
        message = {"task_id": task_id, "prompt": request.prompt[:cut],
                   "negative_prompt": request.negative_prompt[:cut],
                   "image_path": request.image_path,
                   "save_video_path": request.save_video_path or f"{task_id}.mp4"}
        message.update({name: getattr(request, name) for name in MODEL_FIELDS})
        if self.model_info is not None:  # else resolved when the task starts, once Triton is back
            overrides = self.settings.parameter_overrides()
            if image_input is not None:
                message.update(image_size_fields(message, self.model_info, overrides, image_input.info.width,
                                                 image_input.info.height))
            message.update(resolve_parameters(message, self.model_info, overrides))
        await asyncio.to_thread(self._check_save_path, message["save_video_path"])
        stored = None
        if image_input is not None:  # every check passed: only now does the image reach the disk
            stored = message["image_path"] = await self.images.store(image_input, task_id)
        record = TaskRecord(task_id=task_id, status=TaskStatus.PENDING, message=message,
                            progress=Progress(step=0, total_steps=message["infer_steps"] or 0),
                            created_at=utc_now(), save_video_path=message["save_video_path"])
        try:
            record = await self._manager().submit(record)
        except BaseException:  # refused (duplicate id, queue full, busy) or the client went away
            if stored is not None:
                await asyncio.shield(self.images.discard(image_input, stored))
            raise
        return TaskResponse(task_id=task_id, task_status=record.status, save_video_path=record.save_video_path)

    def _check_save_path(self, relative: str) -> None:
        """Refused now rather than after the generation: a path that leads out, or one the result could not be
        written to as things stand."""
        try:
            reason = unwritable_reason(self.outputs.root, relative)
        except PathOutsideRoot:
            raise ParameterError("save_video_path: must stay inside the output folder") from None
        if reason is not None:
            raise ParameterError(f"save_video_path: {reason}")

    async def _resolve_image(self, image_path: str, upload: bytes | None) -> ResolvedImage | None:
        """The checked image input of a request (nothing stored yet), None for text-to-video; RequestRejected
        when the image is bad or does not fit the served model (t2v: no image; i2v: an image is required).
        While the model is unknown (Triton down) an image is accepted and the task checked when it starts."""
        kind = self.model_info.model_kind if self.model_info else None
        if upload is None and not image_path:
            if kind == "i2v":
                raise RequestRejected(I2V_NEEDS_IMAGE)
            return None
        try:  # a t2v server still says what is wrong with a bad image, but fetches no URL
            image_input = await self.images.resolve(image_path, upload, fetch=kind != "t2v")
        except ImageRejected as error:
            raise RequestRejected(str(error)) from None
        if kind == "t2v":
            raise RequestRejected(I2V_NOT_SERVED)
        return image_input

    async def get_task(self, task_id: str) -> TaskRecord | None:
        return await self._manager().get(task_id)

    async def list_tasks(self, status: TaskStatus | None, limit: int | None,
                         offset: int = 0) -> dict[str, TaskRecord]:
        """One page of records, newest first: at most `max_list_limit` (also the default)."""
        limit = min(limit or self.settings.max_list_limit, self.settings.max_list_limit)
        return {record.task_id: record for record in await self._manager().list(status, limit, offset)}

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
            if info.model_kind == "i2v":
                limits.update(max_image_bytes=self.settings.max_image_bytes,
                              max_image_pixels=self.settings.max_image_pixels,
                              image_url_fetch=self.settings.allow_url_fetch)
        image_inputs = ["image_path", "image_file"] if info is not None and info.model_kind == "i2v" else []
        return ServiceMetadata(
            model_name=info.model_name if info else None, model_kind=info.model_kind if info else None,
            backend=info.backend if info else None, triton_model=self.settings.model_name, ready=self.ready,
            defaults=defaults, limits=limits,
            supported_inputs=["prompt", "negative_prompt", *image_inputs, *MODEL_FIELDS, "save_video_path",
                              "task_id"])


def image_size_fields(message: Mapping[str, Any], info: ModelInfo, overrides: Mapping[str, Any],
                      image_width: int, image_height: int) -> dict[str, int]:
    """`height` and `width` for an image-to-video task: the requested ones, a missing one derived from the
    conditioning image's aspect ratio (both missing: about the default area, as Wan's `max_area`)."""
    height, width = derive_size(
        image_width, image_height, height=message.get("height"), width=message.get("width"),
        default_height=overrides.get("height") or info.default_height,
        default_width=overrides.get("width") or info.default_width, min_height=info.min_height,
        max_height=info.max_height, min_width=info.min_width, max_width=info.max_width)
    return {"height": height, "width": width}
