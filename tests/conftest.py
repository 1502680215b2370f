"""Session fixtures shared by the test suite: the tiny checkpoint, a built model repository, and real
servers (tritonserver; the front end's fixtures live in tests/e2e) on free loopback ports."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
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
