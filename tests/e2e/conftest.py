from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import CACHE, free_port
from tests.servers import TritonServer


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def triton_server(model_repository: Path):
    """One tritonserver for the session, serving the tiny ONNX Runtime repository."""
    server = TritonServer.create(model_repository, CACHE / "logs" / "tritonserver.log",
                                 (free_port(), free_port(), free_port()))
    server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
