"""Image-to-video through a real tritonserver: `wan_pipeline` of the tiny i2v repository (gRPC streaming)
matches diffusers' WanImageToVideoPipeline for the same image, seed and settings; an i2v model refuses a
request without an image, a t2v model one with an image, and both keep serving."""

from __future__ import annotations

import io
import json
import queue
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch


tritonclient_grpc = pytest.importorskip("tritonclient.grpc")

MODEL = "wan_pipeline"
INPUT_TYPES = {  # docs/DESIGN.md; `image` is UINT8 [H, W, 3], every other input shape [1]
    "prompt": ("BYTES", np.object_), "negative_prompt": ("BYTES", np.object_), "seed": ("INT64", np.int64),
    "num_inference_steps": ("INT32", np.int32), "num_frames": ("INT32", np.int32), "height": ("INT32", np.int32),
    "width": ("INT32", np.int32), "fps": ("INT32", np.int32), "guidance_scale": ("FP32", np.float32),
    "shift": ("FP32", np.float32), "return_frames": ("BOOL", np.bool_), "image": ("UINT8", np.uint8),
}
TIMEOUT_S = 120


def sample_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth colour gradient with noise: resizing and CLIP's crop both change it visibly."""
    rows, cols = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    base = np.stack([rows, cols, 1 - rows * cols], axis=-1) * 200
    noise = np.random.default_rng(seed).integers(0, 55, (height, width, 3))
    return (base + noise).astype(np.uint8)


def make_inputs(values: dict) -> list:
    inputs = []
    for name, value in values.items():
        datatype, dtype = INPUT_TYPES[name]
        if name == "image":
            array = np.ascontiguousarray(value, dtype=dtype)
        else:
            array = np.array([value.encode("utf-8") if isinstance(value, str) else value], dtype=dtype)
        tensor = tritonclient_grpc.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


@dataclass
class Outcome:
    progress: list = field(default_factory=list)
    final: object = None
    error: str | None = None

    def output(self, name: str):
        return self.final.as_numpy(name)

    @property
    def metadata(self) -> dict:
        return json.loads(self.output("metadata")[0].decode("utf-8"))


class PipelineStream:
    """One gRPC stream; `generate` sends one request and collects its responses until the final one."""

    def __init__(self, url: str):
        self.client = tritonclient_grpc.InferenceServerClient(url)
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))

    def generate(self, **values) -> Outcome:
        self.client.async_stream_infer(MODEL, make_inputs(values), enable_empty_final_response=True)
        outcome = Outcome()
        while True:
            result, error = self.responses.get(timeout=TIMEOUT_S)
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

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


@pytest.fixture
def i2v_stream(triton_server_i2v):
    stream = PipelineStream(triton_server_i2v.grpc_url)
    yield stream
    stream.close()


def reference_frames(pipeline, image: np.ndarray, prompt: str, negative_prompt: str, seed: int, height: int,
                     width: int, num_frames: int, num_inference_steps: int, guidance_scale: float,
                     shift: float) -> np.ndarray:
    """WanImageToVideoPipeline's frames * 255 for the PIL image of the same pixels, scheduler with the shift."""
    from PIL import Image

    scheduler = pipeline.scheduler
    pipeline.scheduler = type(scheduler).from_config(scheduler.config, flow_shift=shift)
    try:
        frames = pipeline(image=Image.fromarray(image), prompt=prompt, negative_prompt=negative_prompt, height=height,
                          width=width, num_frames=num_frames, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed),
                          output_type="np").frames[0]
    finally:
        pipeline.scheduler = scheduler
    return frames * 255


