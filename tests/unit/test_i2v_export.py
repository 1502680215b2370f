"""Image-to-video on the export side: the tiny WanImageToVideoPipeline checkpoint, what build_engines.py detects
and writes for it (graphs, configs, assets, TensorRT profiles and configs on CPU), the errors a user sees -
and, while here, that an edited BLS source is re-copied without re-exporting the graphs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from export import build_engines, checkpoint, onnx_graphs, repository
from export import tensorrt_engines as trt
from export.checkpoint import (BuildError, ServingDefaults, ShapeLimits, load_checkpoint, resolve_defaults,
                               resolve_limits)


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


def file_digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def tree(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


class _ExportCalled(Exception):
    pass


def _must_not_export(*args, **kwargs):
    raise _ExportCalled


@pytest.fixture
def no_export(monkeypatch):
    for name in ("export_text_encoder", "export_dit", "export_vae", "export_image_encoder", "export_vae_encoder"):
        monkeypatch.setattr(onnx_graphs, name, _must_not_export)


# --- the tiny i2v checkpoint -----------------------------------------------------------------------------

def test_tiny_i2v_checkpoint_is_a_wan_image_to_video_pipeline(tiny_checkpoint_i2v, wan_i2v_pipeline):
    index = json.loads((tiny_checkpoint_i2v / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline"
    assert index["image_encoder"] == ["transformers", "CLIPVisionModel"]
    assert index["image_processor"] == ["transformers", "CLIPImageProcessor"]
    transformer = wan_i2v_pipeline.transformer.config
    assert (transformer.in_channels, transformer.out_channels, transformer.image_dim) == (36, 16, 32)
    assert wan_i2v_pipeline.image_encoder.config.hidden_size == transformer.image_dim
    assert wan_i2v_pipeline.image_processor.crop_size == {"height": 32, "width": 32}
    assert (tiny_checkpoint_i2v / checkpoint.SERVING_DEFAULTS_FILE).is_file()


def test_tiny_i2v_checkpoint_is_deterministic(tiny_checkpoint_i2v, tmp_path):
    from export.tiny_checkpoint import write_tiny_checkpoint

    again = write_tiny_checkpoint(tmp_path / "again", kind="i2v")
    assert file_digests(again) == file_digests(tiny_checkpoint_i2v)


def test_tiny_i2v_shares_the_t2v_text_encoder_and_vae(tiny_checkpoint, tiny_checkpoint_i2v):
    for component in ("text_encoder", "vae", "tokenizer", "scheduler"):
        assert file_digests(tiny_checkpoint / component) == file_digests(tiny_checkpoint_i2v / component), component


def test_default_checkpoint_generates_the_i2v_kind_on_first_use(tmp_path, monkeypatch):
    target = tmp_path / "tiny_checkpoint_i2v"
    monkeypatch.setitem(checkpoint.TINY_CHECKPOINTS, "i2v", target)
    assert checkpoint.default_checkpoint("i2v") == target
    assert load_checkpoint(target).kind == "i2v"
    assert [p.name for p in tmp_path.iterdir()] == ["tiny_checkpoint_i2v"]  # no staging left behind
    with pytest.raises(BuildError, match="no embedded tiny checkpoint of kind 'v2v'"):
        checkpoint.default_checkpoint("v2v")


# --- detection and checks --------------------------------------------------------------------------------

def test_kind_comes_from_model_index(tiny_checkpoint, tiny_checkpoint_i2v):
    described = load_checkpoint(tiny_checkpoint_i2v)
    assert (load_checkpoint(tiny_checkpoint).kind, described.kind) == ("t2v", "i2v")
    assert (described.image_size, described.image_tokens, described.image_embed_dim) == (32, 17, 32)
    assert described.image_processor_class == "CLIPImageProcessor"


def _edited_copy(source: Path, target: Path, edit) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors"))
    edit(target)
    return target


def _edit_json(path: Path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("edit, message", [
    (lambda p: shutil.rmtree(p / "image_encoder"), "lacks component folder(s): image_encoder"),
    (lambda p: _edit_json(p / "transformer" / "config.json", image_dim=None), "has no image_dim"),
    (lambda p: _edit_json(p / "transformer" / "config.json", pos_embed_seq_len=34), "first-last-frame"),
    (lambda p: _edit_json(p / "transformer" / "config.json", in_channels=16), "in_channels 16 is not noise 16"),
    (lambda p: _edit_json(p / "image_encoder" / "config.json", hidden_size=64), "image encoder hidden_size 64"),
    (lambda p: _edit_json(p / "model_index.json", _class_name="WanVideoToVideoPipeline"), "video-to-video"),
], ids=["no-image-encoder", "wan22-style-dit", "flf2v", "t2v-dit", "clip-width", "v2v"])
def test_unsupported_i2v_checkpoints_are_rejected_with_the_reason(tiny_checkpoint_i2v, tmp_path, capsys, edit,
                                                                  message):
    copy = _edited_copy(tiny_checkpoint_i2v, tmp_path / "ckpt", edit)
    assert build_engines.main(["--checkpoint", str(copy), "--output", str(tmp_path / "repo")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


def test_i2v_needs_prompts_padded_to_512_tokens(tiny_checkpoint_i2v):
    described = load_checkpoint(tiny_checkpoint_i2v)
    with pytest.raises(BuildError, match="max_text_length 256: an image-to-video DiT takes prompts padded to "
                                         "exactly 512 tokens"):
        resolve_limits(described, resolve_defaults(described), {"max_text_length": 256})


def test_tiny_kind_picks_the_embedded_i2v_checkpoint(tiny_checkpoint_i2v, tmp_path, monkeypatch, no_export):
    monkeypatch.setitem(checkpoint.TINY_CHECKPOINTS, "i2v", tiny_checkpoint_i2v)
    plan = build_engines.plan_build(build_engines.parse_args(["--tiny-kind", "i2v", "--output", str(tmp_path / "r")]))
    assert plan.checkpoint.path == tiny_checkpoint_i2v and plan.checkpoint.kind == "i2v"
    assert set(plan.precisions) == set(repository.component_models("i2v"))


def test_tiny_kind_and_checkpoint_together_are_refused(tiny_checkpoint_i2v, tmp_path, capsys, no_export):
    assert build_engines.main(["--tiny-kind", "i2v", "--checkpoint", str(tiny_checkpoint_i2v), "--output",
                               str(tmp_path / "r")]) == 1
    assert "give one or the other" in capsys.readouterr().err


def test_help_documents_the_tiny_kind_and_image_to_video(capsys):
    with pytest.raises(SystemExit):
        build_engines.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--tiny-kind" in text and "{t2v,i2v}" in text and "WanImageToVideoPipeline" in text


# --- the i2v repository ----------------------------------------------------------------------------------

def test_i2v_repository_has_the_image_models_and_assets(model_repository_i2v, tiny_checkpoint_i2v):
    for name in repository.component_models("i2v"):
        config = parse_config(model_repository_i2v / name / "config.pbtxt")
        graph = onnx.load(str(model_repository_i2v / name / "1" / "model.onnx"), load_external_data=False).graph
        assert [i.name for i in config.input] == [i.name for i in graph.input], name
        assert [o.name for o in config.output] == [o.name for o in graph.output], name
    assets = model_repository_i2v / "wan_pipeline" / "1" / "assets"
    assert file_digests(assets / "image_processor") == file_digests(tiny_checkpoint_i2v / "image_processor")
    spec = json.loads((assets / "pipeline.json").read_text())
    assert spec["vae_encode_cache_count"] == 16 == len(parse_config(model_repository_i2v / "vae_encode_step"
                                                                    / "config.pbtxt").input) - 1
    assert spec["image_processor_class"] == "CLIPImageProcessor" and spec["text_max_length"] == 512
    dit = parse_config(model_repository_i2v / "dit" / "config.pbtxt")
    assert [(i.name, list(i.dims)) for i in dit.input] == [
        ("hidden_states", [-1, 36, -1, -1, -1]), ("timestep", [-1]), ("encoder_hidden_states", [-1, 512, 32]),
        ("encoder_hidden_states_image", [-1, 17, 32])]
    info = json.loads((model_repository_i2v / repository.BUILD_INFO).read_text())
    assert info["vae_encode_max_abs_diff"] < 1e-4 and info["graphs"]["image_encoder"]["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_wan_pipeline_takes_an_optional_rgb_image_and_says_its_kind(model_repository, model_repository_i2v, kind):
    config = parse_config((model_repository if kind == "t2v" else model_repository_i2v) / "wan_pipeline"
                          / "config.pbtxt")
    image = next(i for i in config.input if i.name == "image")
    assert image.data_type == model_config_pb2.TYPE_UINT8 and list(image.dims) == [-1, -1, 3] and image.optional
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert parameters["model_kind"] == kind
    assert ("max_image_pixels" in parameters) == (kind == "i2v")


# --- TensorRT on CPU: precisions, profiles, configs of the new graphs -------------------------------------

DEFAULTS = ServingDefaults(height=96, width=160, num_frames=17, num_inference_steps=8, guidance_scale=5.0,
                           shift=3.0, fps=16)
LIMITS = ShapeLimits(min_height=64, max_height=512, min_width=64, max_width=512, max_num_frames=81,
                     max_text_length=512, max_batch_size=2)
ENCODE_LAYOUT = [(3, 8, 2), (3, 4, 2), (3, 2, 1), (3, 1, 2)]


def i2v_specs():
    first, step = onnx_graphs.vae_encode_specs(ENCODE_LAYOUT, latent_channels=16, spatial=8, temporal=4)
    return {"image_encoder": onnx_graphs.image_encoder_spec(224, 257, 1280),
            "dit": onnx_graphs.i2v_dit_spec(36, 16, 4096, [1, 2, 2], 512, 257, 1280),
            "vae_encode_first": first, "vae_encode_step": step}


def test_i2v_precisions_keep_the_image_encoder_and_vae_encoder_fp32():
    assert trt.component_precisions("fp16", "i2v") == {
        "text_encoder": "fp32", "dit": "fp16", "vae_decode_first": "fp32", "vae_decode_step": "fp32",
        "image_encoder": "fp32", "vae_encode_first": "fp32", "vae_encode_step": "fp32"}
    assert set(trt.component_precisions("auto", "i2v")) == set(repository.component_models("i2v"))
    assert set(trt.FP32_REASONS) >= set(repository.IMAGE_COMPONENT_MODELS)


def test_i2v_profiles():
    sizes = trt.profile_sizes(DEFAULTS, LIMITS, 8, 4)
    specs = i2v_specs()
    assert trt.optimization_profile(specs["image_encoder"], sizes) == {
        "pixel_values": ((1, 3, 224, 224), (2, 3, 224, 224), (2, 3, 224, 224))}
    dit = trt.optimization_profile(specs["dit"], sizes)
    assert dit["hidden_states"] == ((1, 36, 1, 8, 8), (2, 36, 5, 12, 20), (2, 36, 21, 64, 64))
    assert dit["encoder_hidden_states"] == ((1, 512, 4096), (2, 512, 4096), (2, 512, 4096))
    assert dit["encoder_hidden_states_image"] == ((1, 257, 1280), (2, 257, 1280), (2, 257, 1280))
    step = trt.optimization_profile(specs["vae_encode_step"], sizes)
    assert step["video"] == ((1, 3, 4, 64, 64), (1, 3, 4, 96, 160), (1, 3, 4, 512, 512))
    assert step["cache_in_02"] == ((1, 3, 1, 16, 16), (1, 3, 1, 24, 40), (1, 3, 1, 128, 128))
    for spec in specs.values():
        for name, (low, opt, high) in trt.optimization_profile(spec, sizes).items():
            assert all(a <= b <= c for a, b, c in zip(low, opt, high)), (spec.name, name)


@pytest.mark.parametrize("name", ["image_encoder", "dit", "vae_encode_first", "vae_encode_step"])
def test_i2v_tensorrt_configs_have_the_onnxruntime_models_io(name):
    spec = i2v_specs()[name]
    config = text_format.Parse(trt.tensorrt_config(spec, "fp32"), model_config_pb2.ModelConfig())
    reference = text_format.Parse(repository.onnxruntime_config(spec), model_config_pb2.ModelConfig())
    assert config.platform == "tensorrt_plan" and config.name == name
    assert list(config.input) == list(reference.input) and list(config.output) == list(reference.output)


def test_tensorrt_backend_builds_an_engine_for_every_i2v_model(model_repository_i2v, tiny_checkpoint_i2v, tmp_path,
                                                               monkeypatch):
    """The build's tensorrt branch on CPU for an i2v checkpoint: the session build's ONNX graphs, faked engines."""
    vae = onnx_graphs.load_vae(tiny_checkpoint_i2v)
    decode_layout, encode_layout = onnx_graphs.vae_cache_layout(vae), onnx_graphs.vae_encode_cache_layout(vae)
    specs = {spec.name: spec for spec in (
        onnx_graphs.text_encoder_spec(32), onnx_graphs.i2v_dit_spec(36, 16, 32, [1, 2, 2], 512, 17, 32),
        onnx_graphs.image_encoder_spec(32, 17, 32), *onnx_graphs.vae_specs(decode_layout, 16, 8, 4),
        *onnx_graphs.vae_encode_specs(encode_layout, 16, 8, 4))}

    def exported(names, onnx_dir):
        graphs = []
        for name in names:  # the session build's graphs instead of a second export
            (onnx_dir / name).mkdir(parents=True)
            for path in (model_repository_i2v / name / "1").glob("model.onnx*"):
                shutil.copy2(path, onnx_dir / name / path.name)
            graphs.append(onnx_graphs.ExportedGraph(specs[name], onnx_dir / name / "model.onnx", 0))
        return graphs

    monkeypatch.setattr(onnx_graphs, "export_text_encoder",
                        lambda c, onnx_dir, **_: exported(["text_encoder"], onnx_dir))
    monkeypatch.setattr(onnx_graphs, "export_dit", lambda c, onnx_dir, **_: exported(["dit"], onnx_dir))
    monkeypatch.setattr(onnx_graphs, "export_image_encoder",
                        lambda c, onnx_dir, **_: exported(["image_encoder"], onnx_dir))
    monkeypatch.setattr(onnx_graphs, "export_vae", lambda c, onnx_dir, **_: onnx_graphs.VaeExport(
        exported(["vae_decode_first", "vae_decode_step"], onnx_dir), decode_layout))
    monkeypatch.setattr(onnx_graphs, "export_vae_encoder", lambda c, onnx_dir, **_: onnx_graphs.VaeEncoderExport(
        exported(["vae_encode_first", "vae_encode_step"], onnx_dir), encode_layout))
    engines = {}

    def build_engine(onnx_path, plan_path, profile, precision, workspace_gib):
        assert onnx_path.is_file()
        engines[plan_path.parent.parent.name] = (profile, precision)
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        plan_path.write_bytes(b"plan")

    monkeypatch.setattr(trt, "require_tensorrt", lambda: None)
    monkeypatch.setattr(trt, "build_engine", build_engine)
    output = tmp_path / "trt"
    assert build_engines.main(["--checkpoint", str(tiny_checkpoint_i2v), "--output", str(output), "--backend",
                               "tensorrt", "--max-height", "256", "--max-width", "512", "--no-progress"]) == 0

    assert set(engines) == set(repository.component_models("i2v"))
    assert engines["dit"][1] == "bf16" and engines["image_encoder"][1] == "fp32"
    assert engines["dit"][0]["encoder_hidden_states_image"] == ((1, 17, 32), (2, 17, 32), (2, 17, 32))
    assert engines["vae_encode_step"][0]["video"] == ((1, 3, 4, 64, 64), (1, 3, 4, 96, 160), (1, 3, 4, 256, 512))
    for name in repository.component_models("i2v"):
        config = parse_config(output / name / "config.pbtxt")
        assert config.platform == "tensorrt_plan"
        assert sorted(p.name for p in (output / name / "1").iterdir()) == ["model.plan"]
        reference = parse_config(model_repository_i2v / name / "config.pbtxt")
        assert list(config.input) == list(reference.input) and list(config.output) == list(reference.output)
    assert json.loads((output / "wan_pipeline" / "1" / "assets" / "pipeline.json").read_text())[
        "vae_encode_cache_count"] == 16


# --- while here: the BLS source is fingerprinted apart from the graphs ------------------------------------

@pytest.fixture
def relocated_i2v(model_repository_i2v, tmp_path) -> Path:
    copy = tmp_path / "moved" / "repo"
    shutil.copytree(model_repository_i2v, copy)
    return copy


@pytest.fixture
def edited_bls_source(tmp_path, monkeypatch) -> Path:
    """A copy of the BLS source with model.py edited and video.py gone, standing in for the committed one."""
    source = tmp_path / "bls_source"
    shutil.copytree(repository.PIPELINE_SOURCE_DIR, source, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    (source / "model.py").write_text((source / "model.py").read_text() + "\n# edited\n")
    (source / "video.py").unlink()
    monkeypatch.setattr(repository, "PIPELINE_SOURCE_DIR", source)
    return source


def test_the_graph_fingerprint_ignores_the_bls_source(monkeypatch, edited_bls_source):
    edited = repository.pipeline_source_hash()
    exporter = repository.source_hash()
    monkeypatch.undo()
    assert repository.source_hash() == exporter and repository.pipeline_source_hash() != edited


def test_an_edited_bls_source_is_copied_without_re_exporting(relocated_i2v, tiny_checkpoint_i2v, edited_bls_source,
                                                             no_export, capsys):
    graphs_before = {k: v for k, v in tree(relocated_i2v).items() if not k.startswith("wan_pipeline/1/")
                     and k != repository.BUILD_INFO}
    args = ["--checkpoint", str(tiny_checkpoint_i2v), "--output", str(relocated_i2v), "--no-progress"]
    assert build_engines.main(args) == 0
    assert "graphs up to date; copied the changed wan_pipeline source" in capsys.readouterr().out
    version = relocated_i2v / "wan_pipeline" / "1"
    assert (version / "model.py").read_text().endswith("# edited\n")
    assert not (version / "video.py").exists()  # a file the source no longer has
    assert (version / "assets" / "pipeline.json").is_file()
    assert {k: v for k, v in tree(relocated_i2v).items() if k in graphs_before} == graphs_before
    assert not list(version.glob(".*.tmp"))

    assert build_engines.main(args) == 0  # now it is a no-op
    assert "up to date" in capsys.readouterr().out
