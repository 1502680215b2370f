"""The BLS model's generation stages, without Triton: PyTorch components of the tiny checkpoint injected as
plain callables must reproduce diffusers' WanPipeline frames; validation and cancellation behave."""

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
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


generation = _load("generation")

DEFAULTS = generation.Defaults(height=96, width=160, num_frames=17, num_inference_steps=8, guidance_scale=5.0,
                               shift=3.0, fps=16)
LIMITS = generation.Limits(min_height=16, max_height=256, min_width=16, max_width=256, max_num_frames=33,
                           max_num_inference_steps=1000)


# --------------------------------------------------------------------------------------------------------
# PyTorch components of the tiny checkpoint, shaped like the BLS callables
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    from diffusers import WanPipeline

    pipeline = WanPipeline.from_pretrained(tiny_checkpoint)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def torch_components(pipe, dit_batches: list | None = None):
    vae = pipe.vae

    def text_encoder(input_ids, attention_mask):
        return pipe.text_encoder(input_ids, attention_mask).last_hidden_state

    def dit(latents, timestep, states):
        if dit_batches is not None:
            dit_batches.append(latents.shape[0])
        return pipe.transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=states,
                                return_dict=False)[0]

    def vae_decode_first(latents):  # what AutoencoderKLWan._decode does for latent frame 0
        caches = [None] * vae._cached_conv_counts["decoder"]
        frames = vae.decoder(vae.post_quant_conv(latents), feat_cache=caches, feat_idx=[0], first_chunk=True)
        return frames.clamp(-1, 1), caches

    def vae_decode_step(latents, caches):
        frames = vae.decoder(vae.post_quant_conv(latents), feat_cache=caches, feat_idx=[0])
        return frames.clamp(-1, 1), caches

    return generation.Components(tokenizer=pipe.tokenizer, text_encoder=text_encoder, dit=dit,
                                 vae_decode_first=vae_decode_first, vae_decode_step=vae_decode_step,
                                 scheduler_config=dict(pipe.scheduler.config))


def spec_of(pipe):
    vae = pipe.vae.config
    return generation.PipelineSpec(
        text_max_length=512, vae_scale_factor_spatial=vae.scale_factor_spatial,
        vae_scale_factor_temporal=vae.scale_factor_temporal, latent_channels=vae.z_dim,
        latents_mean=tuple(vae.latents_mean), latents_std=tuple(vae.latents_std),
        patch_size=tuple(pipe.transformer.config.patch_size))


def diffusers_frames(pipe, params) -> np.ndarray:
    """WanPipeline's np output * 255 for the same parameters (its scheduler rebuilt with the shift)."""
    scheduler = pipe.scheduler
    pipe.scheduler = type(scheduler).from_config(scheduler.config, flow_shift=params.shift)
    try:
        video = pipe(prompt=params.prompt, negative_prompt=params.negative_prompt, height=params.height,
                     width=params.width, num_frames=params.num_frames,
                     num_inference_steps=params.num_inference_steps, guidance_scale=params.guidance_scale,
                     generator=torch.Generator().manual_seed(params.seed), output_type="np").frames[0]
    finally:
        pipe.scheduler = scheduler
    return video * 255


# --------------------------------------------------------------------------------------------------------
# Parity with diffusers
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    {"prompt": "A red fox running through fresh snow", "negative_prompt": "blurred details, ugly", "seed": 7,
     "height": 32, "width": 48, "num_frames": 9, "num_inference_steps": 3, "guidance_scale": 5.0},
    {"prompt": "一只小猫在花园里追逐蝴蝶", "seed": 123, "height": 48, "width": 32, "num_frames": 6,
     "num_inference_steps": 2, "guidance_scale": 1.0, "shift": 5.0},
], ids=["cfg_5.0", "no_cfg_shift_5"])
def test_stages_reproduce_wan_pipeline_frames_within_one_level(pipe, raw):
    params = generation.resolve_and_validate(raw, DEFAULTS, LIMITS)
    dit_batches = []
    result = generation.generate(params, spec_of(pipe), torch_components(pipe, dit_batches))
    expected = diffusers_frames(pipe, params)

    assert result.frames.dtype == np.uint8
    assert result.frames.shape == (params.num_frames, params.height, params.width, 3) == expected.shape
    assert np.abs(result.frames.astype(np.float64) - expected).max() <= 1.0
    # cond and uncond share one DiT call per step; without guidance there is no uncond half
    assert dit_batches == [2 if params.guidance_scale > 1 else 1] * params.num_inference_steps
    assert len(result.timings_ms["dit_steps"]) == params.num_inference_steps


