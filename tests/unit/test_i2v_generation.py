"""The BLS model's image-to-video stages, without Triton: PyTorch components of the tiny i2v checkpoint
injected as plain callables must reproduce diffusers' WanImageToVideoPipeline frames for the same image;
the image input is refused by t2v models and required by i2v ones."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BLS_DIR = Path(__file__).resolve().parents[2] / "model_repository" / "wan_pipeline" / "1"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"wan_pipeline_{name}", BLS_DIR / f"{name}.py")
    if spec.name in sys.modules:
        return sys.modules[spec.name]
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


generation = _load("generation")

DEFAULTS = generation.Defaults(height=96, width=160, num_frames=17, num_inference_steps=8, guidance_scale=5.0,
                               shift=3.0, fps=16)
LIMITS = generation.Limits(min_height=16, max_height=256, min_width=16, max_width=256, max_num_frames=33,
                           max_num_inference_steps=1000)


def sample_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth colour gradient with noise: resizing and CLIP's crop both change it visibly."""
    rows, cols = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    base = np.stack([rows, cols, 1 - rows * cols], axis=-1) * 200
    noise = np.random.default_rng(seed).integers(0, 55, (height, width, 3))
    return (base + noise).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------
# PyTorch components of the tiny i2v checkpoint, shaped like the BLS callables
# --------------------------------------------------------------------------------------------------------


def torch_components(pipe, dit_calls: list | None = None):
    vae = pipe.vae

    def text_encoder(input_ids, attention_mask):
        return pipe.text_encoder(input_ids, attention_mask).last_hidden_state

    def dit(latents, timestep, states, image_states):
        if dit_calls is not None:
            dit_calls.append((tuple(latents.shape), tuple(image_states.shape)))
        return pipe.transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=states,
                                encoder_hidden_states_image=image_states, return_dict=False)[0]

    def image_encoder(pixel_values):
        return pipe.image_encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]

    def vae_encode_first(video):  # what AutoencoderKLWan._encode does for frame 0
        caches = [None] * vae._cached_conv_counts["encoder"]
        out = vae.encoder(video, feat_cache=caches, feat_idx=[0])
        return vae.quant_conv(out)[:, : vae.config.z_dim], caches

    def vae_encode_step(video, caches):
        out = vae.encoder(video, feat_cache=caches, feat_idx=[0])
        return vae.quant_conv(out)[:, : vae.config.z_dim], caches

    def vae_decode_first(latents):
        caches = [None] * vae._cached_conv_counts["decoder"]
        frames = vae.decoder(vae.post_quant_conv(latents), feat_cache=caches, feat_idx=[0], first_chunk=True)
        return frames.clamp(-1, 1), caches

    def vae_decode_step(latents, caches):
        frames = vae.decoder(vae.post_quant_conv(latents), feat_cache=caches, feat_idx=[0])
        return frames.clamp(-1, 1), caches

    return generation.Components(
        tokenizer=pipe.tokenizer, text_encoder=text_encoder, dit=dit, vae_decode_first=vae_decode_first,
        vae_decode_step=vae_decode_step, scheduler_config=dict(pipe.scheduler.config),
        image_processor=pipe.image_processor, image_encoder=image_encoder, vae_encode_first=vae_encode_first,
        vae_encode_step=vae_encode_step)


def spec_of(pipe):
    vae = pipe.vae.config
    return generation.PipelineSpec(
        text_max_length=512, vae_scale_factor_spatial=vae.scale_factor_spatial,
        vae_scale_factor_temporal=vae.scale_factor_temporal, latent_channels=vae.z_dim,
        latents_mean=tuple(vae.latents_mean), latents_std=tuple(vae.latents_std),
        patch_size=tuple(pipe.transformer.config.patch_size))


def diffusers_frames(pipe, params, image: np.ndarray) -> np.ndarray:
    """WanImageToVideoPipeline's np output * 255 for the same parameters and image (scheduler with the shift)."""
    from PIL import Image

    scheduler = pipe.scheduler
    pipe.scheduler = type(scheduler).from_config(scheduler.config, flow_shift=params.shift)
    try:
        video = pipe(image=Image.fromarray(image), prompt=params.prompt, negative_prompt=params.negative_prompt,
                     height=params.height, width=params.width, num_frames=params.num_frames,
                     num_inference_steps=params.num_inference_steps, guidance_scale=params.guidance_scale,
                     generator=torch.Generator().manual_seed(params.seed), output_type="np").frames[0]
    finally:
        pipe.scheduler = scheduler
    return video * 255


