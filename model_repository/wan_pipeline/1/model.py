"""`wan_pipeline`: the decoupled Python BLS model that serves one text-to-video (or, in an image-to-video
repository, image-to-video) generation per request.

Thin Triton glue around `generation.py` (the numbered stages) and `video.py` (mp4): read the request,
call the stages with BLS-backed components (`text_encoder`, `dit`, `vae_decode_first`,
`vae_decode_step`; i2v also `image_encoder`, `vae_encode_first`, `vae_encode_step`), stream one progress
response per denoising step, then one final response with the mp4, a JSON of what was used and, on request,
the raw frames. The `model_kind` parameter says which: a t2v model refuses the `image` input, an i2v model
requires it. Contracts: docs/DESIGN.md.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sibling modules, when Triton loads us

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from generation import (  # noqa: E402
    Components,
    Defaults,
    INPUT_TYPES,
    GenerationCancelled,
    InvalidRequest,
    Limits,
    MAX_IMAGE_PIXELS,
    PipelineSpec,
    generate,
    parse_inputs,
    prepare_timesteps,
    resolve_and_validate,
    validate_image,
)
from video import encode_mp4  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class ComponentError(RuntimeError):
    """A component model answered a BLS call with an error."""


def _error_code(name: str):
    return getattr(pb_utils.TritonError, name, getattr(pb_utils.TritonError, "INTERNAL", None))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _log(level: str, message: str) -> None:
    logger = getattr(pb_utils, "Logger", None)
    if logger is not None:
        getattr(logger, f"log_{level}")(message)
    else:
        print(f"[wan_pipeline] {level}: {message}", file=sys.stderr, flush=True)


class BlsComponents:
    """The generation callables, each one a BLS request to a component model of this repository."""

    def __init__(self, cache_count: int, encode_cache_count: int = 0):
        self.cache_count = cache_count
        self.cache_out = [f"cache_out_{index:02d}" for index in range(cache_count)]
        self.cache_in = [f"cache_in_{index:02d}" for index in range(cache_count)]
        self.encode_cache_out = [f"cache_out_{index:02d}" for index in range(encode_cache_count)]
        self.encode_cache_in = [f"cache_in_{index:02d}" for index in range(encode_cache_count)]

    @staticmethod
    def _infer(model: str, inputs: dict, outputs: list[str]) -> list[np.ndarray]:
        request = pb_utils.InferenceRequest(
            model_name=model, requested_output_names=outputs,
            inputs=[pb_utils.Tensor(name, np.ascontiguousarray(array)) for name, array in inputs.items()])
        response = request.exec()
        if response.has_error():
            raise ComponentError(f"{model}: {_one_line(response.error().message())}")
        arrays = []
        for name in outputs:
            tensor = pb_utils.get_output_tensor_by_name(response, name)
            if tensor is None:
                raise ComponentError(f"{model}: response has no output {name!r}")
            arrays.append(tensor.as_numpy())
        return arrays

    @staticmethod
    def _torch(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(array, copy=True))

    def text_encoder(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        (states,) = self._infer("text_encoder", {"input_ids": input_ids.numpy().astype(np.int64),
                                                 "attention_mask": attention_mask.numpy().astype(np.int64)},
                                ["last_hidden_state"])
        return self._torch(states)

    def dit(self, latents: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor,
            image_states: torch.Tensor | None = None) -> torch.Tensor:
        inputs = {"hidden_states": latents.numpy().astype(np.float32),
                  "timestep": timestep.numpy().astype(np.float32),
                  "encoder_hidden_states": states.numpy().astype(np.float32)}
        if image_states is not None:
            inputs["encoder_hidden_states_image"] = image_states.numpy().astype(np.float32)
        (noise,) = self._infer("dit", inputs, ["noise_pred"])
        return self._torch(noise)

    def image_encoder(self, pixel_values: torch.Tensor) -> torch.Tensor:
        (embeds,) = self._infer("image_encoder", {"pixel_values": pixel_values.numpy().astype(np.float32)},
                                ["image_embeds"])
        return self._torch(embeds)

    def vae_encode_first(self, video: torch.Tensor):
        latents, *caches = self._infer("vae_encode_first", {"video": video.numpy().astype(np.float32)},
                                       ["latents", *self.encode_cache_out])
        return self._torch(latents), caches

    def vae_encode_step(self, video: torch.Tensor, caches: list[np.ndarray]):
        inputs = {"video": video.numpy().astype(np.float32), **dict(zip(self.encode_cache_in, caches))}
        latents, *caches = self._infer("vae_encode_step", inputs, ["latents", *self.encode_cache_out])
        return self._torch(latents), caches

    def vae_decode_first(self, latents: torch.Tensor):
        frames, *caches = self._infer("vae_decode_first", {"latents": latents.numpy().astype(np.float32)},
                                      ["frames", *self.cache_out])
        return self._torch(frames), caches

    def vae_decode_step(self, latents: torch.Tensor, caches: list[np.ndarray]):
        inputs = {"latents": latents.numpy().astype(np.float32), **dict(zip(self.cache_in, caches))}
        frames, *caches = self._infer("vae_decode_step", inputs, ["frames", *self.cache_out])
        return self._torch(frames), caches


def _tensor(name: str, value, dtype) -> "pb_utils.Tensor":
    return pb_utils.Tensor(name, np.asarray(value, dtype=dtype))


class TritonPythonModel:
    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])
        self.settings = {key: value.get("string_value", "")
                         for key, value in self.model_config.get("parameters", {}).items()}
        self.defaults = Defaults(
            height=self._int("default_height"), width=self._int("default_width"),
            num_frames=self._int("default_num_frames"),
            num_inference_steps=self._int("default_num_inference_steps"),
            guidance_scale=self._float("default_guidance_scale"), shift=self._float("default_shift"),
            fps=self._int("default_fps"))
        self.limits = Limits(
            min_height=self._int("min_height"), max_height=self._int("max_height"),
            min_width=self._int("min_width"), max_width=self._int("max_width"),
            max_num_frames=self._int("max_num_frames"),
            max_num_inference_steps=self._int("max_num_inference_steps", 1000))

        assets = os.path.join(args["model_repository"], args["model_version"], "assets")
        if not os.path.isdir(assets):
            assets = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
        with open(os.path.join(assets, "pipeline.json"), encoding="utf-8") as file:
            self.spec = PipelineSpec.from_json(json.load(file))
        with open(os.path.join(assets, "scheduler", "scheduler_config.json"), encoding="utf-8") as file:
            scheduler_config = json.load(file)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.path.join(assets, "tokenizer"))
        prepare_timesteps(scheduler_config, 1, self.defaults.shift)  # fails early on a bad config; warms imports
        from diffusers.utils.torch_utils import randn_tensor  # noqa: F401  (warm import for the first request)

        self.model_kind = self.settings.get("model_kind") or "t2v"
        self.max_image_pixels = self._int("max_image_pixels", MAX_IMAGE_PIXELS)
        bls = BlsComponents(self.spec.vae_cache_count or 0, self.spec.vae_encode_cache_count or 0)
        self.components = Components(tokenizer=tokenizer, text_encoder=bls.text_encoder, dit=bls.dit,
                                     vae_decode_first=bls.vae_decode_first, vae_decode_step=bls.vae_decode_step,
                                     scheduler_config=scheduler_config)
        if self.model_kind == "i2v":
            import transformers
            from diffusers.video_processor import VideoProcessor  # noqa: F401  (warm import for the first request)

            processor_class = getattr(transformers, self.spec.image_processor_class or "CLIPImageProcessor", None) \
                or transformers.AutoImageProcessor
            self.components.image_processor = processor_class.from_pretrained(os.path.join(assets, "image_processor"))
            self.components.image_encoder = bls.image_encoder
            self.components.vae_encode_first = bls.vae_encode_first
            self.components.vae_encode_step = bls.vae_encode_step
        _log("info", f"wan_pipeline ready ({self.model_kind}): defaults {self.defaults}, limits {self.limits}")

    def _int(self, key: str, fallback: int | None = None) -> int:
        return int(self._setting(key, fallback))

    def _float(self, key: str, fallback: float | None = None) -> float:
        return float(self._setting(key, fallback))

    def _setting(self, key: str, fallback):
        value = self.settings.get(key, "")
        if value == "":
            if fallback is None:
                raise ValueError(f"wan_pipeline config.pbtxt lacks the parameter {key!r} (see docs/DESIGN.md)")
            return fallback
        return value

    def execute(self, requests):
        for request in requests:
            self._serve(request)
        return None  # decoupled: every response went through the request's response sender

    def _serve(self, request) -> None:
        sender = request.get_response_sender()
        started = time.perf_counter()
        try:
            arrays = {}
            for name in INPUT_TYPES:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    arrays[name] = tensor.as_numpy()
            image_tensor = pb_utils.get_input_tensor_by_name(request, "image")
            image = validate_image(None if image_tensor is None else image_tensor.as_numpy(), self.model_kind,
                                   self.max_image_pixels)
            params = resolve_and_validate(parse_inputs(arrays), self.defaults, self.limits,
                                          self.spec.size_multiple, self.spec.vae_scale_factor_temporal)

            def progress(step: int, total: int) -> None:
                sender.send(pb_utils.InferenceResponse(output_tensors=[
                    _tensor("step", [step], np.int32), _tensor("total_steps", [total], np.int32)]))

            result = generate(params, self.spec, self.components, on_step=progress,
                              is_cancelled=request.is_cancelled, image=image)
            mp4_started = time.perf_counter()
            video = encode_mp4(result.frames, params.fps)
            timings = dict(result.timings_ms)
            timings["mp4"] = round((time.perf_counter() - mp4_started) * 1000, 3)
            timings["total"] = round((time.perf_counter() - started) * 1000, 3)
            sender.send(self._final_response(params, result.frames, video, timings, image), flags=FINAL)
        except InvalidRequest as error:
            self._send_error(sender, _one_line(error), "INVALID_ARG")
        except GenerationCancelled as error:
            _log("info", f"wan_pipeline: {error}")
            self._send_error(sender, "cancelled", "CANCELLED")
        except ComponentError as error:
            _log("error", f"wan_pipeline: {error}")
            self._send_error(sender, _one_line(error), "INTERNAL")
        except Exception as error:  # never let one request take the stub down
            _log("error", f"wan_pipeline: {traceback.format_exc()}")
            self._send_error(sender, _one_line(f"internal error: {type(error).__name__}: {error}"), "INTERNAL")

    def _final_response(self, params, frames: np.ndarray, video: bytes, timings: dict, image=None):
        metadata = {
            **params.as_dict(),
            "model_name": self.settings.get("model_name", "wan_pipeline"),
            "model_kind": self.model_kind,
            "backend": self.settings.get("backend", ""),
            "total_steps": params.num_inference_steps,
            "timings_ms": timings,
        }
        if image is not None:  # the conditioning image's own size (it was resized to height x width)
            metadata["image_height"], metadata["image_width"] = int(image.shape[0]), int(image.shape[1])
        outputs = [
            _tensor("step", [params.num_inference_steps], np.int32),
            _tensor("total_steps", [params.num_inference_steps], np.int32),
            pb_utils.Tensor("video", np.array([video], dtype=np.object_)),
            pb_utils.Tensor("metadata", np.array([json.dumps(metadata, ensure_ascii=False).encode("utf-8")],
                                                 dtype=np.object_)),
        ]
        if params.return_frames:
            outputs.append(pb_utils.Tensor("frames", np.ascontiguousarray(frames, dtype=np.uint8)))
        return pb_utils.InferenceResponse(output_tensors=outputs)

    @staticmethod
    def _send_error(sender, message: str, code: str) -> None:
        """Exactly one error response, flagged FINAL; a failed send (client gone) is only logged."""
        try:
            error = pb_utils.TritonError(message, _error_code(code)) if _error_code(code) is not None \
                else pb_utils.TritonError(message)
            sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
        except Exception as send_error:  # noqa: BLE001
            _log("warn", f"wan_pipeline: could not send error response ({message}): {send_error}")

    def finalize(self):
        self.components = None
