"""Writing the model repository: every config.pbtxt, the run-time assets, the BLS source, the build fingerprint,
and an all-or-nothing install (docs/DESIGN.md is the contract for every name written here).

Nothing here imports torch: a no-op re-run decides from the fingerprint alone, in well under a second.
The fingerprint covers what the graphs are made from (checkpoint, options, exporter source); the copied BLS
source is hashed separately, so editing model_repository/wan_pipeline/1/*.py re-copies those files instead
of re-exporting every graph.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from export.checkpoint import (MAX_IMAGE_PIXELS, MAX_NUM_INFERENCE_STEPS, REPO_ROOT, Checkpoint, ServingDefaults,
                               ShapeLimits,                                checkpoint_files)

COMPONENT_MODELS = ("text_encoder", "dit", "vae_decode_first", "vae_decode_step")  # text-to-video
IMAGE_COMPONENT_MODELS = ("image_encoder", "vae_encode_first", "vae_encode_step")  # what image-to-video adds
PIPELINE_MODEL = "wan_pipeline"
BUILD_INFO = "build_info.json"
ONNXRUNTIME_MODEL_SOURCE = Path(__file__).resolve().parent / "onnxruntime_model.py"
REPO_MODEL_REPOSITORY = REPO_ROOT / "model_repository"
PIPELINE_SOURCE_DIR = REPO_MODEL_REPOSITORY / PIPELINE_MODEL / "1"
EXPORTER_SOURCE_DIR = Path(__file__).resolve().parent

# wan_pipeline's request inputs (all shape [1]; all but prompt optional) and responses: docs/DESIGN.md.
PIPELINE_INPUTS = (("prompt", "BYTES"), ("negative_prompt", "BYTES"), ("seed", "INT64"),
                   ("num_inference_steps", "INT32"), ("num_frames", "INT32"), ("height", "INT32"),
                   ("width", "INT32"), ("fps", "INT32"), ("guidance_scale", "FP32"), ("shift", "FP32"),
                   ("return_frames", "BOOL"))
# The optional conditioning image (RGB, any size; required by i2v models, refused by t2v ones).
IMAGE_INPUT = ("image", "UINT8", [-1, -1, 3])
PIPELINE_OUTPUTS = (("step", "INT32", [1]), ("total_steps", "INT32", [1]), ("video", "BYTES", [1]),
                    ("metadata", "BYTES", [1]), ("frames", "UINT8", [-1, -1, -1, 3]))


# --------------------------------------------------------------------------------------------------------
# config.pbtxt text


def component_models(kind: str) -> tuple[str, ...]:
    """The component models a repository of `kind` ("t2v", "i2v") holds besides wan_pipeline."""
    return COMPONENT_MODELS + (IMAGE_COMPONENT_MODELS if kind == "i2v" else ())


def _triton_type(dtype: str) -> str:
    return "TYPE_STRING" if dtype == "BYTES" else f"TYPE_{dtype}"


def tensor_block(name: str, dtype: str, dims: list[int], optional: bool = False) -> str:
    lines = [f'    name: "{name}"', f"    data_type: {_triton_type(dtype)}", f"    dims: [ {', '.join(map(str, dims))} ]"]
    if optional:
        lines.append("    optional: true")
    return "  {\n" + "\n".join(lines) + "\n  }"


def io_section(keyword: str, blocks: list[str]) -> str:
    return f"{keyword} [\n" + ",\n".join(blocks) + "\n]\n"


def _quote(value) -> str:
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def parameters_section(parameters: dict) -> str:
    return "".join(f"parameters {{ key: {_quote(key)} value: {{ string_value: {_quote(value)} }} }}\n"
                   for key, value in parameters.items())


def spec_io(spec) -> str:
    """input/output sections of a GraphSpec (export/onnx_graphs.py), identical on every backend."""
    return (io_section("input", [tensor_block(t.name, t.dtype, t.triton_dims) for t in spec.inputs])
            + io_section("output", [tensor_block(t.name, t.dtype, t.triton_dims) for t in spec.outputs]))


def onnxruntime_config(spec, intra_op_num_threads: int = 0) -> str:
    """A component served by export/onnxruntime_model.py. No instance_group: Triton then places one
    instance per GPU when there are GPUs (the model then uses ONNX Runtime's CUDA provider) and one on CPU else."""
    return (f'name: "{spec.name}"\nbackend: "python"\nmax_batch_size: 0\n'
            + spec_io(spec)
            + parameters_section({"onnx_file": "model.onnx", "intra_op_num_threads": intra_op_num_threads}))


def pipeline_parameters(checkpoint: Checkpoint, defaults: ServingDefaults, limits: ShapeLimits,
                        backend: str) -> dict:
    parameters = {
        "default_height": defaults.height,
        "default_width": defaults.width,
        "default_num_frames": defaults.num_frames,
        "default_num_inference_steps": defaults.num_inference_steps,
        "default_guidance_scale": defaults.guidance_scale,
        "default_shift": defaults.shift,
        "default_fps": defaults.fps,
        "min_height": limits.min_height,
        "max_height": limits.max_height,
        "min_width": limits.min_width,
        "max_width": limits.max_width,
        "max_num_frames": limits.max_num_frames,
        "max_num_inference_steps": MAX_NUM_INFERENCE_STEPS,
        "model_name": checkpoint.name,
        "model_kind": checkpoint.kind,
        "backend": backend,
    }
    if checkpoint.kind == "i2v":
        parameters["max_image_pixels"] = MAX_IMAGE_PIXELS
    return parameters


def pipeline_config(checkpoint: Checkpoint, defaults: ServingDefaults, limits: ShapeLimits, backend: str) -> str:
    inputs = [tensor_block(name, dtype, [1], optional=name != "prompt") for name, dtype in PIPELINE_INPUTS]
    inputs.append(tensor_block(*IMAGE_INPUT, optional=True))
    outputs = [tensor_block(name, dtype, dims) for name, dtype, dims in PIPELINE_OUTPUTS]
    return (f'name: "{PIPELINE_MODEL}"\nbackend: "python"\nmax_batch_size: 0\n'
            "model_transaction_policy { decoupled: true }\n"
            + io_section("input", inputs) + io_section("output", outputs)
            + "instance_group [ { kind: KIND_CPU count: 1 } ]\n"
            + parameters_section(pipeline_parameters(checkpoint, defaults, limits, backend)))


# --------------------------------------------------------------------------------------------------------
# Run-time assets of wan_pipeline


def pipeline_json(checkpoint: Checkpoint, limits: ShapeLimits, vae_cache_count: int,
                  vae_encode_cache_count: int | None = None) -> dict:
    vae = checkpoint.vae_config
    spec = {
        "text_max_length": limits.max_text_length,
        "vae_scale_factor_spatial": checkpoint.vae_scale_factor_spatial,
        "vae_scale_factor_temporal": checkpoint.vae_scale_factor_temporal,
        "latent_channels": checkpoint.latent_channels,
        "latents_mean": [float(v) for v in vae["latents_mean"]],
        "latents_std": [float(v) for v in vae["latents_std"]],
        "vae_cache_count": vae_cache_count,
        "patch_size": checkpoint.patch_size,
    }
    if checkpoint.kind == "i2v":
        spec["vae_encode_cache_count"] = vae_encode_cache_count
        spec["image_processor_class"] = checkpoint.image_processor_class
    return spec


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def write_pipeline_model(model_dir: Path, checkpoint: Checkpoint, defaults: ServingDefaults, limits: ShapeLimits,
                         backend: str, vae_cache_count: int, copy_source: bool,
                         vae_encode_cache_count: int | None = None) -> None:
    """wan_pipeline/: config.pbtxt, 1/assets/{tokenizer/, scheduler/, pipeline.json, i2v: image_processor/},
    and the BLS source."""
    write_text(model_dir / "config.pbtxt", pipeline_config(checkpoint, defaults, limits, backend))
    assets = model_dir / "1" / "assets"
    shutil.copytree(checkpoint.path / "tokenizer", assets / "tokenizer")
    shutil.copytree(checkpoint.path / "scheduler", assets / "scheduler")
    if checkpoint.kind == "i2v":
        shutil.copytree(checkpoint.path / "image_processor", assets / "image_processor")
    write_text(assets / "pipeline.json",
               json.dumps(pipeline_json(checkpoint, limits, vae_cache_count, vae_encode_cache_count), indent=2)
               + "\n")
    if copy_source:
        for source in pipeline_sources():
            shutil.copy2(source, model_dir / "1" / source.name)


def write_onnxruntime_model(model_dir: Path, spec, onnx_dir: Path) -> None:
    """<model>/config.pbtxt and <model>/1/{model.py, model.onnx[, model.onnx.data]}."""
    version = model_dir / "1"
    version.parent.mkdir(parents=True, exist_ok=True)
    os.rename(onnx_dir, version)  # the graph and its external data keep their relative names
    shutil.copy2(ONNXRUNTIME_MODEL_SOURCE, version / "model.py")
    write_text(model_dir / "config.pbtxt", onnxruntime_config(spec))


def pipeline_sources() -> list[Path]:
    return sorted(PIPELINE_SOURCE_DIR.glob("*.py"))


def copies_pipeline_source(output: Path) -> bool:
    """The repo's own model_repository already holds the committed BLS source; any other output gets a copy."""
    return Path(output).resolve() != REPO_MODEL_REPOSITORY.resolve()


# --------------------------------------------------------------------------------------------------------
# Fingerprint: a re-run with the same checkpoint, options and exporter source is a no-op


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_checkpoint(path: Path, previous: dict | None = None) -> dict:
    """{relative path: {size, mtime_ns, sha256}}; a file whose size and mtime match `previous` keeps its hash,
    so a no-op check on a multi-GB checkpoint does not re-read it."""
    previous = previous or {}
    record = {}
    for relative in checkpoint_files(path):
        stat = (path / relative).stat()
        key = relative.as_posix()
        old = previous.get(key, {})
        if old.get("size") == stat.st_size and old.get("mtime_ns") == stat.st_mtime_ns and "sha256" in old:
            record[key] = old
        else:
            record[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": _sha256_file(path / relative)}
    return record


def _hash_sources(sources: list[Path]) -> str:
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    return digest.hexdigest()


def source_hash() -> str:
    """The exporter's own source: what the graphs, configs and assets are made by (part of the fingerprint)."""
    return _hash_sources(sorted(EXPORTER_SOURCE_DIR.glob("*.py")))


def pipeline_source_hash() -> str:
    """The BLS source copied into an output; not part of the fingerprint (see `refresh_pipeline_source`)."""
    return _hash_sources(pipeline_sources())


def fingerprint(checkpoint_record: dict, options: dict, sources: str) -> str:
    checkpoint_digest = {key: value["sha256"] for key, value in checkpoint_record.items()}
    payload = json.dumps({"checkpoint": checkpoint_digest, "options": options, "sources": sources}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def read_build_info(output: Path) -> dict:
    try:
        return json.loads((Path(output) / BUILD_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def is_up_to_date(output: Path, digest: str) -> bool:
    """The graphs, configs and assets are what `digest` describes (the copied BLS source may still be stale)."""
    info = read_build_info(output)
    return info.get("fingerprint") == digest and all((Path(output) / p).exists() for p in info.get("entries", []))


def pipeline_source_is_current(output: Path, copy_source: bool) -> bool:
    if not copy_source:
        return True  # the repo's own model_repository holds the committed source itself
    return read_build_info(output).get("pipeline_source") == pipeline_source_hash()


def pipeline_source_record(copy_source: bool) -> dict:
    """What build_info.json records about the copied BLS source."""
    if not copy_source:
        return {}
    return {"pipeline_source": pipeline_source_hash(), "pipeline_source_files": [p.name for p in pipeline_sources()]}


def refresh_pipeline_source(output: Path) -> list[str]:
    """Copies the BLS source into an up-to-date `output` (call with the build lock held): each file is written
    beside its target and renamed over it; files an earlier copy installed that the source no longer has are
    removed. build_info.json is rewritten last. Returns the names copied."""
    output = Path(output).resolve()
    version_dir = output / PIPELINE_MODEL / "1"
    info = read_build_info(output)
    sources = pipeline_sources()
    for source in sources:
        partial = version_dir / f".{source.name}.tmp"
        shutil.copy2(source, partial)
        os.replace(partial, version_dir / source.name)
    for gone in set(info.get("pipeline_source_files", [])) - {p.name for p in sources}:
        (version_dir / gone).unlink(missing_ok=True)
    info.update(pipeline_source_record(True))
    write_text(output / f".{BUILD_INFO}.tmp", json.dumps(info, indent=2) + "\n")
    os.replace(output / f".{BUILD_INFO}.tmp", output / BUILD_INFO)
    return [p.name for p in sources]


# --------------------------------------------------------------------------------------------------------
# All-or-nothing install


@contextmanager
def build_lock(output: Path, on_wait=None):
    """One build per output at a time (test sessions and developers share .cache/): a second build waits,
    then finds the repository up to date. The lock file lives in the temp dir, not beside the output."""
    key = hashlib.sha256(str(Path(output).resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"wan-build-{key}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def remove_stale_staging(output: Path) -> None:
    """Scratch folders of builds that were killed (call with the build lock held: none is running)."""
    output = Path(output).resolve()
    for stale in output.parent.glob(f".{output.name}.building.*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in output.parent.glob(f".{output.name}.old.*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def staging_dir(output: Path):
    """A scratch folder beside `output` (same file system, so installing is renames); always removed."""
    output = Path(output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.building.", dir=output.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def install(staging: Path, output: Path, entries: list[str], build_info: dict) -> None:
    """Moves `entries` (paths relative to `staging`) into `output`, replacing what was there; anything else in
    `output` (e.g. the committed BLS source) stays. build_info.json goes last and is removed first, so an
    interrupted install is never mistaken for a finished one: the next run rebuilds."""
    output = Path(output).resolve()
    info_path = output / BUILD_INFO
    build_info = {**build_info, "entries": list(entries)}
    if not output.exists():
        write_text(staging / BUILD_INFO, json.dumps(build_info, indent=2) + "\n")
        try:
            os.rename(staging, output)
            return
        except OSError:  # created meanwhile: install entry by entry below
            (staging / BUILD_INFO).unlink()
    info_path.unlink(missing_ok=True)
    trash = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", dir=output.parent))
    try:
        for index, entry in enumerate(entries):
            target = output / entry
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists() or target.is_symlink():
                os.rename(target, trash / str(index))
            os.rename(staging / entry, target)
        write_text(output / f".{BUILD_INFO}.tmp", json.dumps(build_info, indent=2) + "\n")
        os.replace(output / f".{BUILD_INFO}.tmp", info_path)
    finally:
        shutil.rmtree(trash, ignore_errors=True)
