"""The serving graphs of a Wan checkpoint, their ONNX export, and their check against PyTorch.

| graph | wraps |
|---|---|
| `text_encoder` | umT5 encoder (eager attention: the dynamo exporter cannot trace SDPA here) -> last_hidden_state |
| `dit` | WanTransformer3DModel: one denoiser evaluation, dynamic batch/frames/height/width/text length; i2v: |
|  | also `encoder_hidden_states_image`, and the text length fixed at 512 (the DiT splits its context there) |
| `vae_decode_first` | post_quant_conv + WanDecoder3d on latent frame 0 -> 1 video frame + the causal-conv caches |
| `vae_decode_step` | the same on latent frame i >= 1, caches in and out -> 4 video frames |
| `image_encoder` | i2v: CLIP vision tower (eager attention) -> penultimate hidden states (the DiT's image context) |
| `vae_encode_first` | i2v: WanEncoder3d + quant_conv on video frame 0 -> latent mean (1 frame) + the encoder's caches |
| `vae_encode_step` | i2v: the same on video frames 1+4(i-1) .. 4i, caches in and out -> latent mean (1 frame) |

diffusers decodes latent frames one at a time in a Python loop, carrying a list of causal-conv caches
(`AutoencoderKLWan._decode`). A single decoder graph would fix the frame count, so the loop is split at its
only two distinct bodies, and the caches become explicit graph inputs/outputs `cache_in_NN`/`cache_out_NN`.
On the first frame diffusers' caches hold one frame (or the "Rep" marker of a temporal upsampler, which
means "zeros"); `vae_decode_first` emits them as two frames with a zero frame in front, which is exactly what
the second call computes with the short cache, so every step graph call sees fixed-size caches.
The de-normalisation of latents (latents / (1/std) + mean) stays outside the graphs, as in the pipeline.

The VAE encoder (`AutoencoderKLWan._encode`) has the same loop shape - video frame 0 alone, then chunks of 4
frames - and is split the same way. Its causal-conv caches are two frames (the first graph puts a zero frame in
front of its one), but a temporal downsampler's cache is one frame (it only ever reads the last one), so each
cache's frame count is part of the encoder's cache layout. Its output is the posterior's mean (the first z_dim
channels of quant_conv), i.e. `retrieve_latents(vae.encode(x), sample_mode="argmax")`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from export.checkpoint import BuildError, ShapeLimits

FP32, INT64 = "FP32", "INT64"  # Triton type names
TORCH_DTYPES = {FP32: torch.float32, INT64: torch.int64}
DEFAULT_OPSET = 18
DEFAULT_TOLERANCE = 1e-3
VAE_CACHE_FRAMES = 2  # diffusers' CACHE_T: a causal conv sees the last two frames of the previous chunk

# Sizes of the symbolic dims for tracing, and the different sizes the check runs at. Every traced dynamic
# dim is >= 2 (a dim traced at 1 is specialised to 1), and no checked size equals its traced one.
TRACE_SIZES = {"batch": 2, "text_length": 16, "latent_frames": 3, "latent_height": 6, "latent_width": 10}
CHECK_SIZES = {"batch": 1, "text_length": 23, "latent_frames": 2, "latent_height": 4, "latent_width": 8}
CHECK_VAE_LATENT_FRAMES = 3  # first + two steps against AutoencoderKLWan.decode


class VerificationError(BuildError):
    """An exported graph disagrees with PyTorch past the tolerance."""


# --------------------------------------------------------------------------------------------------------
# Tensor and graph descriptions (also what config.pbtxt and TensorRT profiles are generated from)


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. A dim is an int, or (symbol, factor): factor x the size of the symbol."""

    name: str
    dtype: str
    dims: tuple

    def shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else d[1] * sizes[d[0]] for d in self.dims)

    @property
    def triton_dims(self) -> list[int]:
        return [d if isinstance(d, int) else -1 for d in self.dims]


