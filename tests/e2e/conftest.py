"""End-to-end fixtures: one real tritonserver for the session (the tiny ONNX Runtime repository), and front
ends (`python -m frontend` under uvicorn) on free loopback ports with their own data folders."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import CACHE, free_port
from tests.servers import ManagedProcess, TritonServer, wait_for_http


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


def serve(model_repository: Path, log_name: str):
    server = TritonServer.create(model_repository, CACHE / "logs" / log_name, (free_port(), free_port(), free_port()))
    server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def triton_server(model_repository: Path):
    """One tritonserver for the session, serving the tiny ONNX Runtime text-to-video repository."""
    yield from serve(model_repository, "tritonserver.log")


@pytest.fixture(scope="session")
def triton_server_i2v(model_repository_i2v: Path):
    """One tritonserver for the session, serving the tiny image-to-video repository."""
    yield from serve(model_repository_i2v, "tritonserver-i2v.log")


@dataclass
class FrontendServer(ManagedProcess):
    """`python -m frontend` on a free port; `restart()` starts it again on the same port and data folder."""

    port: int = 0
    data_dir: Path = Path()

    @classmethod
    def create(cls, data_dir: Path, triton_grpc_url: str, log_path: Path, extra_args: list[str] = (),
               port: int | None = None) -> "FrontendServer":
        port = port or free_port()
        command = [sys.executable, "-m", "frontend", "--host", "127.0.0.1", "--port", str(port),
                   "--triton-url", triton_grpc_url, "--data-dir", str(data_dir), "--triton-poll-interval", "0.2",
                   *extra_args]
        return cls(command=command, log_path=log_path, port=port, data_dir=data_dir)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_up(self, timeout_s: float = 60, ready: bool = True) -> None:
        """Until /readyz (Triton and the model ready) or, with ready=False, /healthz answers 200."""
        try:
            wait_for_http(f"{self.url}/{'readyz' if ready else 'healthz'}", timeout_s, self.process)
        except (RuntimeError, TimeoutError) as error:
            raise RuntimeError(f"{error}\n--- front-end log ---\n{self.log_tail()}") from None

    def restart(self, ready: bool = True) -> None:
        self.stop()
        self.start()
        self.wait_up(ready=ready)


@pytest.fixture
def frontend_factory(tmp_path_factory, triton_server):
    """Start front ends: `frontend_factory(*extra_flags, data_dir=None, triton_url=None, ready=True)`."""
    servers: list[FrontendServer] = []

    def start(*extra_args: str, data_dir: Path | None = None, triton_url: str | None = None,
              ready: bool = True) -> FrontendServer:
        data_dir = data_dir or tmp_path_factory.mktemp("frontend") / "server_data"
        server = FrontendServer.create(data_dir, triton_url or triton_server.grpc_url,
                                       CACHE / "logs" / f"frontend-{len(servers)}-{data_dir.parent.name}.log",
                                       list(extra_args))
        servers.append(server)
        server.start()
        server.wait_up(ready=ready)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def frontend_server(tmp_path_factory, triton_server):
    """A front end with default settings, shared by the tests of one module."""
    data_dir = tmp_path_factory.mktemp("frontend-shared") / "server_data"
    server = FrontendServer.create(data_dir, triton_server.grpc_url, CACHE / "logs" / "frontend-shared.log")
    server.start()
    try:
        server.wait_up()
        yield server
    finally:
        server.stop()
