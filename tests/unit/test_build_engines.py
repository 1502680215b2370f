"""export/build_engines.py end to end on the tiny checkpoint: what the repository holds, no-op re-runs,
--force, and the errors a user sees. The full build runs once per session (tests/conftest.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from export import build_engines, onnx_graphs, repository
from export.checkpoint import (WAN21_DEFAULTS, BuildError, load_checkpoint, resolve_defaults,
                               resolve_limits)
from export.tiny_checkpoint import SERVING_DEFAULTS_FILE, TINY_SERVING_DEFAULTS
from tests.conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "export" / "build_engines.py"


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


def tree(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def relocated(model_repository, tmp_path) -> Path:
    """A copy of the session's repository somewhere else: it must still be complete and up to date."""
    copy = tmp_path / "moved" / "repo"
    shutil.copytree(model_repository, copy)
    return copy


# --- what the repository holds ---------------------------------------------------------------------------

def test_repository_has_every_model_config_and_asset(model_repository):
    for name in repository.COMPONENT_MODELS:
        assert (model_repository / name / "config.pbtxt").is_file()
        assert (model_repository / name / "1" / "model.onnx").is_file()
        assert (model_repository / name / "1" / "model.py").read_bytes() == \
            repository.ONNXRUNTIME_MODEL_SOURCE.read_bytes()
    pipeline = model_repository / "wan_pipeline"
    assert (pipeline / "config.pbtxt").is_file()
    assert (pipeline / "1" / "assets" / "pipeline.json").is_file()
    assert (pipeline / "1" / "assets" / "scheduler" / "scheduler_config.json").is_file()
    assert (pipeline / "1" / "assets" / "tokenizer" / "tokenizer_config.json").is_file()
    for source in repository.pipeline_sources():  # the BLS source is copied (output is not the repo's own)
        assert (pipeline / "1" / source.name).is_file()


def test_pipeline_json_matches_the_checkpoint(model_repository, tiny_checkpoint):
    spec = json.loads((model_repository / "wan_pipeline" / "1" / "assets" / "pipeline.json").read_text())
    vae = json.loads((tiny_checkpoint / "vae" / "config.json").read_text())
    transformer = json.loads((tiny_checkpoint / "transformer" / "config.json").read_text())
    step = parse_config(model_repository / "vae_decode_step" / "config.pbtxt")
    assert set(spec) == {"text_max_length", "vae_scale_factor_spatial", "vae_scale_factor_temporal",
                         "latent_channels", "latents_mean", "latents_std", "vae_cache_count", "patch_size"}
    assert spec["latents_mean"] == vae["latents_mean"]
    assert spec["latents_std"] == vae["latents_std"]
    assert spec["latent_channels"] == vae["z_dim"] == 16
    assert spec["vae_scale_factor_spatial"] == 8 and spec["vae_scale_factor_temporal"] == 4
    assert spec["patch_size"] == transformer["patch_size"]
    assert spec["text_max_length"] == 512
    assert spec["vae_cache_count"] == 24 == len(step.input) - 1


def test_wan_pipeline_config_carries_the_checkpoint_defaults_and_limits(model_repository):
    config = parse_config(model_repository / "wan_pipeline" / "config.pbtxt")
    assert config.backend == "python" and config.max_batch_size == 0
    assert config.model_transaction_policy.decoupled
    optional = {i.name: i.optional for i in config.input}
    assert optional.pop("prompt") is False and all(optional.values())
    assert {o.name for o in config.output} == {"step", "total_steps", "video", "metadata", "frames"}
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    for key in ("height", "width", "num_frames", "num_inference_steps", "fps"):
        assert int(parameters[f"default_{key}"]) == TINY_SERVING_DEFAULTS[key]
    assert float(parameters["default_guidance_scale"]) == TINY_SERVING_DEFAULTS["guidance_scale"]
    assert float(parameters["default_shift"]) == 3.0  # the scheduler's flow_shift
    assert parameters["model_kind"] == "t2v" and parameters["backend"] == "onnxruntime"
    assert int(parameters["max_num_inference_steps"]) == 1000
    # The limits of the checkpoint's serving_defaults.json (below the 512 pixels its rotary tables cover).
    assert (parameters["min_height"], parameters["max_height"], parameters["max_width"]) == ("64", "256", "256")
    assert parameters["max_num_frames"] == "81"


def test_component_configs_declare_exactly_the_onnx_graph_io(model_repository):
    for name in repository.COMPONENT_MODELS:
        config = parse_config(model_repository / name / "config.pbtxt")
        graph = onnx.load(str(model_repository / name / "1" / "model.onnx"), load_external_data=False).graph
        assert config.name == name and config.backend == "python" and config.max_batch_size == 0
        assert [i.name for i in config.input] == [i.name for i in graph.input]
        assert [o.name for o in config.output] == [o.name for o in graph.output]
        for declared, actual in zip([*config.input, *config.output], [*graph.input, *graph.output]):
            dims = actual.type.tensor_type.shape.dim
            assert list(declared.dims) == [d.dim_value if d.HasField("dim_value") else -1 for d in dims]


