"""Front-end settings: every one comes from a CLI flag, else an environment variable, else its default.

`python -m frontend --help` lists them all with their environment names; `Settings()` with no arguments
gives the defaults (tests build it directly).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "WAN_"


@dataclass(frozen=True)
class Settings:
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0 for all)"})
    port: int = field(default=8000, metadata={"help": "HTTP port of the /v1 API"})
    triton_url: str = field(default="127.0.0.1:8001", metadata={"help": "Triton gRPC endpoint, host:port"})
    model_name: str = field(default="wan_pipeline", metadata={"help": "the decoupled pipeline model to call"})
    data_dir: Path = field(default=Path("server_data"), metadata={
        "help": "data folder: tasks.sqlite3, outputs/ (results, downloads) and inputs/ (uploads)"})
    slots: int = field(default=1, metadata={"help": "tasks that run at once (pipeline slots)"})
    max_queue_size: int = field(default=10, metadata={
        "help": "pending tasks allowed to wait; beyond it POST answers 429 with Retry-After"})
    strict_busy: bool = field(default=False, metadata={
        "help": "lightx2v busy mode: POST answers 400 'Service busy' unless the task can start at once"})
    task_timeout: float = field(default=3600.0, metadata={"help": "limit on one Triton call, seconds"})
    triton_poll_interval: float = field(default=1.0, metadata={
        "help": "how often Triton and model readiness are checked, seconds"})
    max_request_bytes: int = field(default=1 << 20, metadata={"help": "JSON request body limit (413 beyond)"})
    max_upload_bytes: int = field(default=20 << 20, metadata={
        "help": "multipart (/v1/tasks/form) body limit, image included (413 beyond)"})
    allow_url_fetch: bool = field(default=False, metadata={
        "help": "accept http(s) URLs as image_path (off by default: SSRF)"})
    max_image_bytes: int = field(default=10 << 20, metadata={
        "help": "largest image input (upload, base64 or fetched), bytes (upload: 413 beyond, else 400)"})
    max_image_pixels: int = field(default=4096 * 4096, metadata={
        "help": "largest image input, width x height (decompression-bomb guard)"})
    url_fetch_timeout: float = field(default=10.0, metadata={
        "help": "limit on fetching one image URL, redirects included, seconds"})
    url_fetch_allow_networks: str = field(default="", metadata={
        "help": "comma-separated networks (CIDR) that URL fetching may reach although private, e.g. an internal "
                "image store; every other private, loopback, link-local or reserved address stays refused"})
    default_infer_steps: int | None = field(default=None, metadata={
        "help": "override the model's default number of denoising steps"})
    default_target_video_length: int | None = field(default=None, metadata={
        "help": "override the model's default frame count"})
    default_height: int | None = field(default=None, metadata={"help": "override the model's default height"})
    default_width: int | None = field(default=None, metadata={"help": "override the model's default width"})
    default_guidance_scale: float | None = field(default=None, metadata={
        "help": "override the model's default guidance scale"})
    default_sample_shift: float | None = field(default=None, metadata={
        "help": "override the model's default flow-matching shift"})
    default_fps: int | None = field(default=None, metadata={"help": "override the model's default fps"})
    default_seed: int = field(default=42, metadata={"help": "seed when a request has none"})
    log_level: str = field(default="info", metadata={"help": "debug, info, warning or error"})
    log_format: str = field(default="text", metadata={"help": "text or json (one object per line)"})

    @property
    def output_dir(self) -> Path:
        return self.data_dir / "outputs"

    @property
    def input_dir(self) -> Path:
        return self.data_dir / "inputs"

    @property
    def database_path(self) -> Path:
        return self.data_dir / "tasks.sqlite3"

    def parameter_overrides(self) -> dict[str, Any]:
        """Request-field defaults set here, by request field name; None means "the model's default"."""
        return {"infer_steps": self.default_infer_steps, "target_video_length": self.default_target_video_length,
                "height": self.default_height, "width": self.default_width,
                "guidance_scale": self.default_guidance_scale, "sample_shift": self.default_sample_shift,
                "fps": self.default_fps, "seed": self.default_seed}


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def _converter(annotation: str):
    if annotation.startswith("bool"):
        return _parse_bool
    if annotation.startswith("int"):
        return int
    if annotation.startswith("float"):
        return float
    if annotation.startswith("Path"):
        return Path
    return str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m frontend",
        description="The /v1 text-to-video API (lightx2v-compatible) in front of Triton's wan_pipeline model.",
        epilog="Every flag can also be set by the environment variable shown; a flag wins over it. "
               "Booleans in the environment: 1/true/yes/on or 0/false/no/off.",
    )
    for item in fields(Settings):
        convert = _converter(str(item.type))
        flag = "--" + item.name.replace("_", "-")
        environment = env_name(item.name)
        default = item.default
        if environment in os.environ:
            try:
                default = convert(os.environ[environment])
            except (ValueError, argparse.ArgumentTypeError) as error:
                parser.error(f"{environment}: {error}")
        shown = "the model's" if item.default is None else item.default
        help_text = f"{item.metadata['help']} [env {environment}; default {shown}]"
        if convert is _parse_bool:
            parser.add_argument(flag, dest=item.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=item.name, type=convert, default=default, help=help_text)
    return parser


def parse_settings(argv: list[str] | None = None) -> Settings:
    args = build_parser().parse_args(argv)
    settings = Settings(**vars(args))
    problems = validate(settings)
    if problems:
        build_parser().error("; ".join(problems))
    return settings


def validate(settings: Settings) -> list[str]:
    problems = []
    if settings.slots < 1:
        problems.append("--slots must be at least 1")
    if settings.max_queue_size < 0:
        problems.append("--max-queue-size must be 0 or more")
    if settings.log_format not in ("text", "json"):
        problems.append("--log-format must be text or json")
    if settings.max_request_bytes < 1024 or settings.max_upload_bytes < 1024:
        problems.append("body limits must be at least 1024 bytes")
    if settings.max_image_bytes < 1024 or settings.max_image_pixels < 1 or settings.url_fetch_timeout <= 0:
        problems.append("--max-image-bytes must be at least 1024, --max-image-pixels and --url-fetch-timeout "
                        "above 0")
    try:
        from frontend.images import parse_networks

        parse_networks(settings.url_fetch_allow_networks)
    except ValueError as error:
        problems.append(f"--url-fetch-allow-networks: {error}")
    return problems
