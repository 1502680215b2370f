"""One Wan text-to-video or image-to-video generation as plain, numbered stages - the logic of the
`wan_pipeline` BLS model.

Nothing here imports Triton. The components are injected as plain callables on torch tensors, so the same
stages run with BLS-backed components inside Triton (`model.py`) and with PyTorch modules in unit tests:

    text_encoder(input_ids, attention_mask) -> last_hidden_state            [B, L] x2 -> [B, L, D]
    dit(latents, timestep, encoder_hidden_states) -> noise_pred            [B, C, F, h, w], [B], [B, L, D]
    vae_decode_first(latents) -> (frames, caches)                          [1, C, 1, h, w] -> [1, 3, 1, H, W]
    vae_decode_step(latents, caches) -> (frames, caches)                   [1, C, 1, h, w] -> [1, 3, 4, H, W]
  image-to-video (i2v) also:
    dit(latents, timestep, encoder_hidden_states, encoder_hidden_states_image)   latents with 2C + 4 channels
    image_encoder(pixel_values) -> image_embeds                            [1, 3, S, S] -> [1, T, D']
    vae_encode_first(video) -> (latents, caches)                           [1, 3, 1, H, W] -> [1, C, 1, h, w]
    vae_encode_step(video, caches) -> (latents, caches)                    [1, 3, 4, H, W] -> [1, C, 1, h, w]

`caches` are opaque to this module: whatever the first VAE call returns is handed to the next step call.

The stages follow diffusers' `WanPipeline.__call__` / `WanImageToVideoPipeline.__call__` (diffusers 0.42) so
that, with the same weights (and the same image), the frames match the pipeline's `output_type="np"` frames
within one uint8 level:

    0. resolve_and_validate   defaults, limits, num_frames rounded to 4k+1; validate_image: i2v needs one
    1. tokenize               prompt cleaning, pad/truncate to the text encoder's max length
    2. encode_prompts         text encoder; states past each prompt's length zeroed
    3. encode_image           i2v: CLIP image processor + image encoder -> penultimate hidden states
    4. prepare_timesteps      the checkpoint's scheduler with the requested shift
    5. prepare_latents        randn from a CPU generator seeded with `seed`
    6. prepare_condition      i2v: image resized to the video size, + zero frames, VAE-encoded (mean),
                              normalised; first-frame mask in front
    7. denoise                CFG with cond and uncond batched in one DiT call
    8. decode_latents         de-normalise, VAE decode frame by frame with causal caches
    9. postprocess_frames     [-1, 1] floats -> uint8 [F, H, W, 3]
"""

from __future__ import annotations

import html
import math
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

try:  # diffusers cleans prompts with the `regex` module (and ftfy when installed); do the same.
    import regex as re
except ImportError:  # pragma: no cover - regex is a diffusers dependency
    import re

try:
    import ftfy
except ImportError:
    ftfy = None

MAX_SEED = 2**63 - 1
MAX_FPS = 120
MAX_IMAGE_PIXELS = 4096 * 4096  # the conditioning image's own size (it is resized to the video's)


class InvalidRequest(ValueError):
    """A request value the model cannot serve; the message is one line that names the value and the reason."""


class GenerationCancelled(RuntimeError):
    """The client cancelled the request; raised before the next step starts."""


# ---------------------------------------------------------------------------------------------------------
# What the model knows about itself: defaults, limits, and the checkpoint's geometry (assets/pipeline.json)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Defaults:
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    shift: float
    fps: int


@dataclass(frozen=True)
class Limits:
    min_height: int
    max_height: int
    min_width: int
    max_width: int
    max_num_frames: int
    max_num_inference_steps: int = 1000