def test_repository_holds_no_absolute_paths(model_repository, tiny_checkpoint):
    for path in model_repository.rglob("*"):
        if path.is_file() and path.suffix in (".pbtxt", ".json") and path.name != repository.BUILD_INFO:
            text = path.read_text(encoding="utf-8")
            assert str(tiny_checkpoint) not in text and str(model_repository) not in text, path


# --- re-runs ---------------------------------------------------------------------------------------------

def test_second_run_is_a_noop_and_fast(model_repository, tiny_checkpoint):
    before = tree(model_repository)
    start = time.monotonic()
    result = subprocess.run([sys.executable, str(SCRIPT), "--checkpoint", str(tiny_checkpoint), "--output",
                             str(model_repository), "--backend", "onnxruntime"], capture_output=True, text=True)
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout
    assert elapsed < 10  # Python start + hashing a 350 KB checkpoint; no torch import
    assert tree(model_repository) == before


def test_relocated_repository_is_complete_and_up_to_date(relocated, tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(onnx_graphs, "export_text_encoder", _must_not_export)
    assert build_engines.main(["--checkpoint", str(tiny_checkpoint), "--output", str(relocated)]) == 0
    assert "up to date" in capsys.readouterr().out


def test_changed_options_are_not_a_noop(relocated, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(onnx_graphs, "export_text_encoder", _must_not_export)
    with pytest.raises(_ExportCalled):
        build_engines.main(["--checkpoint", str(tiny_checkpoint), "--output", str(relocated),
                            "--default-num-inference-steps", "4"])


def test_force_rebuilds_and_a_failed_build_keeps_the_previous_repository(relocated, tiny_checkpoint, monkeypatch):
    before = tree(relocated)
    monkeypatch.setattr(onnx_graphs, "export_text_encoder", _must_not_export)
    with pytest.raises(_ExportCalled):
        build_engines.main(["--checkpoint", str(tiny_checkpoint), "--output", str(relocated), "--force"])
    assert tree(relocated) == before
    assert sorted(p.name for p in relocated.parent.iterdir()) == ["repo"]  # staging removed


class _ExportCalled(Exception):
    pass


def _must_not_export(*args, **kwargs):
    raise _ExportCalled


# --- errors a user sees ----------------------------------------------------------------------------------

def test_tensorrt_backend_without_gpu_fails_early_with_a_clear_message(tiny_checkpoint, tmp_path, monkeypatch):
    from export import tensorrt_engines

    if tensorrt_engines.tensorrt_unavailable_reason() is None:
        pytest.skip("TensorRT and a GPU are available here")
    monkeypatch.setattr(onnx_graphs, "export_text_encoder", _must_not_export)
    with pytest.raises(SystemExit, match="--backend tensorrt needs an NVIDIA GPU and TensorRT"):
        build_engines.main(["--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path / "repo"),
                            "--backend", "tensorrt"])
    assert not (tmp_path / "repo").exists()


def test_script_reports_a_bad_checkpoint_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--checkpoint", str(tmp_path / "missing"),
                             "--output", str(tmp_path / "repo")], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == f"build_engines: error: checkpoint {tmp_path / 'missing'} is not a directory"
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("index, message", [
    (None, "has no model_index.json"),
    ({"_class_name": "WanVideoToVideoPipeline"}, "only text-to-video"),
    ({"_class_name": "StableDiffusionPipeline"}, "expected WanPipeline"),
])
def test_unsupported_checkpoints_are_rejected_with_the_reason(tmp_path, capsys, index, message):
    if index is not None:
        (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert build_engines.main(["--checkpoint", str(tmp_path), "--output", str(tmp_path / "repo")]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--max-height", "1000"], "max_height 1000 is not a positive multiple of 16"),
    (["--max-width", "1024"], "exceeds the 512 pixels the DiT's rotary tables cover"),
    (["--default-num-frames", "18"], "default num_frames 18 is not of the form 4k+1"),
    (["--default-height", "608"], "default height 608 is outside [min_height 64, max_height 256]"),
    (["--precision", "fp16", "--backend", "onnxruntime"], "serves fp32 graphs"),
])
def test_inconsistent_options_are_rejected_before_any_export(tiny_checkpoint, tmp_path, capsys, monkeypatch,
                                                             flags, message):
    monkeypatch.setattr(onnx_graphs, "export_text_encoder", _must_not_export)
    assert build_engines.main(["--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path / "r"), *flags]) == 1
    assert message in capsys.readouterr().err


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_engines.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--checkpoint", "--output", "--backend", "--precision", "--force", "--max-height", "--max-width",
                 "--max-num-frames", "--max-text-length", "--default-height", "--default-shift", "--tolerance",
                 "--skip-check"):
        assert flag in text
    assert "onnxruntime" in text and "tensorrt" in text and "no-op" in text


# --- serving defaults ------------------------------------------------------------------------------------

def test_defaults_come_from_serving_defaults_json_then_cli(tiny_checkpoint):
    checkpoint = load_checkpoint(tiny_checkpoint)
    assert resolve_defaults(checkpoint).height == TINY_SERVING_DEFAULTS["height"]
    overridden = resolve_defaults(checkpoint, {"height": 128, "guidance_scale": 3.5, "shift": None})
    assert (overridden.height, overridden.guidance_scale, overridden.shift) == (128, 3.5, 3.0)


def test_limits_come_from_serving_defaults_json_then_cli_else_the_rotary_tables(tiny_checkpoint):
    checkpoint = load_checkpoint(tiny_checkpoint)
    defaults = resolve_defaults(checkpoint)
    assert resolve_limits(checkpoint, defaults).max_height == TINY_SERVING_DEFAULTS["max_height"]
    assert resolve_limits(checkpoint, defaults, {"max_height": 384, "max_width": None}).max_height == 384
    without_file = replace(checkpoint, serving_defaults_file={})
    # The tiny DiT's rotary tables cover 32 patches per axis: 32 x 2 x 8 = 512 pixels.
    assert resolve_limits(without_file, defaults).max_width == 512


def test_checkpoint_without_serving_defaults_gets_wan21_defaults_and_its_flow_shift(tiny_checkpoint, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, copy, ignore=shutil.ignore_patterns(SERVING_DEFAULTS_FILE, "*.safetensors"))
    scheduler = copy / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "flow_shift": 5.0}))
    defaults = resolve_defaults(load_checkpoint(copy))
    assert defaults == WAN21_DEFAULTS.__class__(**{**WAN21_DEFAULTS.__dict__, "shift": 5.0})
    with pytest.raises(BuildError, match="default width 832 is outside"):  # 480x832 does not fit the tiny DiT's rotary tables
        resolve_limits(load_checkpoint(copy), defaults)


