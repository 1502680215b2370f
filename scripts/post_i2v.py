"""Image-to-video through the /v1 API: send a conditioning image with a prompt, follow the progress, download the mp4.

    python scripts/post_i2v.py --image cat.png [--url http://127.0.0.1:8000] [--output cat_i2v.mp4] ...
    python scripts/post_i2v.py --image-base64 cat.jpg ...     # the image as a data URI in the JSON body
    python scripts/post_i2v.py --image-path imgs/cat.png ...  # a file already in the server's input folder
                                                              # (or an http(s) URL, if the server fetches URLs)

`--image` uploads the file on /v1/tasks/form (the server stores it as <task_id>.<ext> in its input folder);
`--image-base64` posts JSON to /v1/tasks/ with `image_path` = `data:image/...;base64,...` (mind the server's
JSON body limit, --max-request-bytes, 1 MiB by default). Without --height/--width the server derives the video
size from the image's aspect ratio at about the model's default area.

Exit status: 0 when the video was downloaded, 1 when the task failed or was cancelled, 2 on a request error.
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from post import NEGATIVE_PROMPT, download, follow  # noqa: E402  (the same polling and download as post.py)

PROMPT = "The cat in the picture slowly turns its head toward the camera and blinks, soft light, gentle motion."
OPTIONAL_FIELDS = ("task_id", "save_video_path", "infer_steps", "target_video_length", "seed", "height", "width",
                   "guidance_scale", "sample_shift", "fps")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", type=Path, help="upload this image file (multipart, /v1/tasks/form)")
    source.add_argument("--image-base64", type=Path, metavar="FILE",
                        help="send this image file as a base64 data URI in the JSON body (/v1/tasks/)")
    source.add_argument("--image-path", metavar="VALUE",
                        help="an image_path the server resolves: a path in its input folder, or an http(s) URL")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of the /v1 API")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--negative-prompt", default=NEGATIVE_PROMPT)
    parser.add_argument("--save-video-path", default=None,
                        help="where the server writes the video, relative to its output folder "
                             "(default: <task_id>.mp4)")
    parser.add_argument("--output", type=Path, default=None,
                        help="local file to download to (default: the basename of the server's save_video_path)")
    parser.add_argument("--task-id")
    parser.add_argument("--infer-steps", type=int)
    parser.add_argument("--target-video-length", type=int)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--height", type=int, help="default: derived from the image")
    parser.add_argument("--width", type=int, help="default: derived from the image")
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--sample-shift", type=float)
    parser.add_argument("--fps", type=int)
    parser.add_argument("--poll-interval", type=float, default=0.5, help="seconds between status polls")
    parser.add_argument("--timeout", type=float, default=3600, help="give up after this many seconds")
    parser.add_argument("--no-wait", action="store_true", help="post and print the answer only")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def build_fields(args: argparse.Namespace) -> dict:
    """The request fields other than the image (the same names on the JSON and the form route)."""
    fields = {"prompt": args.prompt, "negative_prompt": args.negative_prompt}
    for name in OPTIONAL_FIELDS:
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    return fields


def data_uri(path: Path) -> str:
    media_type = mimetypes.guess_type(path.name)[0] or "image/png"
    if not media_type.startswith("image/"):
        media_type = "image/png"  # the server reads the bytes, not the name
    return f"data:{media_type};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def post_task(client: httpx.Client, args: argparse.Namespace) -> httpx.Response:
    fields = build_fields(args)
    if args.image is not None:
        media_type = mimetypes.guess_type(args.image.name)[0] or "application/octet-stream"
        with open(args.image, "rb") as handle:
            return client.post("/v1/tasks/form", data={key: str(value) for key, value in fields.items()},
                               files={"image_file": (args.image.name, handle, media_type)})
    image_path = data_uri(args.image_base64) if args.image_base64 is not None else args.image_path
    return client.post("/v1/tasks/", json={**fields, "image_path": image_path})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with httpx.Client(base_url=args.url.rstrip("/"), timeout=60) as client:
        try:
            answer = post_task(client, args)
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
                  f"{message.get('target_video_length')} frames, input {message.get('image_path')})")
            return 0
        except (httpx.HTTPError, TimeoutError) as error:
            print(f"request failed: {error}", file=sys.stderr)
            return 2
        except OSError as error:  # the image file
            print(f"cannot read the image: {error}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