@dataclass(frozen=True)
class GraphSpec:
    """A serving graph's interface. `multiples`: symbols whose size must be a multiple (DiT patches)."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    multiples: dict = field(default_factory=dict)

    @property
    def symbols(self) -> list[str]:
        return sorted({d[0] for t in self.inputs for d in t.dims if not isinstance(d, int)})


def text_encoder_spec(hidden_size: int) -> GraphSpec:
    return GraphSpec(
        "text_encoder",
        inputs=(TensorSpec("input_ids", INT64, (("batch", 1), ("text_length", 1))),
                TensorSpec("attention_mask", INT64, (("batch", 1), ("text_length", 1)))),
        outputs=(TensorSpec("last_hidden_state", FP32, (("batch", 1), ("text_length", 1), hidden_size)),),
    )


def dit_spec(in_channels: int, out_channels: int, text_dim: int, patch_size: list[int]) -> GraphSpec:
    latent = (("latent_frames", 1), ("latent_height", 1), ("latent_width", 1))
    return GraphSpec(
        "dit",
        inputs=(TensorSpec("hidden_states", FP32, (("batch", 1), in_channels, *latent)),
                TensorSpec("timestep", FP32, (("batch", 1),)),
                TensorSpec("encoder_hidden_states", FP32, (("batch", 1), ("text_length", 1), text_dim))),
        outputs=(TensorSpec("noise_pred", FP32, (("batch", 1), out_channels, *latent)),),
        multiples={"latent_frames": patch_size[0], "latent_height": patch_size[1], "latent_width": patch_size[2]},
    )


def image_encoder_spec(image_size: int, image_tokens: int, hidden_size: int, channels: int = 3) -> GraphSpec:
    return GraphSpec(
        "image_encoder",
        inputs=(TensorSpec("pixel_values", FP32, (("batch", 1), channels, image_size, image_size)),),
        outputs=(TensorSpec("image_embeds", FP32, (("batch", 1), image_tokens, hidden_size)),),
    )


def i2v_dit_spec(in_channels: int, out_channels: int, text_dim: int, patch_size: list[int], text_length: int,
                 image_tokens: int, image_dim: int) -> GraphSpec:
    """The image-to-video DiT: prompts padded to exactly `text_length` tokens, plus the image embeddings."""
    t2v = dit_spec(in_channels, out_channels, text_dim, patch_size)
    hidden_states, timestep, _ = t2v.inputs
    return GraphSpec(
        "dit",
        inputs=(hidden_states, timestep,
                TensorSpec("encoder_hidden_states", FP32, (("batch", 1), text_length, text_dim)),
                TensorSpec("encoder_hidden_states_image", FP32, (("batch", 1), image_tokens, image_dim))),
        outputs=t2v.outputs,
        multiples=t2v.multiples,
    )


def cache_name(direction: str, index: int) -> str:
    return f"cache_{direction}_{index:02d}"


def vae_specs(cache_layout: list[tuple[int, int]], latent_channels: int, spatial: int, temporal: int,
              out_channels: int = 3) -> tuple[GraphSpec, GraphSpec]:
    """`cache_layout[i]` = (channels, spatial factor vs the latent) of the i-th causal-conv cache."""
    h, w = ("latent_height", 1), ("latent_width", 1)
    latents = TensorSpec("latents", FP32, (1, latent_channels, 1, h, w))

    def caches(direction):
        return tuple(TensorSpec(cache_name(direction, i), FP32,
                                (1, channels, VAE_CACHE_FRAMES, ("latent_height", k), ("latent_width", k)))
                     for i, (channels, k) in enumerate(cache_layout))

    def frames(count):
        return TensorSpec("frames", FP32, (1, out_channels, count, ("latent_height", spatial),
                                           ("latent_width", spatial)))

    first = GraphSpec("vae_decode_first", inputs=(latents,), outputs=(frames(1), *caches("out")))
    step = GraphSpec("vae_decode_step", inputs=(latents, *caches("in")), outputs=(frames(temporal), *caches("out")))
    return first, step


def vae_encode_specs(cache_layout: list[tuple[int, int, int]], latent_channels: int, spatial: int, temporal: int,
                     in_channels: int = 3) -> tuple[GraphSpec, GraphSpec]:
    """`cache_layout[i]` = (channels, spatial factor vs the latent, frames) of the encoder's i-th cache."""
    h, w = ("latent_height", 1), ("latent_width", 1)
    latents = TensorSpec("latents", FP32, (1, latent_channels, 1, h, w))

    def video(count):
        return TensorSpec("video", FP32, (1, in_channels, count, ("latent_height", spatial), ("latent_width", spatial)))

    def caches(direction):
        return tuple(TensorSpec(cache_name(direction, i), FP32,
                                (1, channels, frames, ("latent_height", k), ("latent_width", k)))
                     for i, (channels, k, frames) in enumerate(cache_layout))

    first = GraphSpec("vae_encode_first", inputs=(video(1),), outputs=(latents, *caches("out")))
    step = GraphSpec("vae_encode_step", inputs=(video(temporal), *caches("in")), outputs=(latents, *caches("out")))
    return first, step