@dataclass(frozen=True)
class PipelineSpec:
    """The checkpoint facts generation needs (`assets/pipeline.json`, written by export/build_engines.py)."""

    text_max_length: int
    vae_scale_factor_spatial: int
    vae_scale_factor_temporal: int
    latent_channels: int
    latents_mean: tuple[float, ...]
    latents_std: tuple[float, ...]
    patch_size: tuple[int, int, int] = (1, 2, 2)
    vae_cache_count: int | None = None
    vae_encode_cache_count: int | None = None  # i2v
    image_processor_class: str | None = None  # i2v: the transformers class of assets/image_processor

    @classmethod
    def from_json(cls, data: dict) -> "PipelineSpec":
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        known["latents_mean"] = tuple(float(v) for v in known["latents_mean"])
        known["latents_std"] = tuple(float(v) for v in known["latents_std"])
        if "patch_size" in known:
            known["patch_size"] = tuple(int(v) for v in known["patch_size"])
        return cls(**known)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: VAE downsampling times the DiT's spatial patch."""
        return self.vae_scale_factor_spatial * max(self.patch_size[1], self.patch_size[2])


@dataclass(frozen=True)
class GenerationParams:
    """Every value one generation uses, after defaults and rounding."""

    prompt: str
    negative_prompt: str
    seed: int
    num_inference_steps: int
    num_frames: int
    height: int
    width: int
    guidance_scale: float
    shift: float
    fps: int
    return_frames: bool = False
    requested_num_frames: int | None = None  # what the client asked for, when rounding changed it

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.guidance_scale > 1.0  # as WanPipeline: guidance 1.0 runs the conditional branch only

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Components:
    tokenizer: Any
    text_encoder: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    dit: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    vae_decode_first: Callable[[torch.Tensor], tuple[torch.Tensor, Any]]
    vae_decode_step: Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]]
    scheduler_config: dict
    # image-to-video only
    image_processor: Any = None  # CLIPImageProcessor: PIL image -> pixel_values, as the pipeline's
    image_encoder: Callable[[torch.Tensor], torch.Tensor] | None = None
    vae_encode_first: Callable[[torch.Tensor], tuple[torch.Tensor, Any]] | None = None
    vae_encode_step: Callable[[torch.Tensor, Any], tuple[torch.Tensor, Any]] | None = None


@dataclass
class GenerationResult:
    frames: Any  # numpy uint8 [F, H, W, 3]
    timings_ms: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# 0. Check inputs: one place, one-line messages that say which value was wrong and why
# ---------------------------------------------------------------------------------------------------------


# The wan_pipeline inputs (docs/DESIGN.md) and the Python type each one's single value becomes.
INPUT_TYPES = {
    "prompt": str, "negative_prompt": str, "seed": int, "num_inference_steps": int, "num_frames": int,
    "height": int, "width": int, "fps": int, "guidance_scale": float, "shift": float, "return_frames": bool,
}


def parse_inputs(arrays: dict) -> dict:
    """Input name -> numpy array (as a Triton request holds them; absent inputs left out) -> name -> one
    Python value: BYTES decoded as UTF-8, numbers as int/float. Every input holds exactly one value."""
    raw = {}
    for name, kind in INPUT_TYPES.items():
        array = arrays.get(name)
        if array is None:
            continue
        values = array.reshape(-1)
        if values.size != 1:
            raise InvalidRequest(f"{name} must hold exactly one value, got {values.size}")
        value = values[0]
        if kind is str:
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise InvalidRequest(f"{name} is not valid UTF-8 ({error.reason} at byte {error.start})") from None
            raw[name] = str(value)
        elif kind is float:  # FP32 5.1 is 5.099999904...; str() gives back the decimal the client sent
            raw[name] = float(str(value)) if isinstance(value, np.floating) else float(value)
        else:
            raw[name] = kind(value.item() if hasattr(value, "item") else value)
    return raw


IMAGE_NOT_SUPPORTED = "this model is text-to-video (t2v): the image input is not supported; send no image"
IMAGE_REQUIRED = "this model is image-to-video (i2v) and needs an image: send the image input (uint8 RGB [H, W, 3])"


