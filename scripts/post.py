"""Post the cats-boxing prompt to the /v1 API (as lightx2v's post.py does), follow its progress, download the mp4.

    python scripts/post.py [--url http://127.0.0.1:8000] [--output cats.mp4] [--infer-steps N] ...

Exit status: 0 when the video was downloaded, 1 when the task failed or was cancelled, 2 on a request error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import httpx
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api_client import add_server_arguments, open_client  # noqa: E402

PROMPT = "Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a spotlighted stage."
NEGATIVE_PROMPT = (
    "镜头晃动，色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
OPTIONAL_FIELDS = ("task_id", "save_video_path", "infer_steps", "target_video_length", "seed", "height", "width", "guidance_scale",
                   "sample_shift", "fps")


def add_task_arguments(parser: argparse.ArgumentParser, prompt: str) -> None:
    """The options post.py and post_i2v.py share: server, request fields, polling."""
    add_server_arguments(parser)
    parser.add_argument("--prompt", default=prompt)
    parser.add_argument("--negative-prompt", default=NEGATIVE_PROMPT)
    # No fixed default name (lightx2v's cat_boxing_seed42.mp4): every run would overwrite the last one's
    # result on the server, and older tasks' /result would serve the new video.
    parser.add_argument("--save-video-path",
                        help="where the server writes the video, relative to its output folder "
                             "(default: the server's <task_id>.mp4)")
    parser.add_argument("--output", type=Path, default=None,
                        help="local file to download to (default: the basename of the server's save_video_path)")
    parser.add_argument("--task-id")
    parser.add_argument("--infer-steps", type=int)
    parser.add_argument("--target-video-length", type=int)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--sample-shift", type=float)
    parser.add_argument("--fps", type=int)
    parser.add_argument("--poll-interval", type=float, default=0.5, help="seconds between status polls")
    parser.add_argument("--timeout", type=float, default=3600, help="give up after this many seconds")
    parser.add_argument("--no-wait", action="store_true", help="post and print the answer only")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_task_arguments(parser, PROMPT)
    return parser.parse_args(argv)


def task_fields(args: argparse.Namespace) -> dict:
    """The request fields other than the image (the same names on the JSON and the form route)."""
    fields = {"prompt": args.prompt, "negative_prompt": args.negative_prompt}
    fields.update({name: getattr(args, name) for name in OPTIONAL_FIELDS if getattr(args, name) is not None})
    return fields


def follow(client: httpx.Client, task_id: str, args: argparse.Namespace) -> dict:
    """Poll the task until it ends, drawing its denoising steps as a progress bar."""
    deadline = time.monotonic() + args.timeout
    bar = None
    try:
        while True:
            record = client.get(f"/v1/tasks/{task_id}/status").raise_for_status().json()
            progress = record.get("progress") or {}
            total, step = progress.get("total_steps") or 0, progress.get("step") or 0
            if not args.quiet and total:
                if bar is None:
                    bar = tqdm(total=total, desc=task_id, unit="step")
                bar.update(step - bar.n)
            elif not args.quiet and bar is None and record["status"] == "pending":
                print(f"{task_id}: pending (queue position {record.get('queue_position')})", file=sys.stderr)
            if record["status"] in ("completed", "failed", "cancelled"):
                return record
            if time.monotonic() > deadline:
                raise TimeoutError(f"task {task_id} not finished after {args.timeout:g} s")
            time.sleep(args.poll_interval)
    finally:
        if bar is not None:
            bar.close()


def download(client: httpx.Client, task_id: str, output: Path) -> int:
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".part")
    with client.stream("GET", f"/v1/tasks/{task_id}/result") as response:
        response.raise_for_status()
        with open(partial, "wb") as handle:
            for chunk in response.iter_bytes():
                handle.write(chunk)
    partial.replace(output)
    return output.stat().st_size


def run(args: argparse.Namespace, submit: Callable[[httpx.Client], httpx.Response]) -> int:
    """Submit the task, follow it, download the result; the exit status of the docstring."""
    with open_client(args, timeout=60) as client:
        try:
            answer = submit(client)
            if answer.status_code != 200:
                print(f"post failed: {answer.status_code} {answer.text}", file=sys.stderr)
                return 2
            task = answer.json()
            print(json.dumps(task))
            if args.no_wait:
                return 0
            record = follow(client, task["task_id"], args)
            if record["status"] != "completed":
                print(f"task {record['status']}: {record.get('error')}", file=sys.stderr)
                return 1
            message = record.get("message", {})
            output = args.output or Path(Path(task["save_video_path"]).name)
            size = download(client, task["task_id"], output)
            print(f"downloaded {output} ({size} bytes; {message.get('width')}x{message.get('height')}, "
                  f"{message.get('target_video_length')} frames)")
            return 0
        except (httpx.HTTPError, TimeoutError) as error:
            print(f"request failed: {error}", file=sys.stderr)
            return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(args, lambda client: client.post("/v1/tasks/", json={**task_fields(args), "image_path": ""}))


if __name__ == "__main__":
    sys.exit(main())
