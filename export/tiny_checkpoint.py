"""The embedded default models: tiny random-weight Wan2.1 text-to-video and image-to-video checkpoints.

They are built from the same diffusers/transformers classes as real Wan2.1 checkpoints and saved in
diffusers format, so every serving code path (export, Triton, front end) runs exactly as it would on
real weights - but the weights are random, so the generated video is noise.

  t2v: WanPipeline             (umT5 text encoder, WanTransformer3DModel, AutoencoderKLWan, UniPC)
  i2v: WanImageToVideoPipeline (the same text encoder, VAE and scheduler, plus a CLIP vision encoder and
                                its image processor, and a DiT with image cross-attention and 36 input
                                channels: 16 noise + 4 first-frame mask + 16 condition latents)
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

import torch

# What the demo generates when a request leaves a field out: small enough for seconds on 2 CPU cores.
TINY_SERVING_DEFAULTS = {
    "height": 96,
    "width": 160,
    "num_frames": 17,
    "num_inference_steps": 8,
    "guidance_scale": 5.0,
    "fps": 16,
    # Limits: the rotary tables would allow 512 x 512 x 81 frames, but ONNX Runtime's attention holds the
    # whole score matrix, tokens^2 x 4 bytes per head and CFG half: at 512 x 512 x 81 (21504 tokens) the DiT
    # peaked at ~18 GB and the next task ran a 24 GB machine out of memory. 256 x 256 x 81 (5376 tokens)
    # peaks under 2 GB in any model process.
    "max_height": 256,
    "max_width": 256,
    "max_num_frames": 81,
}
SERVING_DEFAULTS_FILE = "serving_defaults.json"
_METASPACE = "\u2581"  # SentencePiece's word-start marker
TINY_SEED = 0

_TOKENIZER_CORPUS = """
Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a spotlighted stage.
A cinematic shot of a red fox running through fresh snow in a quiet forest at dawn.
An astronaut rides a horse across the surface of the moon, slow motion, highly detailed.
Waves crash against black volcanic rocks under a stormy sky, drone footage, 4k.
A cozy kitchen with steam rising from a cup of tea while rain falls outside the window.
Bright colors, overexposed, static, blurred details, subtitles, style, works, paintings, images, still.
overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers.
poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers.
一只小猫在花园里追逐蝴蝶，阳光明媚。 Un chat joue du piano dans un salon. Ein Hund läuft am Strand.
"""


def build_tokenizer():
    """A T5-style Unigram tokenizer built locally (no hub access), with pad=0, eos=1, unk=2 as in umT5.

    The vocabulary is counted from a small corpus instead of trained with `tokenizers`' UnigramTrainer,
    whose result changes from run to run (hash-map order); a reproducible checkpoint needs the same
    tokenizer every time.
    """
    from transformers import T5Tokenizer

    words = Counter(_METASPACE + word for word in _TOKENIZER_CORPUS.split())
    characters = Counter(char for word, count in words.items() for char in word for _ in range(count))
    pieces = words + characters
    total = sum(pieces.values())
    scored = sorted(((piece, math.log(count / total)) for piece, count in pieces.items()), key=lambda e: (-e[1], e[0]))
    return T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *scored], extra_ids=0, model_max_length=512)


def build_components(seed: int = TINY_SEED) -> dict:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
        )
    ).eval()
    torch.manual_seed(seed + 1)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
    # The scheduler Wan2.1 checkpoints ship: flow-matching UniPC.
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "transformer": transformer,
        "vae": vae,
        "scheduler": scheduler,
    }


# The tiny CLIP vision tower: 32x32 images in 8x8 patches -> 16 + 1 (class) tokens of width 32. Wan2.1 I2V
# uses ViT-H/14 at 224 px (257 tokens of 1280); the pipeline feeds the DiT the penultimate hidden states.
TINY_IMAGE_SIZE = 32
TINY_IMAGE_PATCH = 8
TINY_IMAGE_HIDDEN = 32
# model_index.json names the image processor class as real Wan2.1 I2V checkpoints do. (transformers saves
# the class it fell back to, CLIPImageProcessorPil, when torchvision is missing; loading either name works.)
IMAGE_PROCESSOR_CLASS = "CLIPImageProcessor"


def build_image_components(seed: int = TINY_SEED) -> dict:
    """What image-to-video adds: a CLIP vision encoder, its image processor, and the I2V DiT."""
    from diffusers import WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed + 3)
    image_encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=TINY_IMAGE_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=TINY_IMAGE_SIZE,
            patch_size=TINY_IMAGE_PATCH,
            projection_dim=TINY_IMAGE_HIDDEN,
            hidden_act="gelu",
        )
    ).eval()
    # OpenAI CLIP preprocessing (bicubic resize of the short side, centre crop, CLIP mean/std) at 32 px.
    image_processor = CLIPImageProcessor(size={"shortest_edge": TINY_IMAGE_SIZE},
                                         crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    torch.manual_seed(seed + 4)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=36,  # noise latents 16 + first-frame mask 4 + condition latents 16
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        image_dim=TINY_IMAGE_HIDDEN,
        added_kv_proj_dim=2 * 12,  # = the DiT's inner dim, as in Wan2.1 I2V (5120 for 14B)
    ).eval()
    return {"image_encoder": image_encoder, "image_processor": image_processor, "transformer": transformer}


def write_tiny_checkpoint(output_dir: Path, seed: int = TINY_SEED, kind: str = "t2v") -> Path:
    """Writes the tiny `kind` ("t2v" or "i2v") checkpoint to `output_dir`; the same files for the same seed."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    output_dir = Path(output_dir)
    if kind == "t2v":
        pipeline = WanPipeline(**build_components(seed))
    elif kind == "i2v":
        pipeline = WanImageToVideoPipeline(**{**build_components(seed), **build_image_components(seed)})
    else:
        raise ValueError(f"kind must be 't2v' or 'i2v', got {kind!r}")
    pipeline.save_pretrained(output_dir)
    if kind == "i2v":
        index_path = output_dir / "model_index.json"
        index = json.loads(index_path.read_text())
        index["image_processor"] = ["transformers", IMAGE_PROCESSOR_CLASS]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (output_dir / SERVING_DEFAULTS_FILE).write_text(json.dumps(TINY_SERVING_DEFAULTS, indent=2) + "\n")
    return output_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", type=Path, help="folder to write the diffusers-format checkpoint to")
    parser.add_argument("--kind", choices=("t2v", "i2v"), default="t2v",
                        help="t2v: WanPipeline (default); i2v: WanImageToVideoPipeline")
    parser.add_argument("--seed", type=int, default=TINY_SEED, help="seed of the random weights")
    args = parser.parse_args()
    print(write_tiny_checkpoint(args.output_dir, args.seed, args.kind))


if __name__ == "__main__":
    main()