# --------------------------------------------------------------------------------------------------------
# Parity with diffusers
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, image_size", [
    ({"prompt": "A red fox running through fresh snow", "negative_prompt": "blurred details, ugly", "seed": 7,
      "height": 32, "width": 48, "num_frames": 9, "num_inference_steps": 3, "guidance_scale": 5.0}, (50, 70)),
    ({"prompt": "一只小猫在花园里追逐蝴蝶", "seed": 123, "height": 48, "width": 32, "num_frames": 6,
      "num_inference_steps": 2, "guidance_scale": 1.0, "shift": 5.0}, (33, 33)),
], ids=["cfg_5.0-wide_image", "no_cfg_shift_5-square_image"])
def test_i2v_stages_reproduce_wan_image_to_video_pipeline_within_one_level(wan_i2v_pipeline, raw, image_size):
    pipe = wan_i2v_pipeline
    params = generation.resolve_and_validate(raw, DEFAULTS, LIMITS)
    image = generation.validate_image(sample_image(*image_size), "i2v")
    dit_calls = []
    result = generation.generate(params, spec_of(pipe), torch_components(pipe, dit_calls), image=image)
    expected = diffusers_frames(pipe, params, image)

    assert result.frames.dtype == np.uint8
    assert result.frames.shape == (params.num_frames, params.height, params.width, 3) == expected.shape
    assert np.abs(result.frames.astype(np.float64) - expected).max() <= 1.0
    # cond and uncond in one call; 16 noise + 4 mask + 16 condition channels; the image embeddings per batch row
    batch = 2 if params.guidance_scale > 1 else 1
    latent_frames = (params.num_frames - 1) // 4 + 1
    assert dit_calls == [((batch, 36, latent_frames, params.height // 8, params.width // 8), (batch, 17, 32))] * \
        params.num_inference_steps
    assert {"image_encoder", "vae_encode"} <= set(result.timings_ms)


def test_condition_matches_the_pipelines_prepare_latents(wan_i2v_pipeline):
    pipe = wan_i2v_pipeline
    image = generation.to_pil(sample_image(40, 24, seed=3))
    components = torch_components(pipe)
    with torch.no_grad():
        ours = generation.prepare_condition(spec_of(pipe), components.vae_encode_first, components.vae_encode_step,
                                            generation.preprocess_image(image, 32, 64), num_frames=13)
    with torch.no_grad():
        noise, theirs = pipe.prepare_latents(pipe.video_processor.preprocess(image, height=32, width=64), 1, 16, 32,
                                             64, 13, torch.float32, torch.device("cpu"),
                                             torch.Generator().manual_seed(0))
    assert ours.shape == theirs.shape == (1, 20, 4, 4, 8)
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
    assert ours[:, :4, 0].eq(1).all() and ours[:, :4, 1:].eq(0).all()  # the mask: only the given frame is known


def test_first_frame_mask_folds_four_frames_per_latent_frame():
    mask = generation.first_frame_mask(num_frames=9, latent_height=2, latent_width=3)
    assert mask.shape == (1, 4, 3, 2, 3)
    assert mask[:, :, 0].eq(1).all() and mask[:, :, 1:].eq(0).all()


def test_image_embeddings_are_the_penultimate_clip_hidden_states(wan_i2v_pipeline):
    pipe = wan_i2v_pipeline
    image = generation.to_pil(sample_image(20, 90))
    with torch.no_grad():
        ours = generation.encode_image(pipe.image_processor, torch_components(pipe).image_encoder, image)
        theirs = pipe.encode_image(image, torch.device("cpu"))
    assert ours.shape == (1, 17, 32) and torch.equal(ours, theirs)


# --------------------------------------------------------------------------------------------------------
# The image input: refused by t2v, required by i2v, checked
# --------------------------------------------------------------------------------------------------------


def test_t2v_model_refuses_an_image():
    with pytest.raises(generation.InvalidRequest, match="this model is text-to-video .*image input is not supported"):
        generation.validate_image(sample_image(8, 8), "t2v")
    assert generation.validate_image(None, "t2v") is None


def test_i2v_model_requires_an_image():
    with pytest.raises(generation.InvalidRequest, match="this model is image-to-video .*needs an image"):
        generation.validate_image(None, "i2v")


@pytest.mark.parametrize("image, message", [
    (np.zeros((8, 8, 3), dtype=np.float32), "image must be uint8 RGB [height, width, 3], got float32 [8, 8, 3]"),
    (np.zeros((8, 8, 4), dtype=np.uint8), "image must be uint8 RGB [height, width, 3], got uint8 [8, 8, 4]"),
    (np.zeros((8, 8), dtype=np.uint8), "got uint8 [8, 8]"),
    (np.zeros((0, 8, 3), dtype=np.uint8), "image is empty (0x8 pixels)"),
    (np.zeros((65, 64, 3), dtype=np.uint8), "image is 64x65 pixels, more than the 4096-pixel limit"),
])
def test_bad_images_are_rejected_with_a_one_line_reason(image, message):
    with pytest.raises(generation.InvalidRequest) as error:
        generation.validate_image(image, "i2v", max_pixels=64 * 64)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_pipeline_spec_reads_the_i2v_fields():
    spec = generation.PipelineSpec.from_json({
        "text_max_length": 512, "vae_scale_factor_spatial": 8, "vae_scale_factor_temporal": 4,
        "latent_channels": 16, "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16, "vae_cache_count": 24,
        "patch_size": [1, 2, 2], "vae_encode_cache_count": 16, "image_processor_class": "CLIPImageProcessor"})
    assert spec.vae_encode_cache_count == 16 and spec.image_processor_class == "CLIPImageProcessor"