def validate_image(image: np.ndarray | None, model_kind: str, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray | None:
    """The `image` input for a `model_kind` ("t2v", "i2v") model: refused by t2v, required by i2v, and an RGB
    uint8 [H, W, 3] array of at most `max_pixels` pixels."""
    if model_kind != "i2v":
        if image is not None:
            raise InvalidRequest(IMAGE_NOT_SUPPORTED)
        return None
    if image is None:
        raise InvalidRequest(IMAGE_REQUIRED)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InvalidRequest(f"image must be uint8 RGB [height, width, 3], got {image.dtype} {list(image.shape)}")
    height, width = int(image.shape[0]), int(image.shape[1])
    if height < 1 or width < 1:
        raise InvalidRequest(f"image is empty ({height}x{width} pixels)")
    if height * width > max_pixels:
        raise InvalidRequest(f"image is {width}x{height} pixels, more than the {max_pixels}-pixel limit")
    return image


def round_num_frames(num_frames: int, temporal_factor: int = 4) -> int:
    """As WanPipeline: the VAE decodes 4k+1 frames; another count n becomes n // 4 * 4 + 1 (4 -> 5, 7 -> 5)."""
    if num_frames % temporal_factor != 1:
        num_frames = num_frames // temporal_factor * temporal_factor + 1
    return max(num_frames, 1)


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or isinstance(value, float) and not value.is_integer():
        raise InvalidRequest(f"{name} must be an integer, got {value!r}")
    return int(value)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_range(name: str, value: int, low: int, high: int, why: str = "") -> None:
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low} and {high}{why}, got {value}")


def resolve_and_validate(raw: dict, defaults: Defaults, limits: Limits, size_multiple: int = 16,
                         temporal_factor: int = 4) -> GenerationParams:
    """`raw` maps input names to values; a missing or None value takes the default (seed: a random one)."""

    def pick(name: str, default: Any) -> Any:
        value = raw.get(name)
        return default if value is None else value

    prompt = raw.get("prompt")
    if not isinstance(prompt, str):
        raise InvalidRequest("prompt is required and must be a UTF-8 string")
    negative_prompt = pick("negative_prompt", "")
    if not isinstance(negative_prompt, str):
        raise InvalidRequest("negative_prompt must be a UTF-8 string")

    seed = _as_int("seed", pick("seed", secrets.randbelow(2**32)))
    _check_range("seed", seed, 0, MAX_SEED)

    steps = _as_int("num_inference_steps", pick("num_inference_steps", defaults.num_inference_steps))
    _check_range("num_inference_steps", steps, 1, limits.max_num_inference_steps)

    sizes = {}
    for name, low, high, default in (("height", limits.min_height, limits.max_height, defaults.height),
                                     ("width", limits.min_width, limits.max_width, defaults.width)):
        value = _as_int(name, pick(name, default))
        if value % size_multiple:
            raise InvalidRequest(f"{name} must be a multiple of {size_multiple}, got {value}")
        _check_range(name, value, low, high)
        sizes[name] = value

    requested_frames = _as_int("num_frames", pick("num_frames", defaults.num_frames))
    if requested_frames < 1:
        raise InvalidRequest(f"num_frames must be at least 1, got {requested_frames}")
    num_frames = round_num_frames(requested_frames, temporal_factor)
    if num_frames > limits.max_num_frames:
        rounded = f" (rounded to {num_frames} = {temporal_factor}k+1)" if num_frames != requested_frames else ""
        raise InvalidRequest(f"num_frames must be at most {limits.max_num_frames}, got {requested_frames}{rounded}")

    guidance_scale = _as_float("guidance_scale", pick("guidance_scale", defaults.guidance_scale))
    if guidance_scale < 1.0:
        raise InvalidRequest(f"guidance_scale must be >= 1.0 (1.0 disables classifier-free guidance), "
                             f"got {guidance_scale}")
    shift = _as_float("shift", pick("shift", defaults.shift))
    if shift <= 0:
        raise InvalidRequest(f"shift must be > 0, got {shift}")
    fps = _as_int("fps", pick("fps", defaults.fps))
    _check_range("fps", fps, 1, MAX_FPS)

    return GenerationParams(
        prompt=prompt, negative_prompt=negative_prompt, seed=seed, num_inference_steps=steps,
        num_frames=num_frames, height=sizes["height"], width=sizes["width"], guidance_scale=guidance_scale,
        shift=shift, fps=fps, return_frames=bool(raw.get("return_frames") or False),
        requested_num_frames=requested_frames if requested_frames != num_frames else None,
    )


