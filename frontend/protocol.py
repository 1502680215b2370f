"""The /v1 wire format: request, response and task-record models, and the request validation rules.

Two kinds of rule live here:
- static ones, checked by pydantic when a request is parsed (types, ranges, `save_video_path` confinement);
  they answer 422;
- model-dependent ones (`resolve_parameters`): the served model's defaults and limits, read from Triton.
"""

from __future__ import annotations

import math
import re
import secrets
import string
from dataclasses import dataclass
from enum import Enum
from pathlib import PurePosixPath
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator

TASK_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
RESERVED_TASK_IDS = frozenset({"running"})  # DELETE /v1/tasks/running would be ambiguous
MAX_SEED = 2**63 - 1
MAX_INFER_STEPS = 1000
MAX_PATH_CHARS = 1024
# File systems allow 255 bytes a name; the result is first written as `.<name>.XXXXXXXX.tmp` beside it.
MAX_NAME_BYTES = 240


class TaskStatus(str, Enum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED)


def generate_task_id() -> str:
    """Five groups of four `[A-Z0-9]` characters joined by `-`, as lightx2v makes them."""
    alphabet = string.ascii_uppercase + string.digits
    return "-".join("".join(secrets.choice(alphabet) for _ in range(4)) for _ in range(5))


def task_id_problem(task_id: str) -> str | None:
    """Why a client-chosen task id cannot be used (None when it can, uniqueness aside)."""
    if not TASK_ID_PATTERN.fullmatch(task_id):
        return "task_id must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'"
    if task_id in RESERVED_TASK_IDS:
        return f"task_id {task_id!r} is reserved"
    return None


# C0 controls (NUL included) but tab, newline and carriage return; DEL; lone UTF-16 surrogates (JSON "\ud800"
# decodes to one, and it cannot be encoded as UTF-8: not storable, not sendable to the model).
_FORBIDDEN_IN_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def text_problem(value: str) -> str | None:
    """Why a free-text field (prompt, image_path) cannot be taken, or None."""
    if _FORBIDDEN_IN_TEXT.search(value):
        return "must be valid text without NUL or control characters (tab and newline are fine)"
    return None


def normalize_save_video_path(value: str) -> str:
    """A relative `.mp4` path under the output folder, normalised (`./a//b.mp4` -> `a/b.mp4`).

    Lexical rules only; the real-path check against symlinks happens when the file is written.
    """
    if len(value) > MAX_PATH_CHARS:
        raise ValueError(f"must be at most {MAX_PATH_CHARS} characters")
    if any(ord(char) < 32 or char == "\x7f" or 0xD800 <= ord(char) <= 0xDFFF for char in value) or "\\" in value:
        raise ValueError("must not contain control characters or backslashes")
    path = PurePosixPath(value)
    if path.is_absolute():
        raise ValueError("must be a relative path under the output folder, not an absolute path")
    if ".." in path.parts:
        raise ValueError("must not contain '..'")
    if not path.parts or path.suffix.lower() != ".mp4" or not path.stem:
        raise ValueError("must be a file name ending in .mp4")
    if any(len(part.encode("utf-8")) > MAX_NAME_BYTES for part in path.parts):
        raise ValueError(f"each folder or file name must be at most {MAX_NAME_BYTES} bytes")
    return path.as_posix()


