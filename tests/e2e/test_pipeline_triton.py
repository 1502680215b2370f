"""`wan_pipeline` served by a real tritonserver over gRPC streaming: frames match diffusers' WanPipeline,
one progress response per step, a playable mp4, cancellation, and one-line errors for bad values."""

from __future__ import annotations

import io
import json
import queue
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "wan_pipeline"
INPUT_TYPES = {  # docs/DESIGN.md
    "prompt": ("BYTES", np.object_), "negative_prompt": ("BYTES", np.object_), "seed": ("INT64", np.int64),
    "num_inference_steps": ("INT32", np.int32), "num_frames": ("INT32", np.int32), "height": ("INT32", np.int32),
    "width": ("INT32", np.int32), "fps": ("INT32", np.int32), "guidance_scale": ("FP32", np.float32),
    "shift": ("FP32", np.float32), "return_frames": ("BOOL", np.bool_),
}
TIMEOUT_S = 120


def make_inputs(values: dict) -> list:
    inputs = []
    for name, value in values.items():
        datatype, dtype = INPUT_TYPES[name]
        if isinstance(value, str):
            value = value.encode("utf-8")
        tensor = tritonclient_grpc.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(np.array([value], dtype=dtype))
        inputs.append(tensor)
    return inputs


@dataclass
class Outcome:
    progress: list = field(default_factory=list)  # (step, total_steps) of each progress response
    final: object = None  # the final InferResult
    error: str | None = None

    def output(self, name: str):
        return self.final.as_numpy(name)

    @property
    def metadata(self) -> dict:
        return json.loads(self.output("metadata")[0].decode("utf-8"))


class PipelineStream:
    """One gRPC bidirectional stream; `generate` sends a request and collects its responses until the last."""

    def __init__(self, url: str):
        self.client = tritonclient_grpc.InferenceServerClient(url)
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))

    def send(self, values: dict) -> None:
        self.client.async_stream_infer(MODEL, make_inputs(values), enable_empty_final_response=True)

    def receive(self) -> tuple[object, InferenceServerException | None]:
        return self.responses.get(timeout=TIMEOUT_S)

    def generate(self, **values) -> Outcome:
        self.send(values)
        outcome = Outcome()
        while True:
            result, error = self.receive()
            if error is not None:
                outcome.error = str(error)
                return outcome
            response = result.get_response()
            names = {output.name for output in response.outputs}
            if "video" in names:
                outcome.final = result
            elif "step" in names:
                outcome.progress.append((int(result.as_numpy("step")[0]), int(result.as_numpy("total_steps")[0])))
            if response.parameters["triton_final_response"].bool_param:
                return outcome

    def close(self, cancel_requests: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel_requests)
        self.client.close()

    def __enter__(self) -> "PipelineStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@pytest.fixture
def stream(triton_server):
    with PipelineStream(triton_server.grpc_url) as pipeline_stream:
        yield pipeline_stream


@pytest.fixture(scope="module")
def settings(triton_server) -> dict:
    """The model's defaults and limits, as its config.pbtxt publishes them."""
    client = tritonclient_grpc.InferenceServerClient(triton_server.grpc_url)
    config = client.get_model_config(MODEL, as_json=True)["config"]
    client.close()
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


@pytest.fixture(scope="module")
def wan_pipeline(tiny_checkpoint):
    from diffusers import WanPipeline

    pipeline = WanPipeline.from_pretrained(tiny_checkpoint)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def reference_frames(pipeline, prompt: str, negative_prompt: str, seed: int, height: int, width: int,
                     num_frames: int, num_inference_steps: int, guidance_scale: float, shift: float) -> np.ndarray:
    """diffusers' frames * 255, its scheduler rebuilt with the same shift."""
    scheduler = pipeline.scheduler
    pipeline.scheduler = type(scheduler).from_config(scheduler.config, flow_shift=shift)
    try:
        frames = pipeline(prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
                          num_frames=num_frames, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed),
                          output_type="np").frames[0]
    finally:
        pipeline.scheduler = scheduler
    return frames * 255


