"""The only module that talks to Triton: readiness, the pipeline model's config, and one streamed generation.

Generation uses gRPC bi-directional streaming (`tritonclient.grpc.aio`): the decoupled `wan_pipeline` model
answers one response per denoising step (`step`, `total_steps`) and a final one with `video` and
`metadata`. Cancelling the coroutine that awaits `generate()` cancels the gRPC call, which the model sees as
`request.is_cancelled()` before its next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from frontend.protocol import ModelInfo

log = logging.getLogger("frontend.triton")

MAX_MESSAGE_BYTES = 2**31 - 1
# Reconnect quickly after Triton comes back (gRPC's default backoff grows to two minutes).
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

# Pipeline inputs and their Triton datatypes (docs/DESIGN.md).
INPUT_TYPES = {
    "prompt": "BYTES", "negative_prompt": "BYTES", "seed": "INT64", "num_inference_steps": "INT32",
    "num_frames": "INT32", "height": "INT32", "width": "INT32", "fps": "INT32", "guidance_scale": "FP32",
    "shift": "FP32", "image": "UINT8",
}
_NUMPY_TYPES = {"BYTES": np.object_, "INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "UINT8": np.uint8}

ProgressCallback = Callable[[int, int], Awaitable[None]]


class PipelineError(Exception):
    """A failed call; `unavailable` when the call failed on the way (Triton unreachable, the connection broken,
    no answer in time) rather than by the model's own error answer: Triton is checked again before the next
    task starts."""

    def __init__(self, message: str, unavailable: bool = False):
        super().__init__(message)
        self.unavailable = unavailable


@dataclass
class Generation:
    video: bytes
    metadata: dict[str, Any]


def build_inputs(values: dict[str, Any]) -> list[InferInput]:
    """Triton tensors for the given pipeline inputs (names as in INPUT_TYPES): shape [1] for scalars, the array's
    own shape for arrays (`image`: RGB uint8 [H, W, 3])."""
    inputs = []
    for name, value in values.items():
        datatype = INPUT_TYPES[name]
        if isinstance(value, np.ndarray):
            array = np.ascontiguousarray(value, dtype=_NUMPY_TYPES[datatype])
            tensor = InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
            continue
        if datatype == "BYTES":
            array = np.array([str(value).encode("utf-8")], dtype=np.object_)
        else:
            array = np.array([value], dtype=_NUMPY_TYPES[datatype])
        tensor = InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _grpc_failure(error: grpc.RpcError | InferenceServerException, timeout_s: float | None) -> PipelineError:
    code = error.code() if isinstance(error, grpc.RpcError) else None
    status = str(error.status() or "") if isinstance(error, InferenceServerException) else ""
    if code == grpc.StatusCode.UNAVAILABLE or "UNAVAILABLE" in status:
        return PipelineError("model server unavailable (Triton could not be reached)", unavailable=True)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED or "DEADLINE_EXCEEDED" in status:
        return PipelineError(f"model server timed out after {timeout_s:g} s", unavailable=True)
    if code == grpc.StatusCode.CANCELLED or "CANCELLED" in status:
        return PipelineError("model server call was cancelled", unavailable=True)
    message = error.details() if isinstance(error, grpc.RpcError) else error.message()
    return PipelineError(f"model server error: {' '.join(str(message or error).split())}", unavailable=True)


class TritonPipelineClient:
    def __init__(self, url: str, model_name: str, timeout_s: float = 3600.0):
        self.url = url
        self.model_name = model_name
        self.timeout_s = timeout_s
        self._client: grpcclient.InferenceServerClient | None = None

    def _connection(self) -> grpcclient.InferenceServerClient:
        # gRPC aio channels belong to the event loop that made them: create lazily, inside it.
        if self._client is None:
            self._client = grpcclient.InferenceServerClient(self.url, channel_args=CHANNEL_ARGS)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def probe(self, timeout_s: float = 2.0) -> bool:
        """Triton is up and the pipeline model is ready."""
        client = self._connection()
        try:
            return bool(await client.is_server_ready(client_timeout=timeout_s)
                        and await client.is_model_ready(self.model_name, client_timeout=timeout_s))
        except (InferenceServerException, grpc.RpcError, asyncio.TimeoutError):
            return False

    async def model_info(self, timeout_s: float = 5.0) -> ModelInfo:
        """Defaults and limits from the model's config `parameters`; raises PipelineError."""
        try:
            config = await self._connection().get_model_config(self.model_name, as_json=True,
                                                               client_timeout=timeout_s)
        except (InferenceServerException, grpc.RpcError) as error:
            raise _grpc_failure(error, timeout_s) from None
        parameters = {key: value.get("string_value", "")
                      for key, value in config.get("config", {}).get("parameters", {}).items()}
        try:
            return ModelInfo.from_parameters(parameters)
        except (KeyError, ValueError) as error:
            raise PipelineError(f"model config of {self.model_name} lacks a valid parameter {error}") from None

    async def generate(self, inputs: dict[str, Any], on_progress: ProgressCallback,
                       request_id: str = "") -> Generation:
        """Run one generation, calling `on_progress(step, total_steps)` per step response.

        Raises PipelineError; cancelling the awaiting task cancels the Triton request."""
        done = asyncio.Event()

        async def requests() -> AsyncIterator[dict]:
            yield {"model_name": self.model_name, "inputs": build_inputs(inputs), "request_id": request_id}
            await done.wait()  # keep our side of the stream open until the final response

        call = self._connection().stream_infer(requests(), stream_timeout=self.timeout_s)
        try:
            async for result, error in call:
                if error is not None:
                    raise PipelineError(" ".join(error.message().split()) or "model error")
                names = {output.name for output in result.get_response().outputs}
                if "video" in names:
                    video = result.as_numpy("video").reshape(-1)[0]
                    metadata = result.as_numpy("metadata").reshape(-1)[0] if "metadata" in names else b"{}"
                    return Generation(video=bytes(video), metadata=json.loads(metadata))
                if "step" in names:
                    await on_progress(int(result.as_numpy("step").reshape(-1)[0]),
                                      int(result.as_numpy("total_steps").reshape(-1)[0]))
            raise PipelineError("model server ended the stream without a result")
        except (InferenceServerException, grpc.RpcError) as error:
            raise _grpc_failure(error, self.timeout_s) from None
        except StopAsyncIteration:
            raise PipelineError("model server ended the stream without a result") from None
        finally:
            done.set()
            call.cancel()
