"""Session fixtures shared by the test suite: the tiny checkpoint, a built model repository, and real
servers (tritonserver; the front end's fixtures live in tests/e2e) on free loopback ports."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE = REPO_ROOT / ".cache" / "tests"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    from export.tiny_checkpoint import write_tiny_checkpoint

    path = CACHE / "tiny_checkpoint"
    if not (path / "model_index.json").exists():
        write_tiny_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def model_repository(tiny_checkpoint: Path) -> Path:
    """The ONNX Runtime repository of the tiny checkpoint; the build is a no-op when nothing changed."""
    output = CACHE / "model_repository"
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "export" / "build_engines.py"), "--checkpoint", str(tiny_checkpoint),
         "--output", str(output), "--backend", "onnxruntime"],
        check=True,
    )
    return output


# --- image-to-video (i2v): the tiny WanImageToVideoPipeline checkpoint, its repository, its reference pipeline


@pytest.fixture(scope="session")
def tiny_checkpoint_i2v() -> Path:
    from export.tiny_checkpoint import write_tiny_checkpoint

    path = CACHE / "tiny_checkpoint_i2v"
    if not (path / "model_index.json").exists():
        write_tiny_checkpoint(path, kind="i2v")
    return path


@pytest.fixture(scope="session")
def model_repository_i2v(tiny_checkpoint_i2v: Path) -> Path:
    """The ONNX Runtime repository of the tiny i2v checkpoint; the build is a no-op when nothing changed."""
    output = CACHE / "model_repository_i2v"
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "export" / "build_engines.py"), "--checkpoint", str(tiny_checkpoint_i2v),
         "--output", str(output), "--backend", "onnxruntime"],
        check=True,
    )
    return output


@pytest.fixture(scope="session")
def wan_i2v_pipeline(tiny_checkpoint_i2v: Path):
    """diffusers' WanImageToVideoPipeline on the tiny i2v checkpoint: the reference the BLS must match.

    diffusers 0.42's pipeline_wan_i2v calls ftfy.fix_text unconditionally (pipeline_wan.py checks
    is_ftfy_available first), so without ftfy installed it fails with a NameError. Without ftfy the BLS skips
    that step, so the reference gets the same: an identity fix_text, only when ftfy is missing."""
    import types

    import diffusers.pipelines.wan.pipeline_wan_i2v as pipeline_module
    from diffusers import WanImageToVideoPipeline

    if not hasattr(pipeline_module, "ftfy"):
        pipeline_module.ftfy = types.SimpleNamespace(fix_text=lambda text: text)
    pipeline = WanImageToVideoPipeline.from_pretrained(tiny_checkpoint_i2v)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
