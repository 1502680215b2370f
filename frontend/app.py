"""The FastAPI application: lifespan (service start/stop), body-size limits, and one place that turns the
service's exceptions into status codes with a one-line `detail` (never a stack trace or a server path)."""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from frontend import files, tasks
from frontend.api_router import router
from frontend.auth import BearerAuth, KeyChecker, exposure_warning, read_key_file
from frontend.protocol import ParameterError
from frontend.serving import RequestRejected, VideoService
from frontend.settings import Settings

log = logging.getLogger("frontend.app")

FORM_OVERHEAD_BYTES = 64 << 10  # multipart boundaries and the small text fields around the image


def create_app(settings: Settings, service: VideoService | None = None) -> FastAPI:
    service = service or VideoService(settings)
    keys = KeyChecker([*settings.api_key, *(read_key_file(settings.api_key_file) if settings.api_key_file else [])])

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        log.info("serving /v1 with Triton at %s, model %s; API keys %s", settings.triton_url, settings.model_name,
                 "required" if keys.enabled else "off")
        warning = exposure_warning(settings.host, keys.enabled)
        if warning:
            log.warning(warning)
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="Wan video service", version="1.0.0", lifespan=lifespan,
                  description="lightx2v-compatible /v1 task API on Triton Inference Server.")
    app.state.service = service
    app.state.settings = settings
    app.include_router(router)
    app.add_middleware(BodySizeLimit, json_limit=settings.max_request_bytes,
                       form_limit=settings.max_upload_bytes + FORM_OVERHEAD_BYTES, timeout_s=settings.body_timeout)
    app.add_middleware(BearerAuth, checker=keys)  # added last: runs first, before any body is read
    _add_error_handlers(app)
    return app


def one_line_errors(errors: list[dict]) -> str:
    parts = []
    for error in errors:
        if error.get("type") == "json_invalid":  # loc is (body, character offset)
            parts.append(f"request body is not valid JSON ({error.get('ctx', {}).get('error', 'decode error')})")
            continue
        if error.get("type") == "missing" and tuple(error.get("loc", ())) == ("body",):
            parts.append("request body is not valid JSON (it is empty; send a JSON object)")
            continue
        location = ".".join(str(item) for item in error.get("loc", ()) if item != "body")
        message = error.get("msg", "invalid value").removeprefix("Value error, ")
        parts.append(f"{location}: {message}" if location else message)
    return " ".join("; ".join(parts).split()) or "invalid request"


def _add_error_handlers(app: FastAPI) -> None:
    def detail(status: int, text: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"detail": " ".join(text.split())}, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(request: Request, error: RequestValidationError):
        return detail(422, one_line_errors(list(error.errors())))

    @app.exception_handler(ValidationError)
    async def _model_invalid(request: Request, error: ValidationError):
        return detail(422, one_line_errors(error.errors()))

    @app.exception_handler(ParameterError)
    async def _parameter(request: Request, error: ParameterError):
        return detail(422, str(error))

    @app.exception_handler(RequestRejected)
    async def _rejected(request: Request, error: RequestRejected):
        return detail(400, str(error))

    @app.exception_handler(tasks.DuplicateTaskError)
    async def _duplicate(request: Request, error: tasks.DuplicateTaskError):
        return detail(400, f"task_id {error.args[0]} already exists")

    @app.exception_handler(tasks.QueueFullError)
    async def _queue_full(request: Request, error: tasks.QueueFullError):
        return detail(429, "Service busy", headers={"Retry-After": str(error.retry_after_s)})

    @app.exception_handler(tasks.ShuttingDownError)
    async def _shutting_down(request: Request, error: tasks.ShuttingDownError):
        return detail(503, "server is shutting down; retry later", headers={"Retry-After": "30"})

    @app.exception_handler(tasks.ServiceBusyError)
    async def _busy(request: Request, error: tasks.ServiceBusyError):
        return detail(400, "Service busy")

    @app.exception_handler(tasks.TaskNotFoundError)
    async def _not_found(request: Request, error: tasks.TaskNotFoundError):
        return JSONResponse({"status": "not_found", "task_id": error.args[0]}, status_code=404)

    @app.exception_handler(tasks.TaskFinishedError)
    async def _finished(request: Request, error: tasks.TaskFinishedError):
        return detail(409, f"task {error.record.task_id} already {error.record.status.value}")

    @app.exception_handler(files.PathOutsideRoot)
    async def _outside(request: Request, error: files.PathOutsideRoot):
        return detail(403, "access to this path is not allowed")

    @app.exception_handler(files.FileMissing)
    async def _missing(request: Request, error: files.FileMissing):
        return detail(404, "file not found")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: HTTPException):
        return detail(error.status_code, str(error.detail), headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return detail(500, "internal server error")


class BodyTooLarge(StarletteHTTPException):
    def __init__(self) -> None:
        super().__init__(status_code=413, detail="request body too large")


class BodyTooSlow(StarletteHTTPException):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(status_code=408, detail=f"request body not received within {timeout_s:g} s")


class BodySizeLimit:
    """413 for bodies over the limit: at once from Content-Length, else while the body streams in; 408 for a
    body that has not fully arrived `timeout_s` after the first read (slow uploads hold no worker forever)."""

    def __init__(self, app: ASGIApp, json_limit: int, form_limit: int, timeout_s: float = 60.0):
        self.app = app
        self.json_limit = json_limit
        self.form_limit = form_limit
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.form_limit if scope["path"].rstrip("/").endswith("/form") else self.json_limit
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_json(send, 413, {"detail": "request body too large"})
            return
        received = 0
        complete = False
        deadline: float | None = None

        async def limited_receive() -> Message:
            nonlocal received, complete, deadline
            if complete:  # after the body only a disconnect can come: wait as long as the caller likes
                return await receive()
            loop = asyncio.get_running_loop()
            deadline = deadline if deadline is not None else loop.time() + self.timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                raise BodyTooSlow(self.timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge()
                complete = not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)


async def _send_json(send: Send, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})
