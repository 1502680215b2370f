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
    # ---- access control, limits, shutdown and retention (SECURITY.md) ----
    api_key: tuple[str, ...] = field(default=(), repr=False, metadata={
        "help": "API key that every /v1 route requires as 'Authorization: Bearer KEY'; repeat the flag for "
                "several (the environment takes a comma-separated list); none = no key needed",
        "shown": "none"})
    api_key_file: Path | None = field(default=None, metadata={
        "help": "file with more API keys, one a line ('#' starts a comment); keeps keys out of the process "
                "list", "shown": "none"})
    max_prompt_chars: int = field(default=16384, metadata={
        "help": "prompt and negative_prompt are cut to this many characters (the text encoder reads at most "
                "512 tokens anyway)"})
    max_list_limit: int = field(default=1000, metadata={
        "help": "most task records one GET /v1/tasks/ answers (its default and cap of ?limit=; page on with "
                "?offset=)"})
    body_timeout: float = field(default=60.0, metadata={
        "help": "a request body must arrive within this many seconds (408 beyond: slow uploads)"})
    max_connections: int = field(default=1000, metadata={
        "help": "open connections and requests at once; beyond it new ones get 503"})
    shutdown_grace: float = field(default=10.0, metadata={
        "help": "on SIGTERM/SIGINT: new tasks get 503, and running ones get this many seconds to finish "
                "before they are stopped (failed 'interrupted'); pending ones stay queued for the next start"})
    retention_max_age: float = field(default=0.0, metadata={
        "help": "delete result and input files older than this many seconds (0 = keep; 604800 = a week)"})
    retention_max_bytes: int = field(default=0, metadata={
        "help": "keep result and input files under this many bytes in all, deleting the oldest first "
                "(0 = no limit)"})
    retention_min_age: float = field(default=3600.0, metadata={
        "help": "the byte limit never deletes a file younger than this many seconds"})
    retention_interval: float = field(default=60.0, metadata={
        "help": "seconds between two retention sweeps"})
    failure_threshold: int = field(default=3, metadata={
        "help": "after this many tasks in a row fail in the model server, start no task for "
                "--failure-cooldown seconds, then try one (0 = never pause)"})
    failure_cooldown: float = field(default=30.0, metadata={
        "help": "seconds the queue waits after --failure-threshold failures in a row"})
    access_log: bool = field(default=True, metadata={
        "help": "log one line per HTTP request (many clients polling status make many lines)"})

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


def _split_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _converter(annotation: str):
    if annotation.startswith("tuple"):
        return _split_list
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
        shown = item.metadata.get("shown", "the model's" if item.default is None else item.default)
        help_text = f"{item.metadata['help']} [env {environment}; default {shown}]"
        if convert is _split_list:  # repeatable; flags replace the environment's list (see parse_settings)
            parser.add_argument(flag, dest=item.name, action="append", default=None, help=help_text)
        elif convert is _parse_bool:
            parser.add_argument(flag, dest=item.name, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=item.name, type=convert, default=default, help=help_text)
    return parser


def parse_settings(argv: list[str] | None = None) -> Settings:
    values = vars(build_parser().parse_args(argv))
    for item in fields(Settings):
        if _converter(str(item.type)) is _split_list:
            given = values[item.name]
            values[item.name] = (tuple(given) if given is not None
                                 else _split_list(os.environ.get(env_name(item.name), "")))
    settings = Settings(**values)
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
    problems.extend(validate_hardening(settings))
    if settings.max_image_bytes < 1024 or settings.max_image_pixels < 1 or settings.url_fetch_timeout <= 0:
        problems.append("--max-image-bytes must be at least 1024, --max-image-pixels and --url-fetch-timeout "
                        "above 0")
    try:
        from frontend.images import parse_networks

        parse_networks(settings.url_fetch_allow_networks)
    except ValueError as error:
        problems.append(f"--url-fetch-allow-networks: {error}")
    return problems


def validate_hardening(settings: Settings) -> list[str]:
    """Access-control, limit, shutdown and retention settings."""
    problems = []
    if any(len(key) < 16 or any(char.isspace() for char in key) for key in settings.api_key):
        problems.append("--api-key: keys must be at least 16 characters without spaces")
    if settings.api_key_file is not None and not settings.api_key_file.is_file():
        problems.append("--api-key-file: not a readable file")
    if settings.max_prompt_chars < 1 or settings.max_list_limit < 1 or settings.max_connections < 1:
        problems.append("--max-prompt-chars, --max-list-limit and --max-connections must be at least 1")
    if settings.body_timeout <= 0 or settings.shutdown_grace < 0:
        problems.append("--body-timeout must be above 0 and --shutdown-grace 0 or more")
    if min(settings.retention_max_age, settings.retention_max_bytes, settings.retention_min_age) < 0 \
            or settings.retention_interval <= 0:
        problems.append("retention limits must be 0 or more and --retention-interval above 0")
    if settings.failure_threshold < 0 or settings.failure_cooldown < 0:
        problems.append("--failure-threshold and --failure-cooldown must be 0 or more")
    return problems
