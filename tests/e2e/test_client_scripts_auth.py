"""The /v1 client scripts against a front end that requires an API key."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT

KEY = "test-key-0123456789abcdef"


def run_script(name: str, *arguments: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"scripts/{name}", *arguments], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def test_client_scripts_send_the_api_key_and_fail_cleanly_without_it(frontend_factory, tmp_path):
    server = frontend_factory("--api-key", KEY)
    output = tmp_path / "keyed.mp4"
    refused = run_script("post.py", "--url", server.url, "--quiet", "--output", str(output))
    assert refused.returncode == 2 and "401" in refused.stderr and not output.exists()

    posted = run_script("post.py", "--url", server.url, "--api-key", KEY, "--quiet", "--infer-steps", "2",
                        "--target-video-length", "5", "--task-id", "keyed", "--output", str(output))
    assert posted.returncode == 0, posted.stdout + posted.stderr
    assert output.stat().st_size > 0

    status = run_script("check_status.py", "--url", server.url, "--task-id", "keyed", env={"WAN_API_KEY": KEY})
    assert status.returncode == 0 and '"completed"' in status.stdout, status.stdout + status.stderr
    stopped = run_script("stop_running_task.py", "--url", server.url, env={"WAN_API_KEY": KEY})
    assert stopped.returncode == 0 and "do_nothing" in stopped.stdout, stopped.stdout + stopped.stderr
