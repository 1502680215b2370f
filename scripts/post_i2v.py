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
import mimetypes
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from post import add_task_arguments, run, task_fields  # noqa: E402  (the same options, polling and download)

PROMPT = "The cat in the picture slowly turns its head toward the camera and blinks, soft light, gentle motion."
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", type=Path, help="upload this image file (multipart, /v1/tasks/form)")
    source.add_argument("--image-base64", type=Path, metavar="FILE",
                        help="send this image file as a base64 data URI in the JSON body (/v1/tasks/)")
    source.add_argument("--image-path", metavar="VALUE",
                        help="an image_path the server resolves: a path in its input folder, or an http(s) URL")
    add_task_arguments(parser, PROMPT)
    return parser.parse_args(argv)


def data_uri(path: Path) -> str:
    media_type = mimetypes.guess_type(path.name)[0] or "image/png"
    if not media_type.startswith("image/"):
        media_type = "image/png"  # the server reads the bytes, not the name
    return f"data:{media_type};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def post_task(client: httpx.Client, args: argparse.Namespace) -> httpx.Response:
    fields = task_fields(args)
    if args.image is not None:
        media_type = mimetypes.guess_type(args.image.name)[0] or "application/octet-stream"
        with open(args.image, "rb") as handle:
            return client.post("/v1/tasks/form", data={key: str(value) for key, value in fields.items()},
                               files={"image_file": (args.image.name, handle, media_type)})
    image_path = data_uri(args.image_base64) if args.image_base64 is not None else args.image_path
    return client.post("/v1/tasks/", json={**fields, "image_path": image_path})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args, lambda client: post_task(client, args))
    except OSError as error:  # the image file
        print(f"cannot read the image: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