# --------------------------------------------------------------------------------------------------------
# Loading (fp32, eval) and the torch wrappers that are exported


def quiet_loading() -> None:
    """No per-component "Loading weights" progress bars inside the build's own."""
    import diffusers.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def load_text_encoder(checkpoint: Path) -> nn.Module:
    from transformers import UMT5EncoderModel

    quiet_loading()
    return UMT5EncoderModel.from_pretrained(Path(checkpoint) / "text_encoder", attn_implementation="eager",
                                            dtype=torch.float32).eval()


def load_transformer(checkpoint: Path) -> nn.Module:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(Path(checkpoint) / "transformer", torch_dtype=torch.float32).eval()


def load_vae(checkpoint: Path) -> nn.Module:
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(Path(checkpoint) / "vae", torch_dtype=torch.float32).eval()


def load_image_encoder(checkpoint: Path) -> nn.Module:
    """The CLIP vision tower with eager attention (the class model_index.json names; CLIPVisionModel in Wan2.1)."""
    import json

    import transformers

    quiet_loading()
    index = json.loads((Path(checkpoint) / "model_index.json").read_text(encoding="utf-8"))
    class_name = (index.get("image_encoder") or [None, "CLIPVisionModel"])[1]
    model_class = getattr(transformers, class_name, None)
    if model_class is None:
        raise BuildError(f"checkpoint {checkpoint}: unknown image encoder class {class_name!r}")
    return model_class.from_pretrained(Path(checkpoint) / "image_encoder", attn_implementation="eager",
                                       dtype=torch.float32).eval()


