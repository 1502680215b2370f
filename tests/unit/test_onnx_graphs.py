"""The exported ONNX graphs against PyTorch, at shapes other than the ones they were traced with.

The graphs are the ones the build wrote into the session's model repository (tests/conftest.py), so these
tests check what Triton serves; the torch side is loaded from the same tiny checkpoint.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export import onnx_graphs as graphs

TOLERANCE = 1e-4  # the tiny model's activations are O(1); measured diffs are ~1e-6


@pytest.fixture(scope="module")
def text_encoder(tiny_checkpoint):
    return graphs.TextEncoderGraph(graphs.load_text_encoder(tiny_checkpoint))


@pytest.fixture(scope="module")
def dit(tiny_checkpoint):
    return graphs.DiTGraph(graphs.load_transformer(tiny_checkpoint))


@pytest.fixture(scope="module")
def vae(tiny_checkpoint):
    return graphs.load_vae(tiny_checkpoint)


@pytest.fixture(scope="module")
def cache_layout(vae):
    return graphs.vae_cache_layout(vae)


def session(model_repository, name):
    return graphs.ort_session(model_repository / name / "1" / "model.onnx")


def run_both(module, spec, onnx_session, inputs):
    with torch.no_grad():
        expected = module(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    actual = onnx_session.run([t.name for t in spec.outputs], {t.name: x.numpy() for t, x in zip(spec.inputs, inputs)})
    return expected, actual


@pytest.mark.parametrize("sizes", [{"batch": 1, "text_length": 7}, {"batch": 3, "text_length": 40}])
def test_text_encoder_graph_matches_pytorch_at_untraced_shapes(model_repository, text_encoder, sizes):
    assert sizes["text_length"] != graphs.TRACE_SIZES["text_length"]
    spec = graphs.text_encoder_spec(text_encoder.text_encoder.config.d_model)
    inputs = graphs.sample_inputs(spec, sizes, seed=3, vocab_size=text_encoder.text_encoder.config.vocab_size)
    expected, actual = run_both(text_encoder, spec, session(model_repository, "text_encoder"), inputs)
    assert actual[0].shape == (sizes["batch"], sizes["text_length"], spec.outputs[0].dims[2])
    assert graphs.max_abs_diff(expected, actual, "text_encoder", TOLERANCE) < TOLERANCE


@pytest.mark.parametrize("sizes", [
    {"batch": 1, "text_length": 5, "latent_frames": 1, "latent_height": 4, "latent_width": 6},
    {"batch": 3, "text_length": 30, "latent_frames": 5, "latent_height": 8, "latent_width": 2},
])
def test_dit_graph_matches_pytorch_at_untraced_shapes(model_repository, dit, sizes):
    config = dit.transformer.config
    spec = graphs.dit_spec(config.in_channels, config.out_channels, config.text_dim, list(config.patch_size))
    inputs = graphs.sample_inputs(spec, sizes, seed=4)
    expected, actual = run_both(dit, spec, session(model_repository, "dit"), inputs)
    assert actual[0].shape == inputs[0].shape
    assert graphs.max_abs_diff(expected, actual, "dit", TOLERANCE) < TOLERANCE


def test_vae_cache_layout_has_one_entry_per_cache_of_the_step_graph(model_repository, cache_layout):
    step_inputs = [i.name for i in session(model_repository, "vae_decode_step").get_inputs()]
    assert len(cache_layout) == 24  # as in Wan2.1's VAE: the tiny one keeps its structure
    assert step_inputs == ["latents", *(graphs.cache_name("in", i) for i in range(len(cache_layout)))]


def test_vae_first_and_step_wrappers_equal_vae_decode_in_pytorch(vae, cache_layout):
    latents = torch.randn(1, vae.config.z_dim, 5, 6, 10, generator=torch.Generator().manual_seed(5))
    first = graphs.VaeDecodeFirstGraph(vae, cache_layout)
    step = graphs.VaeDecodeStepGraph(vae, cache_layout)
    with torch.no_grad():
        expected = vae.decode(latents).sample
        actual = graphs.decode_with_graphs(first, step, latents)
    assert actual.shape == expected.shape == (1, 3, 17, 48, 80)
    assert float((actual - expected).abs().max()) <= 1e-6


@pytest.mark.parametrize("latent_size", [(4, 6), (10, 2)])
def test_vae_graphs_chained_in_onnxruntime_equal_vae_decode(model_repository, vae, latent_size):
    assert latent_size != (graphs.TRACE_SIZES["latent_height"], graphs.TRACE_SIZES["latent_width"])
    first_session = session(model_repository, "vae_decode_first")
    step_session = session(model_repository, "vae_decode_step")
    output_names = [o.name for o in step_session.get_outputs()]
    input_names = [i.name for i in step_session.get_inputs()]

    def first(latents):
        return first_session.run(output_names, {"latents": np.ascontiguousarray(latents)})

    def step(latents, *caches):
        return step_session.run(output_names, dict(zip(input_names, (np.ascontiguousarray(latents), *caches))))

    latents = torch.randn(1, vae.config.z_dim, 5, *latent_size, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = vae.decode(latents).sample
    actual = graphs.decode_with_graphs(first, step, latents.numpy())
    assert actual.shape == (1, 3, 17, 8 * latent_size[0], 8 * latent_size[1])
    assert graphs.max_abs_diff([expected], [actual], "vae", TOLERANCE) < TOLERANCE


def test_each_vae_graph_matches_its_wrapper_including_caches(model_repository, vae, cache_layout):
    first_spec, step_spec = graphs.vae_specs(cache_layout, vae.config.z_dim, 8, 4)
    first = graphs.VaeDecodeFirstGraph(vae, cache_layout)
    step = graphs.VaeDecodeStepGraph(vae, cache_layout)
    sizes = {"latent_height": 2, "latent_width": 4}
    latents = graphs.sample_inputs(first_spec, sizes, seed=7)
    expected, actual = run_both(first, first_spec, session(model_repository, "vae_decode_first"), latents)
    assert graphs.max_abs_diff(expected, actual, "vae_decode_first", TOLERANCE) < TOLERANCE
    step_inputs = [graphs.sample_inputs(first_spec, sizes, seed=8)[0], *expected[1:]]
    expected, actual = run_both(step, step_spec, session(model_repository, "vae_decode_step"), step_inputs)
    assert [a.shape for a in actual] == [step_spec.outputs[i].shape(sizes) for i in range(len(actual))]
    assert graphs.max_abs_diff(expected, actual, "vae_decode_step", TOLERANCE) < TOLERANCE


def test_max_abs_diff_fails_loudly_past_tolerance():
    with pytest.raises(graphs.VerificationError, match="dit: max abs diff 0.5"):
        graphs.max_abs_diff([np.zeros(3, np.float32)], [np.array([0, 0.5, 0], np.float32)], "dit", 1e-3)
    with pytest.raises(graphs.VerificationError, match="shape"):
        graphs.max_abs_diff([np.zeros(3)], [np.zeros(4)], "dit", 1e-3)
    with pytest.raises(graphs.VerificationError):
        graphs.max_abs_diff([np.zeros(1)], [np.array([np.nan])], "dit", 1e-3)


def test_tensor_spec_shapes_follow_symbols():
    first, step = graphs.vae_specs([(16, 1), (3, 2)], latent_channels=16, spatial=8, temporal=4)
    sizes = {"latent_height": 5, "latent_width": 7}
    assert [t.shape(sizes) for t in step.inputs] == [(1, 16, 1, 5, 7), (1, 16, 2, 5, 7), (1, 3, 2, 10, 14)]
    assert step.outputs[0].shape(sizes) == (1, 3, 4, 40, 56)
    assert first.outputs[0].triton_dims == [1, 3, 1, -1, -1]
