"""The embedded default model: a tiny random-weight Wan2.1 text-to-video checkpoint.

It is built from the same diffusers/transformers classes as a real Wan2.1 checkpoint and saved in
diffusers format, so every serving code path (export, Triton, front end) runs exactly as it would on
real weights - but the weights are random, so the generated video is noise.
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


def write_tiny_checkpoint(output_dir: Path, seed: int = TINY_SEED) -> Path:
    from diffusers import WanPipeline

    output_dir = Path(output_dir)
    pipeline = WanPipeline(**build_components(seed))
    pipeline.save_pretrained(output_dir)
    (output_dir / SERVING_DEFAULTS_FILE).write_text(json.dumps(TINY_SERVING_DEFAULTS, indent=2) + "\n")
    return output_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output_dir", type=Path, help="folder to write the diffusers-format checkpoint to")
    parser.add_argument("--seed", type=int, default=TINY_SEED, help="seed of the random weights")
    args = parser.parse_args()
    print(write_tiny_checkpoint(args.output_dir, args.seed))


if __name__ == "__main__":
    main()