def test_encode_prompts_zeroes_states_past_each_prompt_length():
    input_ids = torch.tensor([[5, 6, 1, 0, 0], [7, 1, 0, 0, 0]])
    mask = (input_ids > 0).to(torch.int64)
    mask[:, :3] = torch.tensor([[1, 1, 1], [1, 1, 0]])
    states = generation.encode_prompts(lambda ids, m: torch.ones(2, 5, 4), input_ids, mask)
    assert states[0, :3].eq(1).all() and states[0, 3:].eq(0).all()
    assert states[1, :2].eq(1).all() and states[1, 2:].eq(0).all()


def test_tokenize_truncates_long_prompts_to_max_length(pipe):
    ids, mask = generation.tokenize(pipe.tokenizer, ["a cat " * 400, "dog"], max_length=16)
    assert ids.shape == mask.shape == (2, 16) and ids.dtype == torch.int64
    assert mask[0].sum() == 16 and ids[0, -1] == pipe.tokenizer.eos_token_id
    assert 0 < mask[1].sum() < 16


def test_prepare_latents_matches_wan_pipeline_noise(pipe):
    spec = spec_of(pipe)
    ours = generation.prepare_latents(spec, seed=42, num_frames=17, height=96, width=160)
    theirs = pipe.prepare_latents(1, 16, 96, 160, 17, torch.float32, torch.device("cpu"),
                                  torch.Generator().manual_seed(42))
    assert ours.shape == (1, 16, 5, 12, 20)
    assert torch.equal(ours, theirs)


def test_prepare_timesteps_uses_requested_shift(pipe):
    config = dict(pipe.scheduler.config)
    three = generation.prepare_timesteps(config, 4, shift=3.0).timesteps
    five = generation.prepare_timesteps(config, 4, shift=5.0).timesteps
    assert len(three) == len(five) == 4 and three[0] == five[0] and (five[1:] > three[1:]).all()


# --------------------------------------------------------------------------------------------------------
# Cancellation
# --------------------------------------------------------------------------------------------------------