# ---------------------------------------------------------------------------------------------------------
# 1. Tokenize
# ---------------------------------------------------------------------------------------------------------


def prompt_clean(text: str) -> str:
    """diffusers' Wan prompt cleaning: ftfy (when installed), HTML unescape twice, collapse whitespace."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def tokenize(tokenizer, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, both int64 [len(prompts), max_length]; longer prompts are truncated."""
    tokens = tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=max_length,
                       truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    return tokens.input_ids.to(torch.int64), tokens.attention_mask.to(torch.int64)


# ---------------------------------------------------------------------------------------------------------
# 2. Encode prompts
# ---------------------------------------------------------------------------------------------------------


def encode_prompts(text_encoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """FP32 states [B, L, D] with every position past each prompt's real length set to zero, as
    WanPipeline._get_t5_prompt_embeds does (the DiT attends to all L positions, padding included)."""
    states = text_encoder(input_ids, attention_mask).to(torch.float32)
    lengths = attention_mask.gt(0).sum(dim=1)
    keep = torch.arange(states.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    return states * keep.unsqueeze(-1).to(states.dtype)


# ---------------------------------------------------------------------------------------------------------
# 3. Encode image (i2v)
# ---------------------------------------------------------------------------------------------------------


def to_pil(image: np.ndarray):
    """uint8 RGB [H, W, 3] -> the PIL image the diffusers pipeline would be given."""
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))


def encode_image(image_processor, image_encoder, image) -> torch.Tensor:
    """WanImageToVideoPipeline.encode_image: the CLIP processor (resize, centre crop, normalise) on the PIL image,
    then the encoder's penultimate hidden states, FP32 [1, T, D']."""
    pixel_values = image_processor(images=image, return_tensors="pt").pixel_values
    return image_encoder(pixel_values.to(torch.float32)).to(torch.float32)


# ---------------------------------------------------------------------------------------------------------
# 4. Prepare timesteps
# ---------------------------------------------------------------------------------------------------------


def build_scheduler(scheduler_config: dict, shift: float):
    """A fresh scheduler of the checkpoint's class with the requested shift (schedulers hold state)."""
    import diffusers

    config = dict(scheduler_config)
    class_name = config.get("_class_name", "UniPCMultistepScheduler")
    scheduler_class = getattr(diffusers, class_name, None)
    if scheduler_class is None:
        raise ValueError(f"unknown scheduler class {class_name!r} in the scheduler config")
    shift_key = "flow_shift" if "flow_shift" in config or "shift" not in config else "shift"
    config[shift_key] = shift
    return scheduler_class.from_config(config)


def prepare_timesteps(scheduler_config: dict, num_inference_steps: int, shift: float):
    scheduler = build_scheduler(scheduler_config, shift)
    scheduler.set_timesteps(num_inference_steps, device="cpu")
    scheduler.set_begin_index(0)
    return scheduler


# ---------------------------------------------------------------------------------------------------------
# 5. Prepare latents
# ---------------------------------------------------------------------------------------------------------


