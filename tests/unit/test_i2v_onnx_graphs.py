"""The graphs image-to-video adds (image encoder, VAE encoder first/step, the DiT with image context) against
PyTorch at shapes other than the traced ones. The graphs are the ones the build wrote into the session's i2v
repository (tests/conftest.py), so these tests check what Triton serves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export import onnx_graphs as graphs

TOLERANCE = 1e-4  # the tiny model's activations are O(1); measured diffs are ~1e-6


@pytest.fixture(scope="module")
def vae(tiny_checkpoint_i2v):
    return graphs.load_vae(tiny_checkpoint_i2v)


@pytest.fixture(scope="module")
def encode_layout(vae):
    return graphs.vae_encode_cache_layout(vae)


def session(repository, name):
    return graphs.ort_session(repository / name / "1" / "model.onnx")


def run_both(module, spec, onnx_session, inputs):
    with torch.no_grad():
        expected = module(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    actual = onnx_session.run([t.name for t in spec.outputs], {t.name: x.numpy() for t, x in zip(spec.inputs, inputs)})
    return expected, actual


# --------------------------------------------------------------------------------------------------------
# Image encoder: penultimate CLIP hidden states
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3])
def test_image_encoder_graph_matches_the_pipelines_encode_image(model_repository_i2v, tiny_checkpoint_i2v, batch):
    assert batch != graphs.TRACE_SIZES["batch"]
    encoder = graphs.ImageEncoderGraph(graphs.load_image_encoder(tiny_checkpoint_i2v))
    config = encoder.image_encoder.config
    spec = graphs.image_encoder_spec(config.image_size, 17, config.hidden_size)
    inputs = graphs.sample_inputs(spec, {"batch": batch}, seed=3)
    expected, actual = run_both(encoder, spec, session(model_repository_i2v, "image_encoder"), inputs)
    assert actual[0].shape == (batch, 17, 32)
    assert graphs.max_abs_diff(expected, actual, "image_encoder", TOLERANCE) < TOLERANCE
    # the exported wrapper (eager attention) is what the pipeline's encoder (default attention) computes
    from transformers import CLIPVisionModel

    pipeline_encoder = CLIPVisionModel.from_pretrained(tiny_checkpoint_i2v / "image_encoder").eval()
    with torch.no_grad():
        pipeline_states = pipeline_encoder(pixel_values=inputs[0], output_hidden_states=True).hidden_states[-2]
    assert graphs.max_abs_diff([pipeline_states], actual, "image_encoder vs default attention", TOLERANCE) < TOLERANCE


# --------------------------------------------------------------------------------------------------------
# DiT with image context
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [
    {"batch": 1, "latent_frames": 1, "latent_height": 4, "latent_width": 6},
    {"batch": 3, "latent_frames": 5, "latent_height": 8, "latent_width": 2},
])
def test_i2v_dit_graph_matches_pytorch_at_untraced_shapes(model_repository_i2v, tiny_checkpoint_i2v, sizes):
    dit = graphs.ImageDiTGraph(graphs.load_transformer(tiny_checkpoint_i2v))
    config = dit.transformer.config
    spec = graphs.i2v_dit_spec(config.in_channels, config.out_channels, config.text_dim, list(config.patch_size),
                               512, 17, config.image_dim)
    assert [t.name for t in spec.inputs] == ["hidden_states", "timestep", "encoder_hidden_states",
                                             "encoder_hidden_states_image"]
    inputs = graphs.sample_inputs(spec, sizes, seed=4)
    expected, actual = run_both(dit, spec, session(model_repository_i2v, "dit"), inputs)
    assert inputs[0].shape[1] == 36 and actual[0].shape == (sizes["batch"], 16, *inputs[0].shape[2:])
    assert graphs.max_abs_diff(expected, actual, "dit", TOLERANCE) < TOLERANCE


# --------------------------------------------------------------------------------------------------------
# VAE encoder: first + step graphs with explicit caches
# --------------------------------------------------------------------------------------------------------


def test_vae_encode_cache_layout_matches_the_step_graph(model_repository_i2v, encode_layout):
    step_inputs = session(model_repository_i2v, "vae_encode_step").get_inputs()
    assert [i.name for i in step_inputs] == ["video", *(graphs.cache_name("in", i) for i in range(len(encode_layout)))]
    assert len(encode_layout) == 16
    # two-frame caches for causal convs, one frame for the two temporal downsamplers
    assert sorted(frames for _, _, frames in encode_layout).count(1) == 2
    assert [i.shape[2] for i in step_inputs[1:]] == [frames for _, _, frames in encode_layout]


@pytest.mark.parametrize("num_frames", [1, 5, 13])
def test_vae_encode_wrappers_equal_vae_encode_mean_in_pytorch(vae, encode_layout, num_frames):
    video = torch.rand(1, 3, num_frames, 40, 56, generator=torch.Generator().manual_seed(num_frames)) * 2 - 1
    first = graphs.VaeEncodeFirstGraph(vae, encode_layout)
    step = graphs.VaeEncodeStepGraph(vae, encode_layout)
    with torch.no_grad():
        expected = vae.encode(video).latent_dist.mode()
        actual = graphs.encode_with_graphs(first, step, video)
    assert actual.shape == expected.shape == (1, 16, (num_frames - 1) // 4 + 1, 5, 7)
    assert float((actual - expected).abs().max()) <= 1e-6


@pytest.mark.parametrize("latent_size, num_frames", [((4, 6), 9), ((10, 2), 17)])
def test_vae_encode_graphs_chained_in_onnxruntime_equal_vae_encode(model_repository_i2v, vae, latent_size,
                                                                   num_frames):
    assert latent_size != (graphs.TRACE_SIZES["latent_height"], graphs.TRACE_SIZES["latent_width"])
    first_session = session(model_repository_i2v, "vae_encode_first")
    step_session = session(model_repository_i2v, "vae_encode_step")
    output_names = [o.name for o in step_session.get_outputs()]
    input_names = [i.name for i in step_session.get_inputs()]

    def first(video):
        return first_session.run(output_names, {"video": np.ascontiguousarray(video)})

    def step(video, *caches):
        return step_session.run(output_names, dict(zip(input_names, (np.ascontiguousarray(video), *caches))))

    # what image-to-video encodes: one image, then zero frames
    video = torch.zeros(1, 3, num_frames, 8 * latent_size[0], 8 * latent_size[1])
    video[:, :, 0] = torch.rand(3, 8 * latent_size[0], 8 * latent_size[1], generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = vae.encode(video).latent_dist.mode()
    actual = graphs.encode_with_graphs(first, step, video.numpy())
    assert actual.shape == (1, 16, (num_frames - 1) // 4 + 1, *latent_size)
    assert graphs.max_abs_diff([expected], [actual], "vae_encode", TOLERANCE) < TOLERANCE


def test_each_vae_encode_graph_matches_its_wrapper_including_caches(model_repository_i2v, vae, encode_layout):
    first_spec, step_spec = graphs.vae_encode_specs(encode_layout, vae.config.z_dim, 8, 4)
    first = graphs.VaeEncodeFirstGraph(vae, encode_layout)
    step = graphs.VaeEncodeStepGraph(vae, encode_layout)
    sizes = {"latent_height": 2, "latent_width": 4}
    video = graphs.sample_inputs(first_spec, sizes, seed=7)
    expected, actual = run_both(first, first_spec, session(model_repository_i2v, "vae_encode_first"), video)
    assert graphs.max_abs_diff(expected, actual, "vae_encode_first", TOLERANCE) < TOLERANCE
    chunk = torch.randn(step_spec.inputs[0].shape(sizes), generator=torch.Generator().manual_seed(8))
    expected, actual = run_both(step, step_spec, session(model_repository_i2v, "vae_encode_step"),
                                [chunk, *expected[1:]])
    assert [a.shape for a in actual] == [step_spec.outputs[i].shape(sizes) for i in range(len(actual))]
    assert graphs.max_abs_diff(expected, actual, "vae_encode_step", TOLERANCE) < TOLERANCE


def test_vae_encode_specs_follow_symbols():
    first, step = graphs.vae_encode_specs([(3, 8, 2), (3, 2, 1)], latent_channels=16, spatial=8, temporal=4)
    sizes = {"latent_height": 5, "latent_width": 7}
    assert [t.shape(sizes) for t in step.inputs] == [(1, 3, 4, 40, 56), (1, 3, 2, 40, 56), (1, 3, 1, 10, 14)]
    assert first.inputs[0].shape(sizes) == (1, 3, 1, 40, 56)
    assert step.outputs[0].shape(sizes) == (1, 16, 1, 5, 7) and first.outputs[0].triton_dims == [1, 16, 1, -1, -1]
