"""TensorRT profiles, precisions and configs, on CPU (no tensorrt package, no GPU needed)."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from export import onnx_graphs as graphs
from export import repository
from export import tensorrt_engines as trt
from export.checkpoint import ServingDefaults, ShapeLimits

DEFAULTS = ServingDefaults(height=96, width=160, num_frames=17, num_inference_steps=8, guidance_scale=5.0,
                           shift=3.0, fps=16)
LIMITS = ShapeLimits(min_height=64, max_height=512, min_width=64, max_width=512, max_num_frames=81,
                     max_text_length=512, max_batch_size=2)
LAYOUT = [(16, 1), (3, 1), (1, 2), (3, 4), (3, 8)]  # (channels, spatial factor) of each cache


def specs():
    first, step = graphs.vae_specs(LAYOUT, latent_channels=16, spatial=8, temporal=4)
    return {"text_encoder": graphs.text_encoder_spec(32), "dit": graphs.dit_spec(16, 16, 32, [1, 2, 2]),
            "vae_decode_first": first, "vae_decode_step": step}


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_dit_precision_follows_the_flag_and_the_rest_stays_fp32():
    assert trt.component_precisions("auto") == {"text_encoder": "fp32", "dit": "bf16",
                                                "vae_decode_first": "fp32", "vae_decode_step": "fp32"}
    assert trt.component_precisions("fp16")["dit"] == "fp16"
    assert trt.component_precisions("fp16")["text_encoder"] == "fp32"  # umT5 overflows in fp16
    assert set(trt.component_precisions("fp32").values()) == {"fp32"}
    with pytest.raises(ValueError):
        trt.component_precisions("int8")


def test_profile_sizes_span_limits_with_opt_at_the_defaults():
    sizes = trt.profile_sizes(DEFAULTS, LIMITS, spatial=8, temporal=4)
    assert sizes == {
        "batch": (1, 2, 2),
        "text_length": (1, 512, 512),
        "latent_frames": (1, 5, 21),
        "latent_height": (8, 12, 64),
        "latent_width": (8, 20, 64),
    }


def test_dit_profile_shapes():
    profile = trt.optimization_profile(specs()["dit"], trt.profile_sizes(DEFAULTS, LIMITS, 8, 4))
    assert profile == {
        "hidden_states": ((1, 16, 1, 8, 8), (2, 16, 5, 12, 20), (2, 16, 21, 64, 64)),
        "timestep": ((1,), (2,), (2,)),
        "encoder_hidden_states": ((1, 1, 32), (2, 512, 32), (2, 512, 32)),
    }


def test_vae_step_profile_scales_each_cache_with_its_resolution():
    profile = trt.optimization_profile(specs()["vae_decode_step"], trt.profile_sizes(DEFAULTS, LIMITS, 8, 4))
    assert profile["latents"] == ((1, 16, 1, 8, 8), (1, 16, 1, 12, 20), (1, 16, 1, 64, 64))
    assert profile["cache_in_00"] == ((1, 16, 2, 8, 8), (1, 16, 2, 12, 20), (1, 16, 2, 64, 64))
    assert profile["cache_in_03"] == ((1, 3, 2, 32, 32), (1, 3, 2, 48, 80), (1, 3, 2, 256, 256))
    assert list(profile) == ["latents", *(graphs.cache_name("in", i) for i in range(len(LAYOUT)))]


def test_every_profile_is_ordered_min_opt_max():
    sizes = trt.profile_sizes(DEFAULTS, LIMITS, 8, 4)
    for spec in specs().values():
        for name, (low, opt, high) in trt.optimization_profile(spec, sizes).items():
            assert all(a <= b <= c for a, b, c in zip(low, opt, high)), (spec.name, name)


@pytest.mark.parametrize("name", list(repository.COMPONENT_MODELS))
def test_tensorrt_config_is_a_plan_with_the_onnxruntime_models_io(name):
    spec = specs()[name]
    config = parse(trt.tensorrt_config(spec, "bf16" if name == "dit" else "fp32"))
    reference = parse(repository.onnxruntime_config(spec))
    assert config.name == name
    assert config.platform == "tensorrt_plan"
    assert config.max_batch_size == 0
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert list(config.input) == list(reference.input)
    assert list(config.output) == list(reference.output)


def test_dit_config_dims_are_dynamic_except_channels():
    config = parse(trt.tensorrt_config(specs()["dit"], "bf16"))
    hidden_states = config.input[0]
    assert hidden_states.name == "hidden_states"
    assert hidden_states.data_type == model_config_pb2.TYPE_FP32
    assert list(hidden_states.dims) == [-1, 16, -1, -1, -1]
    assert config.parameters["precision"].string_value == "bf16"


@pytest.mark.skipif(trt.tensorrt_unavailable_reason() is None, reason="TensorRT and a GPU are available here")
def test_engine_build_without_gpu_stops_with_a_clear_message(tmp_path):
    with pytest.raises(SystemExit, match="--backend tensorrt needs an NVIDIA GPU and TensorRT.*--backend onnxruntime"):
        trt.build_engine(tmp_path / "model.onnx", tmp_path / "model.plan", {}, "fp32")
    assert not trt.tensorrt_available()
