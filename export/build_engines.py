#!/usr/bin/env python
"""Build a Triton model repository from a diffusers Wan2.1 text-to-video or image-to-video checkpoint.

The kind comes from the checkpoint's model_index.json (WanPipeline: t2v, WanImageToVideoPipeline: i2v).
Exports the text encoder, the DiT and the VAE decoder (first-frame and step graphs with explicit
causal-conv caches) to ONNX - for i2v also the CLIP image encoder and the VAE encoder (first-frame
conditioning; first/step graphs like the decoder) - checks every graph against PyTorch at shapes other than
the traced ones, then either serves the graphs with ONNX Runtime (Triton Python backend; CPU, or CUDA when
available) or builds TensorRT engines from them. Writes every config.pbtxt and the run-time assets
(tokenizer, scheduler config, pipeline.json; i2v: image_processor), so the repository is self-contained and
can be moved.

Re-running with the same checkpoint, options and exporter source is a no-op (see build_info.json in the
output); an edited wan_pipeline BLS source is re-copied without re-exporting; --force rebuilds. An
interrupted or failed build leaves the previous repository as it was.

examples:
  python export/build_engines.py                                  # tiny random-weight model -> model_repository/
  python export/build_engines.py --tiny-kind i2v --output .cache/i2v_repository   # tiny image-to-video model
  python export/build_engines.py --checkpoint ~/Wan2.1-T2V-1.3B-Diffusers --output /srv/wan_repo \\
      --backend tensorrt --precision bf16 --max-height 480 --max-width 832
  python export/build_engines.py --checkpoint ~/Wan2.1-I2V-14B-480P-Diffusers --output /srv/wan_i2v
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import importlib.metadata
import shutil
import time
from dataclasses import asdict, dataclass

from export.checkpoint import (DEFAULT_CHECKPOINT, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_NUM_FRAMES,
                               DEFAULT_MAX_SIDE, DEFAULT_MAX_TEXT_LENGTH, DEFAULT_MIN_SIDE, REPO_ROOT,
                               TINY_CHECKPOINTS, BuildError, Checkpoint, ServingDefaults, ShapeLimits,
                               default_checkpoint, load_checkpoint, resolve_defaults, resolve_limits)
from export import repository

BACKENDS = ("onnxruntime", "tensorrt")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
VERSIONED_PACKAGES = ("torch", "diffusers", "transformers", "onnx", "onnxscript", "onnxruntime")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="build_engines.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, metavar="DIR",
                        help="diffusers-format Wan2.1 checkpoint; its model_index.json decides the kind: "
                             "WanPipeline = text-to-video (t2v), WanImageToVideoPipeline = image-to-video (i2v). "
                             f"Default: the embedded tiny random-weight checkpoint, generated into "
                             f"{DEFAULT_CHECKPOINT.relative_to(REPO_ROOT)}/ on first use")
    parser.add_argument("--tiny-kind", choices=tuple(TINY_CHECKPOINTS), default=None,
                        help="without --checkpoint: which embedded tiny random-weight checkpoint to build. t2v "
                             "(default) or i2v, a WanImageToVideoPipeline generated into "
                             f"{TINY_CHECKPOINTS['i2v'].relative_to(REPO_ROOT)}/ on first use")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "model_repository", metavar="DIR",
                        help="model repository to write (default: model_repository/ of this repo; any other "
                             "folder also gets a copy of the wan_pipeline BLS source)")
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="onnxruntime: ONNX graphs in Triton Python-backend models (CPU, or CUDA with "
                             "onnxruntime-gpu); tensorrt: TensorRT engines (platform tensorrt_plan; needs a GPU). "
                             "Default: tensorrt when a CUDA GPU and the tensorrt package are present, else "
                             "onnxruntime")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="DiT precision on the tensorrt backend (auto = bf16); the text encoder (umT5 "
                             "overflows fp16), the VAE and (i2v) the image encoder stay fp32. The onnxruntime backend is fp32 "
                             "only")
    parser.add_argument("--model-name", default=None,
                        help="name reported by the wan_pipeline model (default: the checkpoint folder's name)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")

    limits = parser.add_argument_group(
        "shape limits", "what requests may ask for; TensorRT optimisation profiles span min..max with opt at the "
                        "defaults. Heights/widths: multiples of 16 (VAE 8 x patch 2); frames: 4k+1. A limit left "
                        "out comes from the checkpoint's serving_defaults.json if it has one, else as said")
    limits.add_argument("--min-height", type=int, metavar="PX", help=f"(default {DEFAULT_MIN_SIDE})")
    limits.add_argument("--max-height", type=int, metavar="PX",
                        help=f"(default {DEFAULT_MAX_SIDE}, or less if the DiT's rotary tables cover less)")
    limits.add_argument("--min-width", type=int, metavar="PX", help=f"(default {DEFAULT_MIN_SIDE})")
    limits.add_argument("--max-width", type=int, metavar="PX",
                        help=f"(default {DEFAULT_MAX_SIDE}, or less if the DiT's rotary tables cover less)")
    limits.add_argument("--max-num-frames", type=int, metavar="N", help=f"(default {DEFAULT_MAX_NUM_FRAMES})")
    limits.add_argument("--max-text-length", type=int, metavar="TOKENS",
                        help=f"prompt tokens; prompts are padded to it (default {DEFAULT_MAX_TEXT_LENGTH})")
    limits.add_argument("--max-batch-size", type=int, metavar="N",
                        help=f"text encoder / DiT batch: 2 with classifier-free guidance "
                             f"(default {DEFAULT_MAX_BATCH_SIZE})")

    defaults = parser.add_argument_group(
        "serving defaults", "what a request gets for a field it leaves out. Default: the checkpoint's "
                            "serving_defaults.json if it has one, else Wan2.1's 480x832, 81 frames, 50 steps, "
                            "guidance 5.0, fps 16; shift: the scheduler config's flow_shift")
    defaults.add_argument("--default-height", type=int, metavar="PX")
    defaults.add_argument("--default-width", type=int, metavar="PX")
    defaults.add_argument("--default-num-frames", type=int, metavar="N")
    defaults.add_argument("--default-num-inference-steps", type=int, metavar="N")
    defaults.add_argument("--default-guidance-scale", type=float, metavar="G")
    defaults.add_argument("--default-shift", type=float, metavar="S")
    defaults.add_argument("--default-fps", type=int, metavar="FPS")

    export = parser.add_argument_group("export and checks")
    export.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    export.add_argument("--tolerance", type=float, default=1e-3,
                        help="fail when a graph's max abs difference from PyTorch exceeds this x max(1, max|PyTorch "
                             "output|) (default 1e-3)")
    export.add_argument("--skip-check", action="store_true",
                        help="do not run the graphs against PyTorch (saves time and memory on large checkpoints)")
    export.add_argument("--workspace-gib", type=float, default=8.0,
                        help="TensorRT builder workspace limit in GiB (default 8)")
    export.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def resolve_backend(requested: str | None) -> str:
    if requested is not None:
        return requested
    from export.tensorrt_engines import tensorrt_available

    return "tensorrt" if tensorrt_available() else "onnxruntime"


def resolve_precisions(backend: str, precision: str, kind: str = "t2v") -> dict[str, str]:
    if backend == "onnxruntime":
        if precision not in ("auto", "fp32"):
            raise BuildError(f"--precision {precision} applies to the tensorrt backend; the onnxruntime backend "
                             "serves fp32 graphs")
        return {name: "fp32" for name in repository.component_models(kind)}
    from export.tensorrt_engines import component_precisions

    return component_precisions(precision, kind)


def package_versions() -> dict[str, str]:
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _pick(args: argparse.Namespace, prefix: str, names: list[str]) -> dict:
    return {name: getattr(args, f"{prefix}{name}") for name in names}


@dataclass
class BuildPlan:
    """Everything a build is decided by; `digest` fingerprints it."""

    checkpoint: Checkpoint
    defaults: ServingDefaults
    limits: ShapeLimits
    backend: str
    precisions: dict
    output: Path
    copy_source: bool
    options: dict
    checkpoint_record: dict
    digest: str


def plan_build(args: argparse.Namespace) -> BuildPlan:
    """Checkpoint, defaults, limits and backend, all checked before anything slow happens."""
    if args.checkpoint is not None and args.tiny_kind is not None:
        raise BuildError("--tiny-kind picks an embedded tiny checkpoint; with --checkpoint the kind comes from its "
                         "model_index.json - give one or the other")
    checkpoint = load_checkpoint(args.checkpoint if args.checkpoint is not None
                                 else default_checkpoint(args.tiny_kind or "t2v"), args.model_name)
    defaults = resolve_defaults(checkpoint, _pick(args, "default_", [
        "height", "width", "num_frames", "num_inference_steps", "guidance_scale", "shift", "fps"]))
    limits = resolve_limits(checkpoint, defaults, _pick(args, "", [
        "min_height", "max_height", "min_width", "max_width", "max_num_frames", "max_text_length",
        "max_batch_size"]))
    backend = resolve_backend(args.backend)
    precisions = resolve_precisions(backend, args.precision, checkpoint.kind)
    if backend == "tensorrt":
        from export.tensorrt_engines import require_tensorrt

        require_tensorrt()  # before minutes of export, not after

    output = args.output.expanduser().resolve()
    copy_source = repository.copies_pipeline_source(output)
    options = {"backend": backend, "precisions": precisions, "defaults": asdict(defaults),
               "limits": asdict(limits), "model_name": checkpoint.name, "model_kind": checkpoint.kind,
               "opset": args.opset, "versions": package_versions()}
    if backend == "tensorrt":
        options["workspace_gib"] = args.workspace_gib
    checkpoint_record = repository.hash_checkpoint(checkpoint.path,
                                                   repository.read_build_info(output).get("checkpoint_files"))
    digest = repository.fingerprint(checkpoint_record, options, repository.source_hash())
    return BuildPlan(checkpoint, defaults, limits, backend, precisions, output, copy_source, options,
                     checkpoint_record, digest)


def build(args: argparse.Namespace) -> int:
    started = time.monotonic()
    plan = plan_build(args)
    up_to_date = (f"{plan.output} is up to date ({plan.checkpoint.path.name}, {plan.backend}); nothing to do "
                  "(--force rebuilds)")
    if not args.force and repository.is_up_to_date(plan.output, plan.digest) and \
            repository.pipeline_source_is_current(plan.output, plan.copy_source):
        print(up_to_date)
        return 0
    with repository.build_lock(plan.output, on_wait=lambda: print(f"waiting for another build of {plan.output}")):
        if not args.force and repository.is_up_to_date(plan.output, plan.digest):  # maybe the other build made it
            if repository.pipeline_source_is_current(plan.output, plan.copy_source):
                print(up_to_date)
            else:  # only the BLS source changed: no graph needs re-exporting
                copied = repository.refresh_pipeline_source(plan.output)
                print(f"{plan.output}: graphs up to date; copied the changed {repository.PIPELINE_MODEL} source "
                      f"({', '.join(copied)})")
            return 0
        repository.remove_stale_staging(plan.output)
        export_and_install(args, plan)
    models = repository.component_models(plan.checkpoint.kind)
    print(f"wrote {plan.output} ({plan.checkpoint.kind}, {plan.backend}: {', '.join(models)}, "
          f"{repository.PIPELINE_MODEL}) in {time.monotonic() - started:.0f} s")
    return 0


def export_and_install(args: argparse.Namespace, plan: BuildPlan) -> None:
    """Export and check the graphs, (build engines), write configs and assets, install: all in a staging
    folder first, so a failure at any point leaves the output as it was."""
    started = time.monotonic()
    checkpoint, defaults, limits, backend, precisions = (plan.checkpoint, plan.defaults, plan.limits, plan.backend,
                                                         plan.precisions)
    output, copy_source = plan.output, plan.copy_source
    if copy_source and not repository.pipeline_sources():
        print(f"warning: {repository.PIPELINE_SOURCE_DIR} has no .py files; wan_pipeline will not load")

    from tqdm import tqdm

    from export import onnx_graphs

    print(f"building {output} from {checkpoint.path} ({checkpoint.kind}, {backend}; "
          f"limits {limits.max_height}x{limits.max_width}x{limits.max_num_frames}f)")
    spatial, temporal = checkpoint.vae_scale_factor_spatial, checkpoint.vae_scale_factor_temporal
    graphs: dict[str, onnx_graphs.ExportedGraph] = {}
    vae_result: list[onnx_graphs.VaeExport] = []
    vae_encoder_result: list[onnx_graphs.VaeEncoderExport] = []
    models = repository.component_models(checkpoint.kind)

    with repository.staging_dir(output) as staging:
        onnx_dir = staging / ".onnx"
        common = dict(onnx_dir=onnx_dir, limits=limits, spatial=spatial, temporal=temporal, opset=args.opset,
                      tolerance=args.tolerance, check=not args.skip_check)

        def export(function):
            def stage():
                result = function(checkpoint.path, **common)
                vae = result if isinstance(result, onnx_graphs.VaeExport) else None
                encoder = result if isinstance(result, onnx_graphs.VaeEncoderExport) else None
                for graph in (vae.graphs if vae else encoder.graphs if encoder else result):
                    graphs[graph.spec.name] = graph
                    check = (f"; ONNX Runtime vs PyTorch at {graph.checked_at}: max abs diff "
                             f"{graph.max_abs_diff:.2e} ({graph.check_seconds:.1f} s)"
                             if graph.max_abs_diff is not None else "; not checked")
                    progress.write(f"  {graph.spec.name}: exported in {graph.export_seconds:.1f} s{check}")
                if vae:
                    vae_result.append(vae)
                    if vae.decode_max_abs_diff is not None:
                        progress.write(f"  vae_decode_first + {onnx_graphs.CHECK_VAE_LATENT_FRAMES - 1} x "
                                       "vae_decode_step vs AutoencoderKLWan.decode: max abs diff "
                                       f"{vae.decode_max_abs_diff:.2e}")
                if encoder:
                    vae_encoder_result.append(encoder)
                    if encoder.encode_max_abs_diff is not None:
                        progress.write(f"  vae_encode_first + {onnx_graphs.CHECK_VAE_LATENT_FRAMES - 1} x "
                                       "vae_encode_step vs AutoencoderKLWan.encode (mean): max abs diff "
                                       f"{encoder.encode_max_abs_diff:.2e}")
            return stage

        def engine(name):
            def stage():
                from export import tensorrt_engines as trt

                sizes = trt.profile_sizes(defaults, limits, spatial, temporal)
                profile = trt.optimization_profile(graphs[name].spec, sizes)
                start = time.monotonic()
                trt.build_engine(graphs[name].path, staging / name / "1" / "model.plan", profile, precisions[name],
                                 args.workspace_gib)
                repository.write_text(staging / name / "config.pbtxt",
                                      trt.tensorrt_config(graphs[name].spec, precisions[name]))
                progress.write(f"  {name}: TensorRT {precisions[name]} engine in {time.monotonic() - start:.1f} s")
            return stage

        def write_models():
            if backend == "onnxruntime":
                for name in models:
                    repository.write_onnxruntime_model(staging / name, graphs[name].spec, onnx_dir / name)
            shutil.rmtree(onnx_dir, ignore_errors=True)
            repository.write_pipeline_model(
                staging / repository.PIPELINE_MODEL, checkpoint, defaults, limits, backend,
                len(vae_result[0].cache_layout), copy_source,
                len(vae_encoder_result[0].cache_layout) if vae_encoder_result else None)

        stages = [("text encoder", export(onnx_graphs.export_text_encoder)), ("DiT", export(onnx_graphs.export_dit)),
                  ("VAE decoder", export(onnx_graphs.export_vae))]
        if checkpoint.kind == "i2v":
            stages += [("image encoder", export(onnx_graphs.export_image_encoder)),
                       ("VAE encoder", export(onnx_graphs.export_vae_encoder))]
        if backend == "tensorrt":
            stages += [(f"engine {name}", engine(name)) for name in models]
        stages.append(("configs and assets", write_models))

        progress = tqdm(stages, desc="build", unit="stage", disable=args.no_progress or None, file=sys.stderr,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")
        for label, stage in progress:
            progress.set_description(label)
            stage()
        progress.close()

        if copy_source:
            entries = [*models, repository.PIPELINE_MODEL]
        else:  # leave the committed BLS source where it is
            entries = [*models, f"{repository.PIPELINE_MODEL}/config.pbtxt", f"{repository.PIPELINE_MODEL}/1/assets"]
        build_info = {
            "fingerprint": plan.digest,
            "checkpoint": str(checkpoint.path),
            "checkpoint_files": plan.checkpoint_record,
            "options": plan.options,
            "graphs": {name: {"export_seconds": round(g.export_seconds, 2), "max_abs_diff": g.max_abs_diff,
                              "checked_at": g.checked_at} for name, g in graphs.items()},
            "vae_decode_max_abs_diff": vae_result[0].decode_max_abs_diff,
            "build_seconds": round(time.monotonic() - started, 1),
            **repository.pipeline_source_record(copy_source),
        }
        if vae_encoder_result:
            build_info["vae_encode_max_abs_diff"] = vae_encoder_result[0].encode_max_abs_diff
        repository.install(staging, output, entries, build_info)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return build(args)
    except BuildError as error:
        print(f"build_engines: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