# --- the tensorrt branch, on CPU: engine builds faked, everything else real ------------------------------

def test_tensorrt_backend_writes_plans_and_tensorrt_configs(model_repository, tiny_checkpoint, tmp_path,
                                                            monkeypatch):
    from export import tensorrt_engines

    def reuse_graph(name, onnx_dir):  # the session build's ONNX graphs instead of a second export
        target = onnx_dir / name
        target.mkdir(parents=True)
        for path in (model_repository / name / "1").glob("model.onnx*"):
            shutil.copy2(path, target / path.name)
        return target / "model.onnx"

    def text_encoder(checkpoint, onnx_dir, **_):
        return [onnx_graphs.ExportedGraph(onnx_graphs.text_encoder_spec(32), reuse_graph("text_encoder", onnx_dir), 0)]

    def dit(checkpoint, onnx_dir, **_):
        spec = onnx_graphs.dit_spec(16, 16, 32, [1, 2, 2])
        return [onnx_graphs.ExportedGraph(spec, reuse_graph("dit", onnx_dir), 0)]

    def vae(checkpoint, onnx_dir, **_):
        layout = onnx_graphs.vae_cache_layout(onnx_graphs.load_vae(checkpoint))
        specs = onnx_graphs.vae_specs(layout, 16, 8, 4)
        return onnx_graphs.VaeExport([onnx_graphs.ExportedGraph(s, reuse_graph(s.name, onnx_dir), 0) for s in specs],
                                     layout)

    engines = {}

    def build_engine(onnx_path, plan_path, profile, precision, workspace_gib):
        assert onnx_path.is_file()
        engines[plan_path.parent.parent.name] = (profile, precision)
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        plan_path.write_bytes(b"plan")

    monkeypatch.setattr(onnx_graphs, "export_text_encoder", text_encoder)
    monkeypatch.setattr(onnx_graphs, "export_dit", dit)
    monkeypatch.setattr(onnx_graphs, "export_vae", vae)
    monkeypatch.setattr(tensorrt_engines, "require_tensorrt", lambda: None)
    monkeypatch.setattr(tensorrt_engines, "build_engine", build_engine)
    output = tmp_path / "trt"
    assert build_engines.main(["--checkpoint", str(tiny_checkpoint), "--output", str(output), "--backend", "tensorrt",
                               "--max-height", "256", "--max-width", "512", "--no-progress"]) == 0

    assert {name: precision for name, (_, precision) in engines.items()} == {
        "text_encoder": "fp32", "dit": "bf16", "vae_decode_first": "fp32", "vae_decode_step": "fp32"}
    assert engines["dit"][0]["hidden_states"] == ((1, 16, 1, 8, 8), (2, 16, 5, 12, 20), (2, 16, 21, 32, 64))
    for name in repository.COMPONENT_MODELS:
        config = parse_config(output / name / "config.pbtxt")
        assert config.platform == "tensorrt_plan" and not config.backend
        assert sorted(p.name for p in (output / name / "1").iterdir()) == ["model.plan"]
        reference = parse_config(model_repository / name / "config.pbtxt")
        assert list(config.input) == list(reference.input) and list(config.output) == list(reference.output)
    pipeline = parse_config(output / "wan_pipeline" / "config.pbtxt")
    assert pipeline.parameters["backend"].string_value == "tensorrt"
    assert pipeline.parameters["max_height"].string_value == "256"
    assert not (output / ".onnx").exists()