def test_cancellation_stops_before_the_next_step(pipe):
    params = generation.resolve_and_validate(
        {"prompt": "waves", "seed": 1, "height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 10},
        DEFAULTS, LIMITS)
    steps, dit_batches = [], []
    with pytest.raises(generation.GenerationCancelled, match="before step 3 of 10"):
        generation.generate(params, spec_of(pipe), torch_components(pipe, dit_batches),
                            on_step=lambda step, total: steps.append((step, total)),
                            is_cancelled=lambda: len(steps) >= 2)
    assert steps == [(1, 10), (2, 10)]
    assert len(dit_batches) == 2


def test_request_cancelled_before_start_runs_no_component():
    params = generation.resolve_and_validate({"prompt": "x"}, DEFAULTS, LIMITS)

    def fail(*args):
        raise AssertionError("no component may run for a cancelled request")

    components = generation.Components(tokenizer=fail, text_encoder=fail, dit=fail, vae_decode_first=fail,
                                       vae_decode_step=fail, scheduler_config={})
    with pytest.raises(generation.GenerationCancelled):
        generation.generate(params, None, components, is_cancelled=lambda: True)


# --------------------------------------------------------------------------------------------------------
# Validation and defaults
# --------------------------------------------------------------------------------------------------------


def test_missing_values_take_defaults_and_seed_is_drawn():
    params = generation.resolve_and_validate({"prompt": "x"}, DEFAULTS, LIMITS)
    assert (params.height, params.width, params.num_frames, params.num_inference_steps) == (96, 160, 17, 8)
    assert (params.guidance_scale, params.shift, params.fps, params.negative_prompt) == (5.0, 3.0, 16, "")
    assert 0 <= params.seed < 2**32 and params.return_frames is False and params.requested_num_frames is None


@pytest.mark.parametrize("requested, rounded", [(1, 1), (2, 1), (3, 1), (4, 5), (5, 5), (8, 9), (16, 17),
                                                (17, 17), (18, 17), (33, 33), (35, 33)])
def test_num_frames_round_to_4k_plus_1_like_diffusers(requested, rounded):
    assert generation.round_num_frames(requested) == rounded
    params = generation.resolve_and_validate({"prompt": "x", "num_frames": requested}, DEFAULTS, LIMITS)
    assert params.num_frames == rounded
    assert params.requested_num_frames == (None if requested == rounded else requested)


@pytest.mark.parametrize("raw, message", [
    ({"height": 100}, "height must be a multiple of 16, got 100"),
    ({"width": 40}, "width must be a multiple of 16, got 40"),
    ({"height": 512}, "height must be between 16 and 256, got 512"),
    ({"width": 0}, "width must be between 16 and 256, got 0"),
    ({"num_inference_steps": 0}, "num_inference_steps must be between 1 and 1000, got 0"),
    ({"num_inference_steps": 1001}, "num_inference_steps must be between 1 and 1000, got 1001"),
    ({"num_frames": 0}, "num_frames must be at least 1, got 0"),
    ({"num_frames": 37}, "num_frames must be at most 33, got 37"),
    ({"num_frames": 36}, "num_frames must be at most 33, got 36 (rounded to 37 = 4k+1)"),
    ({"guidance_scale": 0.5}, "guidance_scale must be >= 1.0"),
    ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number"),
    ({"shift": 0.0}, "shift must be > 0, got 0.0"),
    ({"fps": 0}, "fps must be between 1 and 120, got 0"),
    ({"seed": -1}, "seed must be between 0 and"),
    ({"prompt": None}, "prompt is required"),
    ({"height": 32.5}, "height must be an integer, got 32.5"),
])
def test_invalid_values_are_rejected_with_a_one_line_reason(raw, message):
    with pytest.raises(generation.InvalidRequest) as error:
        generation.resolve_and_validate({"prompt": "x", **raw}, DEFAULTS, LIMITS)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_pipeline_spec_reads_pipeline_json_fields():
    spec = generation.PipelineSpec.from_json({
        "text_max_length": 512, "vae_scale_factor_spatial": 8, "vae_scale_factor_temporal": 4,
        "latent_channels": 16, "latents_mean": [0.0] * 16, "latents_std": [1.0] * 16, "vae_cache_count": 24,
        "patch_size": [1, 2, 2], "something_new": True})
    assert spec.size_multiple == 16 and spec.vae_cache_count == 24 and spec.patch_size == (1, 2, 2)


# --------------------------------------------------------------------------------------------------------
# Request tensors -> values
# --------------------------------------------------------------------------------------------------------


def test_parse_inputs_decodes_utf8_and_single_numbers():
    raw = generation.parse_inputs({
        "prompt": np.array(["一只小猫 🐈".encode("utf-8")], dtype=np.object_),
        "seed": np.array([2**40], dtype=np.int64), "height": np.array([48], dtype=np.int32),
        "guidance_scale": np.array([5.1], dtype=np.float32), "return_frames": np.array([True]),
    })
    assert raw == {"prompt": "一只小猫 🐈", "seed": 2**40, "height": 48, "guidance_scale": 5.1,
                   "return_frames": True}
    assert type(raw["height"]) is int and type(raw["guidance_scale"]) is float


def test_parse_inputs_rejects_invalid_utf8_and_several_values():
    with pytest.raises(generation.InvalidRequest, match="prompt is not valid UTF-8"):
        generation.parse_inputs({"prompt": np.array([b"\xff\xfe"], dtype=np.object_)})
    with pytest.raises(generation.InvalidRequest, match="height must hold exactly one value, got 2"):
        generation.parse_inputs({"height": np.array([16, 32], dtype=np.int32)})