class TaskRequest(BaseModel):
    """Body of POST /v1/tasks/ (and the fields of /v1/tasks/form). None means "the documented default"."""

    model_config = ConfigDict(extra="ignore")

    task_id: str | None = None
    prompt: str = ""
    negative_prompt: str = ""
    image_path: str = ""
    save_video_path: str | None = None
    infer_steps: int | None = Field(None, ge=1, le=MAX_INFER_STEPS)
    target_video_length: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    height: int | None = Field(None, ge=16, multiple_of=16)
    width: int | None = Field(None, ge=16, multiple_of=16)
    guidance_scale: float | None = Field(None, ge=0.0, le=100.0, allow_inf_nan=False)
    sample_shift: float | None = Field(None, gt=0.0, le=100.0, allow_inf_nan=False)
    fps: int | None = Field(None, ge=1, le=120)
    # Accepted for lightx2v compatibility and ignored.
    use_prompt_enhancer: Any = None
    num_fragments: Any = None
    audio_path: Any = None
    video_duration: Any = None

    @field_validator("prompt", "negative_prompt", "image_path", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return "" if value is None else value

    @field_validator("prompt", "negative_prompt", "image_path")
    @classmethod
    def _clean_text(cls, value: str) -> str:
        problem = text_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("infer_steps", "target_video_length", "seed", "height", "width", "fps", "guidance_scale",
                     "sample_shift", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any) -> Any:
        if isinstance(value, bool):  # JSON true is not 1 here: a client that sends it has a bug
            raise ValueError("must be a number, not true/false")
        return value

    @field_validator("task_id", mode="before")
    @classmethod
    def _empty_id_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("save_video_path")
    @classmethod
    def _confined_save_path(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        return normalize_save_video_path(value)

    @classmethod
    def from_form(cls, fields: Mapping[str, str]) -> "TaskRequest":
        """Form parts are strings; an empty part means the field was left out, as in JSON."""
        known = set(cls.model_fields)
        data = {key: value for key, value in fields.items() if key in known and value != ""}
        return cls.model_validate(data)


@dataclass(frozen=True)
class ModelInfo:
    """What the served pipeline model says about itself (its Triton config `parameters`)."""

    model_name: str
    model_kind: str  # "t2v" or "i2v"
    backend: str
    default_height: int
    default_width: int
    default_num_frames: int
    default_num_inference_steps: int
    default_guidance_scale: float
    default_shift: float
    default_fps: int
    min_height: int
    max_height: int
    min_width: int
    max_width: int
    max_num_frames: int
    max_num_inference_steps: int = MAX_INFER_STEPS

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> "ModelInfo":
        """From Triton's `parameters` map (every value a string); a missing one raises KeyError."""
        values: dict[str, Any] = {}
        for name, kind in cls.__annotations__.items():
            if name not in parameters:
                if name == "max_num_inference_steps":
                    continue
                raise KeyError(name)
            raw = parameters[name]
            values[name] = int(raw) if kind == "int" else float(raw) if kind == "float" else str(raw)
        return cls(**values)

    def defaults(self) -> dict[str, Any]:
        """The model's defaults by request field name."""
        return {"infer_steps": self.default_num_inference_steps, "target_video_length": self.default_num_frames,
                "height": self.default_height, "width": self.default_width,
                "guidance_scale": self.default_guidance_scale, "sample_shift": self.default_shift,
                "fps": self.default_fps}


# Request fields that become pipeline inputs, in the order the task record lists them.
MODEL_FIELDS = ("infer_steps", "target_video_length", "seed", "height", "width", "guidance_scale",
                "sample_shift", "fps")


def round_frames(frames: int, max_frames: int) -> int:
    """Wan needs 4k+1 frames: the nearest such count, never above the maximum."""
    rounded = 4 * math.floor((frames - 1) / 4 + 0.5) + 1
    while rounded > max_frames and rounded > 1:
        rounded -= 4
    return rounded


class ParameterError(ValueError):
    """A request value the served model cannot take (answered 422)."""


def resolve_parameters(message: Mapping[str, Any], info: ModelInfo,
                       overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every model field of `message` with its value: the request's, else the server's override, else the
    model's default; checked against the model's limits. Idempotent on its own result."""
    fallback = {**info.defaults(), "seed": 42, "fps": 16}
    for name, value in (overrides or {}).items():
        if value is not None:
            fallback[name] = value
    values = {name: message.get(name) if message.get(name) is not None else fallback.get(name)
              for name in MODEL_FIELDS}
    problems = []
    if not 1 <= values["infer_steps"] <= min(MAX_INFER_STEPS, info.max_num_inference_steps):
        problems.append(f"infer_steps: must be 1..{min(MAX_INFER_STEPS, info.max_num_inference_steps)}, "
                        f"got {values['infer_steps']}")
    if not 1 <= values["target_video_length"] <= info.max_num_frames:
        problems.append(f"target_video_length: must be 1..{info.max_num_frames}, got {values['target_video_length']}")
    else:
        values["target_video_length"] = round_frames(values["target_video_length"], info.max_num_frames)
    for name, low, high in (("height", info.min_height, info.max_height), ("width", info.min_width, info.max_width)):
        if values[name] % 16 or not low <= values[name] <= high:
            problems.append(f"{name}: must be a multiple of 16 in {low}..{high}, got {values[name]}")
    if not 0 <= values["seed"] <= MAX_SEED:
        problems.append(f"seed: must be 0..2^63-1, got {values['seed']}")
    if problems:
        raise ParameterError("; ".join(problems))
    values["guidance_scale"] = float(values["guidance_scale"])
    values["sample_shift"] = float(values["sample_shift"])
    return values


# ---- responses ---------------------------------------------------------------------------------------


class Progress(BaseModel):
    step: int = 0
    total_steps: int = 0


class TaskRecord(BaseModel):
    """What GET /v1/tasks/{id}/status answers, and what the store keeps."""

    task_id: str
    status: TaskStatus
    message: dict[str, Any]
    progress: Progress = Field(default_factory=Progress)
    queue_position: int | None = None
    created_at: str
    start_time: str | None = None
    completion_time: str | None = None
    error: str | None = None
    save_video_path: str
    success: bool = False


class TaskResponse(BaseModel):
    task_id: str
    task_status: TaskStatus
    save_video_path: str


class StopResponse(BaseModel):
    stop_status: str  # "success" or "do_nothing"
    reason: str


class ServiceStatus(BaseModel):
    service_status: str  # "idle" or "busy"
    task_id: str | None = None
    start_time: str | None = None
    queue_length: int = 0
    ready: bool = False


class ServiceMetadata(BaseModel):
    model_name: str | None
    model_kind: str | None
    backend: str | None
    triton_model: str
    ready: bool
    defaults: dict[str, Any]
    limits: dict[str, Any]
    supported_inputs: list[str]
    ignored_fields: list[str] = ["use_prompt_enhancer", "num_fragments", "audio_path", "video_duration"]