def latent_shape(spec: PipelineSpec, num_frames: int, height: int, width: int) -> tuple[int, ...]:
    num_latent_frames = (num_frames - 1) // spec.vae_scale_factor_temporal + 1
    return (1, spec.latent_channels, num_latent_frames, height // spec.vae_scale_factor_spatial,
            width // spec.vae_scale_factor_spatial)


def prepare_latents(spec: PipelineSpec, seed: int, num_frames: int, height: int, width: int) -> torch.Tensor:
    """The same noise WanPipeline draws with `generator=torch.Generator().manual_seed(seed)`."""
    from diffusers.utils.torch_utils import randn_tensor

    generator = torch.Generator(device="cpu").manual_seed(seed)
    return randn_tensor(latent_shape(spec, num_frames, height, width), generator=generator,
                        device=torch.device("cpu"), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------
# 6. Prepare the image condition (i2v)
# ---------------------------------------------------------------------------------------------------------


def preprocess_image(image, height: int, width: int, vae_scale_factor_spatial: int = 8) -> torch.Tensor:
    """diffusers' VideoProcessor.preprocess(image, height, width), as the pipeline calls it: the PIL image
    resized to exactly height x width (Lanczos; no crop, the aspect ratio is not kept), FP32 [1, 3, H, W] in
    [-1, 1]."""
    from diffusers.video_processor import VideoProcessor

    processor = VideoProcessor(vae_scale_factor=vae_scale_factor_spatial)
    return processor.preprocess(image, height=height, width=width).to(torch.float32)


def encode_video(vae_encode_first, vae_encode_step, video: torch.Tensor, temporal_factor: int = 4,
                 is_cancelled: Callable[[], bool] | None = None) -> torch.Tensor:
    """AutoencoderKLWan.encode(video)'s mean for [1, 3, 1 + 4k, H, W]: frame 0 alone, then chunks of 4 frames,
    carrying the causal-conv caches -> latents [1, C, 1 + k, h, w]."""
    chunks = []
    caches = None
    for start in ([0] + list(range(1, video.shape[2], temporal_factor))):
        if start and is_cancelled is not None and is_cancelled():
            raise GenerationCancelled("cancelled while encoding the image")
        if start == 0:
            latents, caches = vae_encode_first(video[:, :, :1].contiguous())
        else:
            latents, caches = vae_encode_step(video[:, :, start:start + temporal_factor].contiguous(), caches)
        chunks.append(latents.to(torch.float32))
    return torch.cat(chunks, dim=2)


def first_frame_mask(num_frames: int, latent_height: int, latent_width: int, temporal_factor: int = 4) -> torch.Tensor:
    """WanImageToVideoPipeline's mask: 1 for the given first frame, 0 for the frames to generate, the first
    frame repeated 4x so frames fold into latent frames -> [1, 4, F', h, w]."""
    mask = torch.ones(1, 1, num_frames, latent_height, latent_width)
    mask[:, :, 1:] = 0
    first = torch.repeat_interleave(mask[:, :, 0:1], dim=2, repeats=temporal_factor)
    mask = torch.concat([first, mask[:, :, 1:]], dim=2)
    return mask.view(1, -1, temporal_factor, latent_height, latent_width).transpose(1, 2)


def prepare_condition(spec: PipelineSpec, vae_encode_first, vae_encode_step, image: torch.Tensor,
                      num_frames: int, is_cancelled: Callable[[], bool] | None = None) -> torch.Tensor:
    """WanImageToVideoPipeline.prepare_latents' condition: the preprocessed image [1, 3, H, W] followed by
    num_frames - 1 zero frames, VAE-encoded (mean), normalised ((x - mean) * (1/std)), with the first-frame
    mask in front -> [1, 4 + C, F', h, w]."""
    _, channels, height, width = image.shape
    video = torch.cat([image.unsqueeze(2), image.new_zeros(1, channels, num_frames - 1, height, width)], dim=2)
    latents = encode_video(vae_encode_first, vae_encode_step, video, spec.vae_scale_factor_temporal, is_cancelled)
    latent_channels = latents.shape[1]
    mean = torch.tensor(spec.latents_mean, dtype=latents.dtype).view(1, latent_channels, 1, 1, 1)
    inverse_std = 1.0 / torch.tensor(spec.latents_std, dtype=latents.dtype).view(1, latent_channels, 1, 1, 1)
    latents = (latents - mean) * inverse_std
    mask = first_frame_mask(num_frames, latents.shape[3], latents.shape[4], spec.vae_scale_factor_temporal)
    return torch.concat([mask.to(latents.dtype), latents], dim=1)


# ---------------------------------------------------------------------------------------------------------
# 7. Denoise
# ---------------------------------------------------------------------------------------------------------


def denoise(dit, scheduler, latents: torch.Tensor, prompt_states: torch.Tensor,
            negative_states: torch.Tensor | None, guidance_scale: float,
            on_step: Callable[[int, int, float], None] | None = None,
            is_cancelled: Callable[[], bool] | None = None, condition: torch.Tensor | None = None,
            image_states: torch.Tensor | None = None) -> torch.Tensor:
    """The scheduler loop. With guidance (negative_states given) cond and uncond run as one DiT call on a
    batch of two; `is_cancelled` is asked before every step, `on_step(step, total, ms)` after it.
    i2v: `condition` is concatenated to the latents on channels, and both halves of the batch see the same
    `image_states` (the pipeline passes the same image embeddings to its cond and uncond calls)."""
    timesteps = scheduler.timesteps
    total = len(timesteps)
    states = prompt_states if negative_states is None else torch.cat([prompt_states, negative_states])
    batch = states.shape[0]
    if image_states is not None:
        image_states = image_states.expand(batch, *image_states.shape[1:]).contiguous()
    for index, t in enumerate(timesteps):
        if is_cancelled is not None and is_cancelled():
            raise GenerationCancelled(f"cancelled before step {index + 1} of {total}")
        started = time.perf_counter()
        model_input = latents if condition is None else torch.cat([latents, condition], dim=1)
        model_input = model_input.expand(batch, *model_input.shape[1:]).contiguous()
        timestep = t.to(torch.float32).expand(batch).contiguous()
        if image_states is None:
            noise = dit(model_input, timestep, states).to(torch.float32)
        else:
            noise = dit(model_input, timestep, states, image_states).to(torch.float32)
        if negative_states is None:
            noise_pred = noise
        else:
            noise_cond, noise_uncond = noise.chunk(2)
            noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(index + 1, total, (time.perf_counter() - started) * 1000)
    return latents


# ---------------------------------------------------------------------------------------------------------
# 8. Decode
# ---------------------------------------------------------------------------------------------------------


def denormalize_latents(spec: PipelineSpec, latents: torch.Tensor) -> torch.Tensor:
    """Back to the VAE's latent space, with WanPipeline's exact arithmetic (divide by 1/std, add mean)."""
    channels = latents.shape[1]
    mean = torch.tensor(spec.latents_mean, dtype=latents.dtype).view(1, channels, 1, 1, 1)
    inverse_std = 1.0 / torch.tensor(spec.latents_std, dtype=latents.dtype).view(1, channels, 1, 1, 1)
    return latents / inverse_std + mean


def decode_latents(vae_decode_first, vae_decode_step, latents: torch.Tensor,
                   is_cancelled: Callable[[], bool] | None = None) -> torch.Tensor:
    """Decode normalised-back latents [1, C, F', h, w] one latent frame at a time (the first graph makes 1
    frame, each step graph 4 more, carrying the causal-conv caches): video [1, 3, 1 + 4(F'-1), H, W]."""
    chunks = []
    caches = None
    for index in range(latents.shape[2]):
        if index and is_cancelled is not None and is_cancelled():
            raise GenerationCancelled("cancelled while decoding")
        frame_latents = latents[:, :, index:index + 1].contiguous()
        if index == 0:
            frames, caches = vae_decode_first(frame_latents)
        else:
            frames, caches = vae_decode_step(frame_latents, caches)
        chunks.append(frames.to(torch.float32))
    return torch.cat(chunks, dim=2).clamp(-1.0, 1.0)


# ---------------------------------------------------------------------------------------------------------
# 9. Postprocess
# ---------------------------------------------------------------------------------------------------------


def postprocess_frames(video: torch.Tensor):
    """[1, 3, F, H, W] in [-1, 1] -> numpy uint8 [F, H, W, 3], as VideoProcessor (x/2 + 0.5, clamp) then
    rounded to the nearest level (what diffusers' numpy_to_pil does with np output)."""
    frames = (video[0].permute(1, 2, 3, 0).to(torch.float32) * 0.5 + 0.5).clamp(0, 1)
    return (frames * 255).round().to(torch.uint8).numpy()


# ---------------------------------------------------------------------------------------------------------
# All stages
# ---------------------------------------------------------------------------------------------------------


def generate(params: GenerationParams, spec: PipelineSpec, components: Components,
             on_step: Callable[[int, int], None] | None = None,
             is_cancelled: Callable[[], bool] | None = None, image: np.ndarray | None = None) -> GenerationResult:
    """Run stages 1-9 for one request; with `image` (uint8 RGB [H, W, 3], checked by validate_image) it is
    image-to-video. Raises GenerationCancelled when `is_cancelled()` turns true."""
    timings: dict = {"dit_steps": []}
    started = time.perf_counter()

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round((now - since) * 1000, 3)
        return now

    def step_done(step: int, total: int, ms: float) -> None:
        timings["dit_steps"].append(round(ms, 3))
        if on_step is not None:
            on_step(step, total)

    if is_cancelled is not None and is_cancelled():  # a request cancelled while queued still reaches us
        raise GenerationCancelled("cancelled before start")

    with torch.inference_mode():
        # 1. Tokenize (prompt and, with guidance, the negative prompt in one batch)
        prompts = [params.prompt] + ([params.negative_prompt] if params.do_classifier_free_guidance else [])
        input_ids, attention_mask = tokenize(components.tokenizer, prompts, spec.text_max_length)
        now = lap("tokenize", started)

        # 2. Encode prompts
        states = encode_prompts(components.text_encoder, input_ids, attention_mask)
        prompt_states, negative_states = (states[:1], states[1:]) if params.do_classifier_free_guidance \
            else (states, None)
        now = lap("text_encoder", now)

        # 3. Encode image (i2v)
        image_states = None
        if image is not None:
            pil_image = to_pil(image)
            image_states = encode_image(components.image_processor, components.image_encoder, pil_image)
            now = lap("image_encoder", now)

        # 4. Prepare timesteps
        scheduler = prepare_timesteps(components.scheduler_config, params.num_inference_steps, params.shift)

        # 5. Prepare latents
        latents = prepare_latents(spec, params.seed, params.num_frames, params.height, params.width)
        now = lap("prepare", now)

        # 6. Prepare the image condition (i2v)
        condition = None
        if image is not None:
            pixels = preprocess_image(pil_image, params.height, params.width, spec.vae_scale_factor_spatial)
            condition = prepare_condition(spec, components.vae_encode_first, components.vae_encode_step, pixels,
                                          params.num_frames, is_cancelled)
            now = lap("vae_encode", now)

        # 7. Denoise
        latents = denoise(components.dit, scheduler, latents, prompt_states, negative_states,
                          params.guidance_scale, step_done, is_cancelled, condition, image_states)
        now = lap("denoise", now)

        # 8. Decode
        video = decode_latents(components.vae_decode_first, components.vae_decode_step,
                               denormalize_latents(spec, latents), is_cancelled)
        now = lap("vae_decode", now)

        # 9. Postprocess
        frames = postprocess_frames(video)
        lap("postprocess", now)
    return GenerationResult(frames=frames, timings_ms=timings)
