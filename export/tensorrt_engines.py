"""TensorRT engines for the `tensorrt` backend: precisions, optimisation profiles, engine build, configs.

The engines are built from the same ONNX graphs as the onnxruntime backend and keep their tensor names and
FP32 I/O (lower precision is internal), so wan_pipeline calls them the same way. Profiles and configs are
plain functions of the graph specs and the shape limits, testable without a GPU; only `build_engine`
needs the `tensorrt` package and a CUDA GPU (`require_tensorrt` stops with a clear message otherwise).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from export.checkpoint import ServingDefaults, ShapeLimits
from export.repository import spec_io

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
# The DiT runs in reduced precision; the rest is kept fp32 where the model needs it.
FP32_REASONS = {
    "text_encoder": "umT5's activations overflow fp16",
    "vae_decode_first": "the VAE decoder is kept fp32 (small share of the time, visible artefacts in fp16)",
    "vae_decode_step": "the VAE decoder is kept fp32 (small share of the time, visible artefacts in fp16)",
    "image_encoder": "the CLIP image encoder runs once per request (WanImageToVideoPipeline runs it in fp32)",
    "vae_encode_first": "the VAE encoder runs once per request and conditions every step: kept fp32",
    "vae_encode_step": "the VAE encoder runs once per request and conditions every step: kept fp32",
}
AUTO_DIT_PRECISION = "bf16"  # Wan is trained and released in bf16; fp16 is an option for pre-Ampere GPUs
DEFAULT_WORKSPACE_GIB = 8


def component_precisions(precision: str, kind: str = "t2v") -> dict[str, str]:
    """{component model: engine precision} of a `kind` ("t2v", "i2v") repository: only the DiT follows --precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    dit = AUTO_DIT_PRECISION if precision == "auto" else precision
    precisions = {"text_encoder": "fp32", "dit": dit, "vae_decode_first": "fp32", "vae_decode_step": "fp32"}
    if kind == "i2v":
        precisions.update({"image_encoder": "fp32", "vae_encode_first": "fp32", "vae_encode_step": "fp32"})
    return precisions


def profile_sizes(defaults: ServingDefaults, limits: ShapeLimits, spatial: int, temporal: int) -> dict:
    """(min, opt, max) of every symbolic dim. opt is what a default request runs: guidance batch 2, the
    default video size, and prompts padded to the full text length (as wan_pipeline sends them)."""

    def latent_frames(frames):
        return (frames - 1) // temporal + 1

    return {
        "batch": (1, min(2, limits.max_batch_size), limits.max_batch_size),
        "text_length": (1, limits.max_text_length, limits.max_text_length),
        "latent_frames": (1, latent_frames(defaults.num_frames), latent_frames(limits.max_num_frames)),
        "latent_height": (limits.min_height // spatial, defaults.height // spatial, limits.max_height // spatial),
        "latent_width": (limits.min_width // spatial, defaults.width // spatial, limits.max_width // spatial),
    }


def optimization_profile(spec, sizes: dict) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """{input name: (min shape, opt shape, max shape)} of one graph."""
    levels = [{symbol: value[level] for symbol, value in sizes.items()} for level in range(3)]
    return {tensor.name: tuple(tensor.shape(values) for values in levels) for tensor in spec.inputs}


def tensorrt_config(spec, precision: str) -> str:
    """config.pbtxt of a TensorRT plan (`<model>/1/model.plan`); names and types as on onnxruntime."""
    return (f'name: "{spec.name}"\nplatform: "tensorrt_plan"\nmax_batch_size: 0\n'
            + spec_io(spec)
            + "instance_group [ { kind: KIND_GPU count: 1 } ]\n"
            + f'parameters {{ key: "precision" value: {{ string_value: "{precision}" }} }}\n')


def tensorrt_unavailable_reason() -> str | None:
    """Why engines cannot be built here, or None when they can (cheap when tensorrt is not installed)."""
    problems = []
    if importlib.util.find_spec("tensorrt") is None:
        problems.append("the `tensorrt` Python package is not installed (pip install tensorrt-cu12)")
    try:
        import torch

        if not torch.cuda.is_available():
            problems.append("no CUDA GPU is visible on this machine")
    except ImportError:
        problems.append("torch is not installed")
    return " and ".join(problems) or None


def tensorrt_available() -> bool:
    """For --backend auto: tensorrt importable and a CUDA GPU visible (torch is imported only if needed)."""
    return importlib.util.find_spec("tensorrt") is not None and tensorrt_unavailable_reason() is None


def require_tensorrt():
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        raise SystemExit(f"build_engines: --backend tensorrt needs an NVIDIA GPU and TensorRT, but {reason}. "
                         "Build on a GPU machine, or use --backend onnxruntime.")
    import tensorrt

    return tensorrt


def build_engine(onnx_path: Path, plan_path: Path, profile: dict, precision: str,
                 workspace_gib: float = DEFAULT_WORKSPACE_GIB) -> Path:
    """Parses the ONNX graph, builds one engine with one optimisation profile, writes the serialized plan."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    optimization = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.items():
        optimization.set_shape(name, low, opt, high)
    config.add_optimization_profile(optimization)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    return plan_path