def decode_mp4(data: bytes) -> np.ndarray:
    import av

    with av.open(io.BytesIO(data)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


# --------------------------------------------------------------------------------------------------------
# Parity with WanImageToVideoPipeline
# --------------------------------------------------------------------------------------------------------

PARITY_SETTINGS = [
    pytest.param((50, 70), dict(prompt="A red fox running through fresh snow", negative_prompt="blurred details",
                                seed=7, height=64, width=96, num_frames=9, num_inference_steps=3, guidance_scale=5.0,
                                shift=3.0, fps=16), id="cfg-64x96-9f-wide-image"),
    pytest.param((120, 90), dict(prompt="一只小猫在花园里追逐蝴蝶", negative_prompt="", seed=123, height=80,
                                 width=64, num_frames=6, num_inference_steps=2, guidance_scale=1.0, shift=5.0, fps=8),
                 id="no-cfg-80x64-6f-rounded-tall-image"),
    pytest.param((300, 200), dict(prompt="Waves crash against black volcanic rocks", negative_prompt="static",
                                  seed=2024, height=64, width=64, num_frames=33, num_inference_steps=2,
                                  guidance_scale=4.0, shift=3.0, fps=24), id="cfg-64x64-33f-large-image"),
]


@pytest.mark.parametrize("image_size, values", PARITY_SETTINGS)
def test_i2v_frames_match_wan_image_to_video_pipeline(i2v_stream, wan_i2v_pipeline, image_size, values):
    image = sample_image(*image_size)
    outcome = i2v_stream.generate(**values, image=image, return_frames=True)
    assert outcome.error is None, outcome.error

    steps = values["num_inference_steps"]
    assert outcome.progress == [(step, steps) for step in range(1, steps + 1)]
    frames = outcome.output("frames")
    num_frames = (values["num_frames"] - 1) // 4 * 4 + 1
    assert frames.dtype == np.uint8 and frames.shape == (num_frames, values["height"], values["width"], 3)
    expected = reference_frames(wan_i2v_pipeline, image, **{k: v for k, v in values.items() if k != "fps"})
    max_diff = np.abs(frames.astype(np.float64) - expected).max()
    assert max_diff <= 1.0, f"max uint8 difference {max_diff}"

    metadata = outcome.metadata
    assert metadata["model_kind"] == "i2v" and metadata["num_frames"] == num_frames
    assert (metadata["image_height"], metadata["image_width"]) == image_size
    assert {"image_encoder", "vae_encode", "text_encoder", "vae_decode", "mp4", "total"} <= set(metadata["timings_ms"])
    assert decode_mp4(outcome.output("video")[0]).shape == frames.shape


def test_the_image_conditions_the_video(i2v_stream):
    values = dict(prompt="waves", seed=5, height=64, width=64, num_frames=5, num_inference_steps=1,
                  guidance_scale=1.0, return_frames=True)
    first = i2v_stream.generate(**values, image=sample_image(64, 64, seed=1))
    second = i2v_stream.generate(**values, image=sample_image(64, 64, seed=2)[::-1])
    assert first.error is None and second.error is None, (first.error, second.error)
    assert np.abs(first.output("frames").astype(int) - second.output("frames")).max() > 8


# --------------------------------------------------------------------------------------------------------
# Which model takes an image
# --------------------------------------------------------------------------------------------------------


def test_i2v_config_publishes_the_kind_and_the_image_input(triton_server_i2v):
    client = tritonclient_grpc.InferenceServerClient(triton_server_i2v.grpc_url)
    config = client.get_model_config(MODEL, as_json=True)["config"]
    client.close()
    parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
    image_input = next(i for i in config["input"] if i["name"] == "image")
    assert parameters["model_kind"] == "i2v" and int(parameters["max_image_pixels"]) >= 1024 * 1024
    assert image_input["data_type"] == "TYPE_UINT8" and image_input["dims"] == ["-1", "-1", "3"]
    assert image_input["optional"] is True


def test_i2v_model_refuses_a_request_without_an_image_and_keeps_serving(i2v_stream):
    outcome = i2v_stream.generate(prompt="no image", seed=1, height=64, width=64, num_frames=1, num_inference_steps=1)
    assert outcome.error is not None and "this model is image-to-video (i2v) and needs an image" in outcome.error
    assert "\n" not in outcome.error and outcome.progress == []

    four_channels = i2v_stream.generate(prompt="rgba", image=np.zeros((8, 8, 4), dtype=np.uint8))
    assert four_channels.error is not None and "image" in four_channels.error  # Triton checks dims [-1, -1, 3]

    served = i2v_stream.generate(prompt="with image", seed=1, height=64, width=64, num_frames=1,
                                 num_inference_steps=1, guidance_scale=1.0, image=sample_image(16, 16))
    assert served.error is None, served.error
    assert served.progress == [(1, 1)]


def test_t2v_model_refuses_an_image_and_keeps_serving(triton_server):
    stream = PipelineStream(triton_server.grpc_url)
    try:
        outcome = stream.generate(prompt="a fox", seed=1, height=64, width=64, num_frames=1, num_inference_steps=1,
                                  image=sample_image(32, 32))
        assert outcome.error is not None
        assert "this model is text-to-video (t2v): the image input is not supported" in outcome.error
        assert "\n" not in outcome.error and outcome.progress == []

        served = stream.generate(prompt="a fox", seed=1, height=64, width=64, num_frames=1, num_inference_steps=1,
                                 guidance_scale=1.0)
        assert served.error is None, served.error
        assert served.metadata["model_kind"] == "t2v"
    finally:
        stream.close()