def decode_mp4(data: bytes) -> tuple[np.ndarray, dict]:
    import av

    with av.open(io.BytesIO(data)) as container:
        video_stream = container.streams.video[0]
        info = {"codec": video_stream.codec_context.name, "pix_fmt": video_stream.codec_context.pix_fmt,
                "fps": video_stream.average_rate, "width": video_stream.width, "height": video_stream.height}
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    return frames, info


def dit_executions(triton_server) -> int:
    client = tritonclient_grpc.InferenceServerClient(triton_server.grpc_url)
    stats = client.get_inference_statistics("dit", as_json=True)["model_stats"][0]
    client.close()
    return int(stats["inference_stats"].get("success", {}).get("count", 0))


# --------------------------------------------------------------------------------------------------------
# Parity, progress, video
# --------------------------------------------------------------------------------------------------------

PARITY_SETTINGS = [
    pytest.param(dict(prompt="A red fox running through fresh snow", negative_prompt="blurred details, ugly",
                      seed=7, height=64, width=96, num_frames=9, num_inference_steps=3, guidance_scale=5.0,
                      shift=3.0, fps=16), id="cfg-64x96-9f"),
    pytest.param(dict(prompt="一只小猫在花园里追逐蝴蝶，阳光明媚。", negative_prompt="", seed=123, height=80,
                      width=64, num_frames=6, num_inference_steps=2, guidance_scale=1.0, shift=5.0, fps=8),
                 id="no-cfg-80x64-6f-rounded"),
    pytest.param(dict(prompt="Waves crash against black volcanic rocks", negative_prompt="static", seed=2024,
                      height=64, width=64, num_frames=33, num_inference_steps=2, guidance_scale=4.0, shift=3.0,
                      fps=24), id="cfg-64x64-33f"),
]


@pytest.mark.parametrize("values", PARITY_SETTINGS)
def test_frames_match_wan_pipeline_with_a_progress_response_per_step(stream, wan_pipeline, values):
    outcome = stream.generate(**values, return_frames=True)
    assert outcome.error is None, outcome.error

    steps = values["num_inference_steps"]
    assert outcome.progress == [(step, steps) for step in range(1, steps + 1)]
    assert int(outcome.output("step")[0]) == int(outcome.output("total_steps")[0]) == steps

    frames = outcome.output("frames")
    num_frames = (values["num_frames"] - 1) // 4 * 4 + 1
    assert frames.dtype == np.uint8
    assert frames.shape == (num_frames, values["height"], values["width"], 3)
    expected = reference_frames(wan_pipeline, **{k: v for k, v in values.items() if k != "fps"})
    max_diff = np.abs(frames.astype(np.float64) - expected).max()
    assert max_diff <= 1.0, f"max uint8 difference {max_diff}"

    metadata = outcome.metadata
    assert metadata["num_frames"] == num_frames and metadata["seed"] == values["seed"]
    assert metadata["prompt"] == values["prompt"] and metadata["guidance_scale"] == values["guidance_scale"]
    assert len(metadata["timings_ms"]["dit_steps"]) == steps
    assert {"text_encoder", "vae_decode", "mp4", "total"} <= set(metadata["timings_ms"])

    decoded, info = decode_mp4(outcome.output("video")[0])
    assert decoded.shape == frames.shape
    assert info == {"codec": "h264", "pix_fmt": "yuv420p", "fps": values["fps"], "width": values["width"],
                    "height": values["height"]}


