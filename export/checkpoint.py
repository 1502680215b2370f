"""What a diffusers Wan checkpoint is: its kind, its serving defaults, and the shapes it can serve.

Everything here reads JSON files only (no weights), so it is fast and safe to call before any export.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The embedded tiny random-weight checkpoints, by kind, generated on first use (export/tiny_checkpoint.py).
TINY_CHECKPOINTS = {"t2v": REPO_ROOT / ".cache" / "tiny_checkpoint",
                    "i2v": REPO_ROOT / ".cache" / "tiny_checkpoint_i2v"}
DEFAULT_CHECKPOINT = TINY_CHECKPOINTS["t2v"]
SERVING_DEFAULTS_FILE = "serving_defaults.json"

# The pipeline classes a model_index.json may name, and what we serve them as.
SUPPORTED_KINDS = {"WanPipeline": "t2v", "WanImageToVideoPipeline": "i2v"}
KIND_PIPELINES = {kind: pipeline for pipeline, kind in SUPPORTED_KINDS.items()}
LATER_KINDS = {"WanVideoToVideoPipeline": "video-to-video"}
REQUIRED_COMPONENTS = ("text_encoder", "tokenizer", "transformer", "vae", "scheduler")
IMAGE_COMPONENTS = ("image_encoder", "image_processor")  # what i2v needs on top
# Wan2.1 I2V's DiT splits its cross-attention context as "everything before the last 512 tokens is the image"
# (diffusers' WanAttnProcessor), so prompts must reach it padded to exactly this length.
I2V_TEXT_LENGTH = 512

# Upper bounds we offer by default; a checkpoint's rotary tables may allow less (see `rope_limits`).
DEFAULT_MAX_SIDE = 1280
DEFAULT_MIN_SIDE = 64
DEFAULT_MAX_NUM_FRAMES = 81
DEFAULT_MAX_TEXT_LENGTH = 512
DEFAULT_MAX_BATCH_SIZE = 2  # classifier-free guidance: prompt + negative prompt
MAX_NUM_INFERENCE_STEPS = 1000
MAX_IMAGE_PIXELS = 4096 * 4096  # i2v: the largest conditioning image wan_pipeline accepts (before resizing)


class BuildError(Exception):
    """A problem the user can fix (bad path, unsupported checkpoint, inconsistent option); one line."""


@dataclass(frozen=True)
class ServingDefaults:
    """What a request gets for a field it leaves out."""

    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    shift: float
    fps: int


# Wan2.1 T2V as its model card runs it (480p); `shift` comes from the scheduler config when it has one.
WAN21_DEFAULTS = ServingDefaults(height=480, width=832, num_frames=81, num_inference_steps=50,
                                 guidance_scale=5.0, shift=3.0, fps=16)


@dataclass(frozen=True)
class ShapeLimits:
    """The request shapes the repository accepts; TensorRT optimisation profiles are built from them."""

    min_height: int
    max_height: int
    min_width: int
    max_width: int
    max_num_frames: int
    max_text_length: int
    max_batch_size: int


@dataclass(frozen=True)
class Checkpoint:
    """A diffusers-format Wan checkpoint, described from its JSON files."""

    path: Path
    kind: str
    name: str
    transformer_config: dict
    vae_config: dict
    scheduler_config: dict
    tokenizer_config: dict
    serving_defaults_file: dict
    image_encoder_config: dict = field(default_factory=dict)  # i2v only
    image_processor_config: dict = field(default_factory=dict)  # i2v only
    image_processor_class: str = ""  # i2v only: the transformers class model_index.json names

    @property
    def patch_size(self) -> list[int]:
        return list(self.transformer_config.get("patch_size", [1, 2, 2]))

    @property
    def vae_scale_factor_spatial(self) -> int:
        return int(self.vae_config.get("scale_factor_spatial", 2 ** len(self.vae_config["temperal_downsample"])))

    @property
    def vae_scale_factor_temporal(self) -> int:
        return int(self.vae_config.get("scale_factor_temporal", 2 ** sum(self.vae_config["temperal_downsample"])))

    @property
    def latent_channels(self) -> int:
        return int(self.vae_config["z_dim"])

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: VAE downsampling times the DiT's spatial patch."""
        return self.vae_scale_factor_spatial * max(self.patch_size[1], self.patch_size[2])

    @property
    def image_size(self) -> int:
        """i2v: the side of the square images the CLIP vision encoder takes (its processor crops to it)."""
        return int(self.image_encoder_config["image_size"])

    @property
    def image_tokens(self) -> int:
        """i2v: tokens per image the encoder emits (patches + the class token)."""
        return (self.image_size // int(self.image_encoder_config["patch_size"])) ** 2 + 1

    @property
    def image_embed_dim(self) -> int:
        return int(self.image_encoder_config["hidden_size"])

    def rope_limits(self) -> tuple[int, int]:
        """(max side in pixels, max frames) the DiT's rotary tables cover: positions past them do not exist."""
        positions = int(self.transformer_config.get("rope_max_seq_len", 1024))
        max_side = positions * self.size_multiple
        max_frames = (positions * self.patch_size[0] - 1) * self.vae_scale_factor_temporal + 1
        return max_side, max_frames


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise BuildError(f"{path}: not valid JSON ({error})") from None


def default_checkpoint(kind: str = "t2v") -> Path:
    """The embedded tiny random-weight checkpoint of `kind` ("t2v", "i2v"), generated into .cache/ on first use."""
    if kind not in TINY_CHECKPOINTS:
        raise BuildError(f"no embedded tiny checkpoint of kind {kind!r}; choose one of {', '.join(TINY_CHECKPOINTS)}")
    target = TINY_CHECKPOINTS[kind]
    if not (target / "model_index.json").exists():
        from export.tiny_checkpoint import write_tiny_checkpoint

        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            write_tiny_checkpoint(staging, kind=kind)
            try:
                os.rename(staging, target)
            except OSError:  # another build generated it meanwhile
                if not (target / "model_index.json").exists():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def load_checkpoint(path: Path, name: str | None = None) -> Checkpoint:
    """Reads and checks a checkpoint's JSON files; raises BuildError with the reason when it cannot serve it."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise BuildError(f"checkpoint {path} is not a directory")
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise BuildError(f"checkpoint {path} has no model_index.json: expected a diffusers-format Wan checkpoint "
                         "(e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers)")
    index = _read_json(index_path)
    pipeline_class = index.get("_class_name")
    if pipeline_class in LATER_KINDS:
        raise BuildError(f"checkpoint {path} is a {pipeline_class} ({LATER_KINDS[pipeline_class]}) checkpoint; "
                         "only text-to-video (WanPipeline) and image-to-video (WanImageToVideoPipeline) "
                         "checkpoints are supported so far")
    if pipeline_class not in SUPPORTED_KINDS:
        raise BuildError(f"checkpoint {path}: model_index.json names {pipeline_class!r}; expected WanPipeline or "
                         "WanImageToVideoPipeline")
    kind = SUPPORTED_KINDS[pipeline_class]
    if (index.get("transformer_2") or [None])[0] is not None:
        raise BuildError(f"checkpoint {path} has two transformers (Wan2.2 A14B experts); not supported yet")
    if index.get("expand_timesteps"):
        raise BuildError(f"checkpoint {path} uses per-token timesteps (Wan2.2 TI2V); not supported yet")
    required = REQUIRED_COMPONENTS + (IMAGE_COMPONENTS if kind == "i2v" else ())
    missing = [c for c in required if not (path / c).is_dir()]
    if missing:
        raise BuildError(f"checkpoint {path} lacks component folder(s): {', '.join(missing)}")

    transformer_config = _read_json(path / "transformer" / "config.json")
    image = {}
    if kind == "i2v":
        image = _image_configs(path, index, transformer_config)
    vae_config = _read_json(path / "vae" / "config.json")
    if vae_config.get("patch_size") is not None or vae_config.get("is_residual"):
        raise BuildError(f"checkpoint {path} uses the Wan2.2 VAE (patchified, residual); not supported yet")
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    tokenizer_file = path / "tokenizer" / "tokenizer_config.json"
    defaults_file = path / SERVING_DEFAULTS_FILE
    return Checkpoint(
        path=path,
        kind=kind,
        name=name or path.name,
        transformer_config=transformer_config,
        vae_config=vae_config,
        scheduler_config=_read_json(scheduler_file) if scheduler_file.is_file() else {},
        tokenizer_config=_read_json(tokenizer_file) if tokenizer_file.is_file() else {},
        serving_defaults_file=_read_json(defaults_file) if defaults_file.is_file() else {},
        **image,
    )


def _image_configs(path: Path, index: dict, transformer_config: dict) -> dict:
    """The i2v checks and the image encoder/processor configs (Wan2.1 I2V: CLIP ViT-H/14)."""
    if transformer_config.get("image_dim") is None:
        raise BuildError(f"checkpoint {path}: its transformer has no image_dim (no image cross-attention, as in "
                         "Wan2.2 I2V); only Wan2.1-style image-to-video checkpoints are supported so far")
    if transformer_config.get("pos_embed_seq_len") is not None:
        raise BuildError(f"checkpoint {path}: its transformer embeds two images (first-last-frame, FLF2V); "
                         "not supported yet")
    channels, latent = transformer_config.get("in_channels"), _read_json(path / "vae" / "config.json")["z_dim"]
    if channels != 2 * latent + 4:
        raise BuildError(f"checkpoint {path}: transformer in_channels {channels} is not noise {latent} + mask 4 + "
                         f"condition {latent}")
    encoder_file = path / "image_encoder" / "config.json"
    processor_file = path / "image_processor" / "preprocessor_config.json"
    for needed in (encoder_file, processor_file):
        if not needed.is_file():
            raise BuildError(f"checkpoint {path} lacks {needed.relative_to(path)}")
    encoder_config = _read_json(encoder_file)
    if encoder_config.get("hidden_size") != transformer_config["image_dim"]:
        raise BuildError(f"checkpoint {path}: image encoder hidden_size {encoder_config.get('hidden_size')} != "
                         f"transformer image_dim {transformer_config['image_dim']}")
    processor_class = (index.get("image_processor") or [None, None])[1] or "CLIPImageProcessor"
    return {"image_encoder_config": encoder_config, "image_processor_config": _read_json(processor_file),
            "image_processor_class": processor_class}


def resolve_defaults(checkpoint: Checkpoint, overrides: dict | None = None) -> ServingDefaults:
    """CLI override > the checkpoint's serving_defaults.json > scheduler flow_shift (for shift) > Wan2.1."""
    scheduler = checkpoint.scheduler_config
    shift = scheduler.get("flow_shift", scheduler.get("shift", WAN21_DEFAULTS.shift))
    defaults = replace(WAN21_DEFAULTS, shift=float(shift))
    known = {f.name for f in fields(ServingDefaults)}
    from_file = {k: v for k, v in checkpoint.serving_defaults_file.items() if k in known}
    from_cli = {k: v for k, v in (overrides or {}).items() if v is not None}
    merged = {**asdict(defaults), **from_file, **from_cli}
    typed = {f.name: (float if f.type in ("float", float) else int)(merged[f.name]) for f in fields(ServingDefaults)}
    return ServingDefaults(**typed)


def resolve_limits(checkpoint: Checkpoint, defaults: ServingDefaults, requested: dict | None = None) -> ShapeLimits:
    """CLI request > the checkpoint's serving_defaults.json > derived from the defaults and the DiT's rotary
    tables; then checks limits and defaults against each other and the checkpoint."""
    known = {f.name for f in fields(ShapeLimits)}
    from_file = {k: int(v) for k, v in checkpoint.serving_defaults_file.items() if k in known}
    requested = {**from_file, **{k: v for k, v in (requested or {}).items() if v is not None}}
    rope_side, rope_frames = checkpoint.rope_limits()
    multiple = checkpoint.size_multiple
    largest = (max(DEFAULT_MAX_SIDE, defaults.height, defaults.width) // multiple) * multiple
    limits = ShapeLimits(
        min_height=requested.get("min_height", min(DEFAULT_MIN_SIDE, defaults.height)),
        max_height=requested.get("max_height", min(largest, rope_side)),
        min_width=requested.get("min_width", min(DEFAULT_MIN_SIDE, defaults.width)),
        max_width=requested.get("max_width", min(largest, rope_side)),
        max_num_frames=requested.get("max_num_frames", min(max(DEFAULT_MAX_NUM_FRAMES, defaults.num_frames),
                                                            rope_frames)),
        max_text_length=requested.get("max_text_length", DEFAULT_MAX_TEXT_LENGTH),
        max_batch_size=requested.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE),
    )
    check_serving_shapes(checkpoint, defaults, limits)
    return limits


def check_serving_shapes(checkpoint: Checkpoint, defaults: ServingDefaults, limits: ShapeLimits) -> None:
    multiple = checkpoint.size_multiple
    temporal = checkpoint.vae_scale_factor_temporal
    rope_side, rope_frames = checkpoint.rope_limits()
    problems = []
    for name in ("min_height", "max_height", "min_width", "max_width"):
        value = getattr(limits, name)
        if value <= 0 or value % multiple:
            problems.append(f"{name} {value} is not a positive multiple of {multiple}")
    for side in ("height", "width"):
        low, high, default = getattr(limits, f"min_{side}"), getattr(limits, f"max_{side}"), getattr(defaults, side)
        if default % multiple:
            problems.append(f"default {side} {default} is not a multiple of {multiple}")
        if not low <= default <= high:
            problems.append(f"default {side} {default} is outside [min_{side} {low}, max_{side} {high}]")
        if high > rope_side:
            problems.append(f"max_{side} {high} exceeds the {rope_side} pixels the DiT's rotary tables cover")
    for name, value in (("default num_frames", defaults.num_frames), ("max_num_frames", limits.max_num_frames)):
        if value < 1 or (value - 1) % temporal:
            problems.append(f"{name} {value} is not of the form {temporal}k+1")
    if defaults.num_frames > limits.max_num_frames:
        problems.append(f"default num_frames {defaults.num_frames} exceeds max_num_frames {limits.max_num_frames}")
    if limits.max_num_frames > rope_frames:
        problems.append(f"max_num_frames {limits.max_num_frames} exceeds the {rope_frames} frames the DiT's "
                        "rotary tables cover")
    if not 1 <= defaults.num_inference_steps <= MAX_NUM_INFERENCE_STEPS:
        problems.append(f"default num_inference_steps {defaults.num_inference_steps} is outside "
                        f"[1, {MAX_NUM_INFERENCE_STEPS}]")
    if defaults.fps < 1:
        problems.append(f"default fps {defaults.fps} must be positive")
    if limits.max_text_length < 1:
        problems.append(f"max_text_length {limits.max_text_length} must be positive")
    if checkpoint.kind == "i2v" and limits.max_text_length != I2V_TEXT_LENGTH:
        problems.append(f"max_text_length {limits.max_text_length}: an image-to-video DiT takes prompts padded to "
                        f"exactly {I2V_TEXT_LENGTH} tokens (it splits image and text context there)")
    if limits.max_batch_size < 1:
        problems.append(f"max_batch_size {limits.max_batch_size} must be positive")
    if problems:
        raise BuildError("; ".join(problems))


def checkpoint_files(path: Path) -> list[Path]:
    """Every file of the checkpoint, sorted, as paths relative to it (hidden files and caches skipped)."""
    path = Path(path)
    return sorted(p.relative_to(path) for p in path.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
