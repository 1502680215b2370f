"""The /v1 routes (docs at /docs): parse the request, call VideoService, shape the answer. No logic here;
errors are raised by the service and mapped to status codes in `frontend.app`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile

from frontend.files import FileMissing
from frontend.images import ImageTooLarge, read_upload
from frontend.protocol import (
    ServiceMetadata, ServiceStatus, StopResponse, TaskRecord, TaskRequest, TaskResponse, TaskStatus,
)
from frontend.serving import RequestRejected, VideoService

router = APIRouter()

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def get_service(request: Request) -> VideoService:
    return request.app.state.service


Service = Annotated[VideoService, Depends(get_service)]


def not_found(task_id: str) -> JSONResponse:
    return JSONResponse({"status": "not_found", "task_id": task_id}, status_code=404)


# ---- tasks -------------------------------------------------------------------------------------------


@router.post("/v1/tasks/", response_model=TaskResponse)
@router.post("/v1/tasks", response_model=TaskResponse, include_in_schema=False)
async def create_task(body: TaskRequest, service: Service) -> TaskResponse:
    """Queue a text-to-video task (lightx2v-compatible body; unknown fields are ignored)."""
    return await service.create_task(body)


@router.post("/v1/tasks/form", response_model=TaskResponse)
async def create_task_form(request: Request, service: Service) -> TaskResponse:
    """The same fields as form parts; `image_file` optional (image-to-video)."""
    if not request.headers.get("content-type", "").startswith(FORM_TYPES):
        raise RequestRejected("expected a multipart/form-data body")
    async with request.form(max_files=4, max_fields=64) as form:  # closing it removes spooled upload files
        image = form.get("image_file")
        image_bytes = None
        if isinstance(image, UploadFile) and image.filename:  # browsers send an unnamed empty part for "no file"
            try:
                image_bytes = await read_upload(image, service.settings.max_image_bytes)
            except ImageTooLarge as error:
                raise HTTPException(413, str(error)) from None
            if not image_bytes:
                raise RequestRejected("image_file is empty")
        fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
    return await service.create_task(TaskRequest.from_form(fields), image=image_bytes)


@router.get("/v1/tasks/", response_model=dict[str, TaskRecord])
@router.get("/v1/tasks", response_model=dict[str, TaskRecord], include_in_schema=False)
async def list_tasks(service: Service, status: TaskStatus | None = None,
                     limit: Annotated[int | None, Query(ge=1, le=2**31)] = None,
                     offset: Annotated[int, Query(ge=0, le=2**31)] = 0) -> dict[str, TaskRecord]:
    """Task records keyed by id, newest first; one page of at most the server's `max_list_limit` (a larger
    `limit` is cut to it); `offset` skips that many records."""
    return await service.list_tasks(status, limit, offset)


@router.get("/v1/tasks/{task_id}/status", response_model=TaskRecord,
            responses={404: {"description": '{"status": "not_found", "task_id": id}'}})
async def task_status(task_id: str, service: Service):
    record = await service.get_task(task_id)
    return record if record is not None else not_found(task_id)


@router.get("/v1/tasks/{task_id}/result", response_class=Response,
            responses={200: {"content": {"video/mp4": {}}}})
@router.head("/v1/tasks/{task_id}/result", response_class=Response, include_in_schema=False)
async def task_result(task_id: str, service: Service):
    """The mp4 of a completed task (Range requests give 206)."""
    relative = await service.result_file(task_id)
    if relative is None:
        return JSONResponse({"detail": "Task not completed or does not exist"}, status_code=404)
    try:
        return await service.outputs.response(relative)
    except FileMissing:
        return JSONResponse({"detail": "Task result no longer exists (removed by the retention policy)"},
                            status_code=404)


@router.delete("/v1/tasks/running", response_model=StopResponse)
async def stop_running_task(service: Service) -> StopResponse:
    """Cancel the running task (it ends `cancelled` within one denoising step)."""
    record = await service.stop_running()
    if record is None:
        return StopResponse(stop_status="do_nothing", reason="No running task found.")
    return StopResponse(stop_status="success", reason=f"Task {record.task_id} stopped.")


@router.delete("/v1/tasks/{task_id}", response_model=TaskRecord)
async def cancel_task(task_id: str, service: Service) -> TaskRecord:
    """Cancel a pending or running task: 404 unknown, 409 already finished."""
    return await service.cancel_task(task_id)


# ---- files and service -------------------------------------------------------------------------------


@router.get("/v1/files/download/{file_path:path}", response_class=Response)
@router.head("/v1/files/download/{file_path:path}", response_class=Response, include_in_schema=False)
async def download_file(file_path: str, service: Service):
    """A file under the output folder (403 outside it, 404 missing; Range supported)."""
    return await service.outputs.response(file_path)


@router.get("/v1/service/status", response_model=ServiceStatus)
async def service_status(service: Service) -> ServiceStatus:
    return service.status()


@router.get("/v1/service/metadata", response_model=ServiceMetadata)
async def service_metadata(service: Service) -> ServiceMetadata:
    return service.metadata()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(service: Service):
    if service.ready and not service.draining:
        return {"status": "ready"}
    return JSONResponse({"status": "not_ready", "detail": service.not_ready_reason()}, status_code=503)


@router.get("/metrics", response_class=Response)
async def metrics(service: Service) -> Response:
    return Response(service.metrics.render(), media_type=service.metrics.content_type)
