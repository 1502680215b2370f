"""Real servers for end-to-end tests: start on free loopback ports, wait until ready, stop (or kill)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from scripts.tritonserver import server_command, server_environment

REPO_ROOT = Path(__file__).resolve().parents[1]


def wait_for_http(url: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


@dataclass
class ManagedProcess:
    """A server process with its log file; `stop()` is SIGTERM then SIGKILL, `kill()` is SIGKILL at once."""

    command: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    process: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                        cwd=REPO_ROOT, start_new_session=True)
        log.close()

    def stop(self, timeout_s: float = 20) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class TritonServer(ManagedProcess):
    http_port: int = 0
    grpc_port: int = 0

    @classmethod
    def create(cls, model_repository: Path, log_path: Path, ports: tuple[int, int, int],
               extra_args: list[str] = ()) -> "TritonServer":
        http_port, grpc_port, metrics_port = ports
        command = server_command(model_repository, http_port, grpc_port, metrics_port, list(extra_args))
        return cls(command=command, log_path=log_path, env=server_environment(),
                   http_port=http_port, grpc_port=grpc_port)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def wait_ready(self, timeout_s: float = 120) -> None:
        try:
            wait_for_http(f"http://{self.http_url}/v2/health/ready", timeout_s, self.process)
        except (RuntimeError, TimeoutError) as error:
            raise RuntimeError(f"{error}\n--- tritonserver log ---\n{self.log_tail()}") from None