def test_missing_values_take_the_model_defaults_and_the_mp4_plays(stream, settings):
    outcome = stream.generate(prompt="A cozy kitchen with steam rising from a cup of tea")
    assert outcome.error is None, outcome.error

    metadata = outcome.metadata
    assert metadata["height"] == int(settings["default_height"])
    assert metadata["width"] == int(settings["default_width"])
    assert metadata["num_inference_steps"] == int(settings["default_num_inference_steps"])
    assert metadata["guidance_scale"] == float(settings["default_guidance_scale"])
    assert metadata["fps"] == int(settings["default_fps"])
    assert isinstance(metadata["seed"], int)
    assert len(outcome.progress) == metadata["num_inference_steps"]
    assert outcome.output("frames") is None  # frames only on request

    decoded, info = decode_mp4(outcome.output("video")[0])
    assert decoded.shape == (metadata["num_frames"], metadata["height"], metadata["width"], 3)
    assert (info["pix_fmt"], info["fps"]) == ("yuv420p", metadata["fps"])


# --------------------------------------------------------------------------------------------------------
# Cancellation
# --------------------------------------------------------------------------------------------------------


def test_cancelling_a_running_request_stops_it_and_the_next_request_is_served(triton_server, settings):
    steps = int(settings.get("max_num_inference_steps", 1000))
    before = dit_executions(triton_server)
    log_offset = triton_server.log_path.stat().st_size  # the log file is appended to across sessions
    cancelled = PipelineStream(triton_server.grpc_url)
    cancelled.send(dict(prompt="An astronaut rides a horse", seed=1, height=64, width=64, num_frames=1,
                        num_inference_steps=steps, guidance_scale=5.0))
    seen = []
    while len(seen) < 2:
        result, error = cancelled.receive()
        assert error is None, error
        seen.append(int(result.as_numpy("step")[0]))
    cancelled.close(cancel_requests=True)
    assert seen == [1, 2]

    with PipelineStream(triton_server.grpc_url) as stream:
        started = time.monotonic()
        outcome = stream.generate(prompt="next", seed=2, height=64, width=64, num_frames=1, num_inference_steps=2,
                                  guidance_scale=1.0)
        elapsed = time.monotonic() - started
    assert outcome.error is None, outcome.error
    assert len(outcome.progress) == 2

    cancelled_steps = dit_executions(triton_server) - before - 2
    assert 2 <= cancelled_steps < steps // 4, f"the cancelled request ran {cancelled_steps} of {steps} steps"
    assert elapsed < 30
    with open(triton_server.log_path, "rb") as log:
        log.seek(log_offset)
        assert b"wan_pipeline: cancelled before step" in log.read()


# --------------------------------------------------------------------------------------------------------
# Invalid values
# --------------------------------------------------------------------------------------------------------


def test_bad_values_return_one_line_errors_and_the_server_keeps_serving(stream, settings):
    max_frames = int(settings["max_num_frames"])
    max_steps = int(settings.get("max_num_inference_steps", 1000))
    cases = [
        ({"height": 100}, "height must be a multiple of 16, got 100"),
        ({"width": 8}, "width must be a multiple of 16, got 8"),
        ({"num_inference_steps": 0}, f"num_inference_steps must be between 1 and {max_steps}, got 0"),
        ({"num_frames": max_frames + 4}, f"num_frames must be at most {max_frames}, got {max_frames + 4}"),
        ({"num_frames": 0}, "num_frames must be at least 1, got 0"),
        ({"height": int(settings["max_height"]) + 16}, "height must be between"),
        ({"guidance_scale": 0.5}, "guidance_scale must be >= 1.0"),
        ({"seed": -5}, "seed must be between 0 and"),
        ({"prompt": b"\xff\xfe broken"}, "prompt is not valid UTF-8"),
    ]
    for values, message in cases:
        outcome = stream.generate(**{"prompt": "x", **values})
        assert outcome.error is not None and message in outcome.error, (values, outcome.error)
        assert "\n" not in outcome.error and outcome.progress == []

    missing_prompt = stream.generate(height=64)
    assert missing_prompt.error is not None and "prompt" in missing_prompt.error

    outcome = stream.generate(prompt="still serving", seed=3, height=64, width=64, num_frames=1,
                              num_inference_steps=1, guidance_scale=1.0)
    assert outcome.error is None, outcome.error
    assert outcome.progress == [(1, 1)]