class TextEncoderGraph(nn.Module):
    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids, attention_mask):
        return self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class DiTGraph(nn.Module):
    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        return self.transformer(hidden_states=hidden_states, timestep=timestep,
                                encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class ImageDiTGraph(nn.Module):
    """The image-to-video DiT: the text context and the CLIP image context are separate inputs."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image):
        return self.transformer(hidden_states=hidden_states, timestep=timestep,
                                encoder_hidden_states=encoder_hidden_states,
                                encoder_hidden_states_image=encoder_hidden_states_image, return_dict=False)[0]


class ImageEncoderGraph(nn.Module):
    """pixel_values -> the penultimate hidden states (WanImageToVideoPipeline.encode_image)."""

    def __init__(self, image_encoder: nn.Module):
        super().__init__()
        self.image_encoder = image_encoder

    def forward(self, pixel_values):
        return self.image_encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]


def vae_cache_layout(vae: nn.Module) -> list[tuple[int, int]]:
    """(channels, spatial factor) of each causal-conv cache the decoder uses, found by decoding two frames.

    Counting WanCausalConv3d modules over-counts (1x1x1 shortcut convs hold no cache), so the layout is
    taken from the caches a real decode leaves behind.
    """
    latent_h, latent_w = 2, 3
    with torch.no_grad():
        x = vae.post_quant_conv(torch.zeros(1, vae.config.z_dim, 2, latent_h, latent_w))
        cache = [None] * vae._cached_conv_counts["decoder"]
        vae.decoder(x[:, :, :1], feat_cache=cache, feat_idx=[0], first_chunk=True)
        used = [0]
        vae.decoder(x[:, :, 1:], feat_cache=cache, feat_idx=used)
    layout = []
    for entry in cache[: used[0]]:
        factor = entry.shape[3] // latent_h
        assert entry.shape[2] == VAE_CACHE_FRAMES and entry.shape[4] == factor * latent_w, entry.shape
        layout.append((int(entry.shape[1]), int(factor)))
    return layout


class VaeDecodeFirstGraph(nn.Module):
    """Latent frame 0 -> (frames [1, 3, 1, H, W], two-frame caches)."""

    def __init__(self, vae: nn.Module, cache_layout: list[tuple[int, int]]):
        super().__init__()
        self.vae = vae
        self.cache_layout = cache_layout

    def forward(self, latents):
        cache = [None] * len(self.cache_layout)
        x = self.vae.post_quant_conv(latents)
        frames = self.vae.decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=True).clamp(-1.0, 1.0)
        batch, _, _, height, width = latents.shape
        caches = []
        for entry, (channels, factor) in zip(cache, self.cache_layout):
            if isinstance(entry, str):  # "Rep": a temporal upsampler not run yet; its cache counts as zeros
                caches.append(latents.new_zeros(batch, channels, VAE_CACHE_FRAMES, factor * height, factor * width))
            else:  # one frame so far: the causal zero padding becomes the older frame
                caches.append(torch.cat([torch.zeros_like(entry), entry], dim=2))
        return (frames, *caches)


class VaeDecodeStepGraph(nn.Module):
    """Latent frame i >= 1 and the caches -> (frames [1, 3, 4, H, W], updated caches)."""

    varargs_from = 1  # forward(latents, *caches)

    def __init__(self, vae: nn.Module, cache_layout: list[tuple[int, int]]):
        super().__init__()
        self.vae = vae
        self.cache_layout = cache_layout

    def forward(self, latents, *caches):
        cache = list(caches)
        x = self.vae.post_quant_conv(latents)
        frames = self.vae.decoder(x, feat_cache=cache, feat_idx=[0]).clamp(-1.0, 1.0)
        return (frames, *cache)


def vae_encode_cache_layout(vae: nn.Module) -> list[tuple[int, int, int]]:
    """(channels, spatial factor vs the latent, frames) of each cache the encoder uses, found by encoding 1 + 4
    frames as AutoencoderKLWan._encode does (frames: 2 for causal convs, 1 for temporal downsamplers)."""
    latent_h, latent_w = 2, 3
    spatial = 2 ** len(vae.config.temperal_downsample)
    temporal = 2 ** sum(vae.config.temperal_downsample)
    with torch.no_grad():
        video = torch.zeros(1, vae.config.in_channels, 1 + temporal, spatial * latent_h, spatial * latent_w)
        cache = [None] * vae._cached_conv_counts["encoder"]
        vae.encoder(video[:, :, :1], feat_cache=cache, feat_idx=[0])
        used = [0]
        vae.encoder(video[:, :, 1:], feat_cache=cache, feat_idx=used)
    layout = []
    for entry in cache[: used[0]]:
        factor = entry.shape[3] // latent_h
        assert entry.shape[2] in (1, VAE_CACHE_FRAMES) and entry.shape[4] == factor * latent_w, entry.shape
        layout.append((int(entry.shape[1]), int(factor), int(entry.shape[2])))
    return layout


class VaeEncodeFirstGraph(nn.Module):
    """Video frame 0 [1, 3, 1, H, W] -> (latent mean [1, z, 1, h, w], caches at their step-call frame counts)."""

    def __init__(self, vae: nn.Module, cache_layout: list[tuple[int, int, int]]):
        super().__init__()
        self.vae = vae
        self.cache_layout = cache_layout

    def forward(self, video):
        cache = [None] * len(self.cache_layout)
        out = self.vae.encoder(video, feat_cache=cache, feat_idx=[0])
        latents = self.vae.quant_conv(out)[:, : self.vae.config.z_dim]
        caches = []
        for entry, (_, _, frames) in zip(cache, self.cache_layout):
            if entry.shape[2] < frames:  # one frame so far: the causal zero padding becomes the older frame
                entry = torch.cat([entry.new_zeros(*entry.shape[:2], frames - entry.shape[2], *entry.shape[3:]),
                                   entry], dim=2)
            caches.append(entry)
        return (latents, *caches)


class VaeEncodeStepGraph(nn.Module):
    """Video frames [1, 3, 4, H, W] after the first, and the caches -> (latent mean [1, z, 1, h, w], caches)."""

    varargs_from = 1  # forward(video, *caches)

    def __init__(self, vae: nn.Module, cache_layout: list[tuple[int, int, int]]):
        super().__init__()
        self.vae = vae
        self.cache_layout = cache_layout

    def forward(self, video, *caches):
        cache = list(caches)
        out = self.vae.encoder(video, feat_cache=cache, feat_idx=[0])
        return (self.vae.quant_conv(out)[:, : self.vae.config.z_dim], *cache)


def encode_with_graphs(first: Callable, step: Callable, video, temporal: int = 4):
    """retrieve_latents(vae.encode(video), "argmax") (batch 1, 1 + 4k frames) through a first and a step callable."""
    outputs = first(video[:, :, :1])
    latents, caches = [outputs[0]], outputs[1:]
    for start in range(1, video.shape[2], temporal):
        outputs = step(video[:, :, start: start + temporal], *caches)
        latents.append(outputs[0])
        caches = outputs[1:]
    if isinstance(latents[0], np.ndarray):
        return np.concatenate(latents, axis=2)
    return torch.cat(latents, dim=2)


def decode_with_graphs(first: Callable, step: Callable, latents):
    """AutoencoderKLWan.decode(latents) (batch 1) through a first and a step callable on one latent frame each."""
    outputs = first(latents[:, :, :1])
    frames, caches = [outputs[0]], outputs[1:]
    for index in range(1, latents.shape[2]):
        outputs = step(latents[:, :, index: index + 1], *caches)
        frames.append(outputs[0])
        caches = outputs[1:]
    if isinstance(frames[0], np.ndarray):
        return np.concatenate(frames, axis=2)
    return torch.cat(frames, dim=2)


# --------------------------------------------------------------------------------------------------------
# Sample inputs, export, check


def sample_inputs(spec: GraphSpec, sizes: dict[str, int], seed: int = 0, vocab_size: int = 100) -> list:
    """Random inputs of `spec` at `sizes`: token ids with some padding, timesteps in [0, 1000), N(0,1) else."""
    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for tensor in spec.inputs:
        shape = tensor.shape(sizes)
        if tensor.name == "input_ids":
            inputs.append(torch.randint(3, vocab_size, shape, generator=generator))
        elif tensor.name == "attention_mask":
            mask = torch.ones(shape, dtype=torch.int64)
            mask[-1, max(1, shape[1] // 2):] = 0  # the last prompt is padded
            inputs.append(mask)
        elif tensor.name == "timestep":
            inputs.append(torch.rand(shape, generator=generator) * 1000)
        else:
            inputs.append(torch.randn(shape, generator=generator))
    return inputs


def _torch_dims(spec: GraphSpec, max_sizes: dict[str, int]) -> list[dict]:
    """torch.export dynamic shapes: one Dim per symbol (in units of its multiple), scaled per tensor."""
    base = {}
    for symbol in spec.symbols:
        multiple = spec.multiples.get(symbol, 1)
        base[symbol] = (multiple, torch.export.Dim(f"{symbol}_div{multiple}" if multiple > 1 else symbol,
                                                   min=1, max=max(2, max_sizes[symbol] // multiple)))
    shapes = []
    for tensor in spec.inputs:
        axes = {}
        for axis, dim in enumerate(tensor.dims):
            if not isinstance(dim, int):
                multiple, dim_object = base[dim[0]]
                scale = multiple * dim[1]
                axes[axis] = dim_object if scale == 1 else scale * dim_object
        shapes.append(axes)
    return shapes


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's progress lines and known-harmless warnings would bury the build's own output."""
    quiet_loading()
    loggers = [logging.getLogger(name) for name in ("onnxscript", "torch.onnx", "torch.export", "torch._dynamo",
                                                     "torch.fx.experimental.symbolic_shapes")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def export_onnx(module: nn.Module, spec: GraphSpec, example_inputs: list, path: Path, max_sizes: dict[str, int],
                opset: int = DEFAULT_OPSET) -> Path:
    """Exports `module` with the dynamo exporter; dynamic dims as declared by `spec`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic = _torch_dims(spec, max_sizes)
    split = getattr(module, "varargs_from", None)
    if split is not None:  # forward(a, *rest): torch.export wants the rest as one nested tuple
        dynamic = [*dynamic[:split], tuple(dynamic[split:])]
    with _quiet_exporter(), torch.no_grad():
        torch.onnx.export(module, tuple(example_inputs), str(path), dynamo=True, verbose=False,
                          input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
                          dynamic_shapes=tuple(dynamic), opset_version=opset, external_data=True)
    return path


def ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def max_abs_diff(expected, actual, label: str, tolerance: float) -> float:
    """Largest |expected - actual| over paired outputs; VerificationError past tolerance x max(1, max|expected|)."""
    diffs, scale = [0.0], 1.0
    for index, (want, got) in enumerate(zip(expected, actual)):
        want = want.detach().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
        if tuple(want.shape) != tuple(got.shape):
            raise VerificationError(f"{label}: output {index} has shape {tuple(got.shape)}, PyTorch gives "
                                    f"{tuple(want.shape)}")
        if want.size:
            diffs.append(float(np.abs(want.astype(np.float64) - got).max()))
            scale = max(scale, float(np.abs(want).max()))
    worst = float(np.max(diffs))  # NaN propagates
    if not worst <= tolerance * scale:  # also catches NaN
        raise VerificationError(f"{label}: max abs diff {worst:.3g} vs PyTorch exceeds the tolerance "
                                f"{tolerance:g} x {scale:.3g}")
    return worst


def check_graph(module: nn.Module, spec: GraphSpec, path: Path, inputs: list, tolerance: float) -> float:
    """Runs `path` in ONNX Runtime and `module` in PyTorch on `inputs`; returns the max abs difference."""
    with torch.no_grad():
        expected = module(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    feeds = {t.name: x.numpy() for t, x in zip(spec.inputs, inputs)}
    actual = ort_session(path).run([t.name for t in spec.outputs], feeds)
    shape = "x".join(map(str, inputs[0].shape))
    return max_abs_diff(expected, actual, f"{spec.name} at {spec.inputs[0].name} {shape}", tolerance)


# --------------------------------------------------------------------------------------------------------
# Per-component export + check, as the build runs them


@dataclass
class ExportedGraph:
    spec: GraphSpec
    path: Path
    export_seconds: float
    check_seconds: float = 0.0
    max_abs_diff: float | None = None
    checked_at: str = ""


def max_sizes(limits: ShapeLimits, spatial: int, temporal: int) -> dict[str, int]:
    return {"batch": max(limits.max_batch_size, TRACE_SIZES["batch"]),
            "text_length": max(limits.max_text_length, TRACE_SIZES["text_length"]),
            "latent_frames": (limits.max_num_frames - 1) // temporal + 1,
            "latent_height": limits.max_height // spatial,
            "latent_width": limits.max_width // spatial}


def _describe(spec: GraphSpec, sizes: dict[str, int]) -> str:
    return ", ".join(f"{s}={sizes[s]}" for s in spec.symbols)


def _export_and_check(module, spec, path, limits_sizes, opset, tolerance, check, vocab_size=100) -> ExportedGraph:
    start = time.monotonic()
    export_onnx(module, spec, sample_inputs(spec, TRACE_SIZES, vocab_size=vocab_size), path, limits_sizes, opset)
    result = ExportedGraph(spec, path, time.monotonic() - start)
    if check:
        start = time.monotonic()
        inputs = sample_inputs(spec, CHECK_SIZES, seed=1, vocab_size=vocab_size)
        result.max_abs_diff = check_graph(module, spec, path, inputs, tolerance)
        result.check_seconds = time.monotonic() - start
        result.checked_at = _describe(spec, CHECK_SIZES)
    return result


def export_text_encoder(checkpoint: Path, onnx_dir: Path, limits: ShapeLimits, spatial: int, temporal: int,
                        opset: int = DEFAULT_OPSET, tolerance: float = DEFAULT_TOLERANCE,
                        check: bool = True) -> list[ExportedGraph]:
    text_encoder = load_text_encoder(checkpoint)
    spec = text_encoder_spec(text_encoder.config.d_model)
    return [_export_and_check(TextEncoderGraph(text_encoder), spec, onnx_dir / spec.name / "model.onnx",
                              max_sizes(limits, spatial, temporal), opset, tolerance, check,
                              vocab_size=text_encoder.config.vocab_size)]


def export_dit(checkpoint: Path, onnx_dir: Path, limits: ShapeLimits, spatial: int, temporal: int,
               opset: int = DEFAULT_OPSET, tolerance: float = DEFAULT_TOLERANCE,
               check: bool = True) -> list[ExportedGraph]:
    transformer = load_transformer(checkpoint)
    config = transformer.config
    out_channels = config.out_channels or config.in_channels
    if config.image_dim is None:
        spec, module = dit_spec(config.in_channels, out_channels, config.text_dim, list(config.patch_size)), \
            DiTGraph(transformer)
    else:  # image-to-video: the prompt length is fixed (I2V_TEXT_LENGTH), the image embeddings are an input
        from export.checkpoint import load_checkpoint

        described = load_checkpoint(checkpoint)
        spec = i2v_dit_spec(config.in_channels, out_channels, config.text_dim, list(config.patch_size),
                            limits.max_text_length, described.image_tokens, config.image_dim)
        module = ImageDiTGraph(transformer)
    return [_export_and_check(module, spec, onnx_dir / spec.name / "model.onnx",
                              max_sizes(limits, spatial, temporal), opset, tolerance, check)]


def export_image_encoder(checkpoint: Path, onnx_dir: Path, limits: ShapeLimits, spatial: int, temporal: int,
                         opset: int = DEFAULT_OPSET, tolerance: float = DEFAULT_TOLERANCE,
                         check: bool = True) -> list[ExportedGraph]:
    """i2v: the CLIP vision tower up to the penultimate hidden states (dynamic batch; square fixed-size input)."""
    encoder = load_image_encoder(checkpoint)
    config = encoder.config
    tokens = (config.image_size // config.patch_size) ** 2 + 1
    spec = image_encoder_spec(config.image_size, tokens, config.hidden_size, config.num_channels)
    return [_export_and_check(ImageEncoderGraph(encoder), spec, onnx_dir / spec.name / "model.onnx",
                              max_sizes(limits, spatial, temporal), opset, tolerance, check)]


def _export_cached_pair(first: nn.Module, step: nn.Module, first_spec: GraphSpec, step_spec: GraphSpec,
                        onnx_dir: Path, sizes: dict[str, int], opset: int, tolerance: float,
                        check: bool) -> list[ExportedGraph]:
    """A causal-conv VAE half as two graphs: the first chunk, then a step with its caches as explicit I/O."""
    graphs = [_export_and_check(first, first_spec, onnx_dir / first_spec.name / "model.onnx", sizes, opset,
                                tolerance, check)]

    # The step graph is traced and checked with real caches (from the first graph), not random ones.
    def step_inputs(sample_sizes, seed):
        first_chunk = sample_inputs(first_spec, sample_sizes, seed=seed)[0]
        with torch.no_grad():
            caches = first(first_chunk)[1:]
        chunk = step_spec.inputs[0].shape(sample_sizes)
        return [torch.randn(chunk, generator=torch.Generator().manual_seed(seed + 7)), *caches]

    start = time.monotonic()
    step_path = onnx_dir / step_spec.name / "model.onnx"
    export_onnx(step, step_spec, step_inputs(TRACE_SIZES, 0), step_path, sizes, opset)
    step_result = ExportedGraph(step_spec, step_path, time.monotonic() - start)
    if check:
        start = time.monotonic()
        step_result.max_abs_diff = check_graph(step, step_spec, step_path, step_inputs(CHECK_SIZES, 1), tolerance)
        step_result.checked_at = _describe(step_spec, CHECK_SIZES)
        step_result.check_seconds = time.monotonic() - start
    return [*graphs, step_result]


@dataclass
class VaeExport:
    graphs: list[ExportedGraph]
    cache_layout: list[tuple[int, int]]
    decode_max_abs_diff: float | None = None  # first + steps in ONNX Runtime vs AutoencoderKLWan.decode


def export_vae(checkpoint: Path, onnx_dir: Path, limits: ShapeLimits, spatial: int, temporal: int,
               opset: int = DEFAULT_OPSET, tolerance: float = DEFAULT_TOLERANCE, check: bool = True) -> VaeExport:
    vae = load_vae(checkpoint)
    layout = vae_cache_layout(vae)
    first_spec, step_spec = vae_specs(layout, vae.config.z_dim, spatial, temporal, vae.config.out_channels)
    graphs = _export_cached_pair(VaeDecodeFirstGraph(vae, layout), VaeDecodeStepGraph(vae, layout), first_spec,
                                 step_spec, onnx_dir, max_sizes(limits, spatial, temporal), opset, tolerance, check)
    result = VaeExport(graphs, layout)
    if check:
        result.decode_max_abs_diff = check_vae_decode(vae, graphs[0].path, graphs[1].path, CHECK_VAE_LATENT_FRAMES,
                                                      CHECK_SIZES, tolerance)
    return result


@dataclass
class VaeEncoderExport:
    graphs: list[ExportedGraph]
    cache_layout: list[tuple[int, int, int]]
    encode_max_abs_diff: float | None = None  # first + steps in ONNX Runtime vs AutoencoderKLWan.encode's mean


def export_vae_encoder(checkpoint: Path, onnx_dir: Path, limits: ShapeLimits, spatial: int, temporal: int,
                       opset: int = DEFAULT_OPSET, tolerance: float = DEFAULT_TOLERANCE,
                       check: bool = True) -> VaeEncoderExport:
    """i2v: the VAE encoder as first/step graphs with explicit caches (first-frame conditioning latents)."""
    vae = load_vae(checkpoint)
    layout = vae_encode_cache_layout(vae)
    first_spec, step_spec = vae_encode_specs(layout, vae.config.z_dim, spatial, temporal, vae.config.in_channels)
    graphs = _export_cached_pair(VaeEncodeFirstGraph(vae, layout), VaeEncodeStepGraph(vae, layout), first_spec,
                                 step_spec, onnx_dir, max_sizes(limits, spatial, temporal), opset, tolerance, check)
    result = VaeEncoderExport(graphs, layout)
    if check:
        result.encode_max_abs_diff = check_vae_encode(vae, graphs[0].path, graphs[1].path, CHECK_VAE_LATENT_FRAMES,
                                                      CHECK_SIZES, tolerance)
    return result


def first_and_step_runners(first_path: Path, step_path: Path):
    """ONNX Runtime callables of a first/step graph pair: `first(x)` and `step(x, *caches)`, each returning the
    outputs in the step graph's order (frames or latents, then the caches)."""
    first_session, step_session = ort_session(first_path), ort_session(step_path)
    input_names = [i.name for i in step_session.get_inputs()]
    output_names = [o.name for o in step_session.get_outputs()]

    def first(tensor):
        return first_session.run(output_names, {input_names[0]: tensor})

    def step(tensor, *caches):
        return step_session.run(output_names, dict(zip(input_names, (tensor, *caches))))

    return first, step


def check_vae_encode(vae: nn.Module, first_path: Path, step_path: Path, latent_frames: int,
                     sizes: dict[str, int], tolerance: float) -> float:
    """The two encoder graphs chained in ONNX Runtime against the mean of `vae.encode` of the same video."""
    first, step = first_and_step_runners(first_path, step_path)
    spatial = 2 ** len(vae.config.temperal_downsample)
    temporal = 2 ** sum(vae.config.temperal_downsample)
    generator = torch.Generator().manual_seed(2)
    video = torch.rand(1, vae.config.in_channels, 1 + temporal * (latent_frames - 1), spatial * sizes["latent_height"],
                       spatial * sizes["latent_width"], generator=generator) * 2 - 1
    with torch.no_grad():
        expected = vae.encode(video).latent_dist.mode()
    actual = encode_with_graphs(first, step, video.numpy(), temporal)
    return max_abs_diff([expected], [actual], f"vae_encode_first+step over {video.shape[2]} video frames vs "
                        "AutoencoderKLWan.encode (mean)", tolerance)


def check_vae_decode(vae: nn.Module, first_path: Path, step_path: Path, latent_frames: int,
                     sizes: dict[str, int], tolerance: float) -> float:
    """The two ONNX graphs chained in ONNX Runtime against `vae.decode` of the same latents."""
    first, step = first_and_step_runners(first_path, step_path)
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(1, vae.config.z_dim, latent_frames, sizes["latent_height"], sizes["latent_width"],
                          generator=generator)
    with torch.no_grad():
        expected = vae.decode(latents).sample
    actual = decode_with_graphs(first, step, latents.numpy())
    return max_abs_diff([expected], [actual], f"vae_decode_first+step over {latent_frames} latent frames vs "
                        "AutoencoderKLWan.decode", tolerance)
