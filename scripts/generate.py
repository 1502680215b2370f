"""Generate one video straight from Triton's `wan_pipeline` model (gRPC streaming), without the front end.

    python scripts/generate.py --url 127.0.0.1:8101 --prompt "two cats boxing" --output cats.mp4

Shows one progress-bar tick per denoising step; Ctrl-C cancels the request on the server within one step.
Options left out take the served model's defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from frontend.triton_client import PipelineError, TritonPipelineClient  # noqa: E402

OPTIONAL_INPUTS = ("negative_prompt", "seed", "num_inference_steps", "num_frames", "height", "width",
                   "guidance_scale", "shift", "fps")


async def generate(args: argparse.Namespace) -> dict:
    client = TritonPipelineClient(args.url, args.model)
    inputs = {"prompt": args.prompt}
    inputs.update({name: getattr(args, name) for name in OPTIONAL_INPUTS if getattr(args, name) is not None})
    progress = tqdm(desc="denoising", unit="step")

    async def on_progress(step: int, total_steps: int) -> None:
        progress.total = total_steps
        progress.update(step - progress.n)

    try:
        generation = await client.generate(inputs, on_progress)
    finally:
        progress.close()
        await client.close()
    args.output.write_bytes(generation.video)
    return generation.metadata


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="127.0.0.1:8101", help="Triton gRPC endpoint (default %(default)s)")
    parser.add_argument("--model", default="wan_pipeline", help="pipeline model name (default %(default)s)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", dest="negative_prompt")
    parser.add_argument("--seed", type=int, help="default: a random seed (the metadata printed at the end says which)")
    parser.add_argument("--steps", dest="num_inference_steps", type=int)
    parser.add_argument("--frames", dest="num_frames", type=int, help="rounded to 4k+1")
    parser.add_argument("--height", type=int, help="multiple of 16")
    parser.add_argument("--width", type=int, help="multiple of 16")
    parser.add_argument("--guidance-scale", dest="guidance_scale", type=float, help="1.0 disables CFG")
    parser.add_argument("--shift", type=float, help="flow-matching shift")
    parser.add_argument("--fps", type=int)
    parser.add_argument("--output", type=Path, default=Path("output.mp4"), help="mp4 to write")
    args = parser.parse_args(argv)
    try:
        metadata = asyncio.run(generate(args))
    except PipelineError as error:
        print(f"generate: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("generate: cancelled", file=sys.stderr)
        return 130
    print(json.dumps(metadata, indent=2))
    print(f"saved {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
