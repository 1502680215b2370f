"""The scripts that talk straight to Triton: generate.py (gRPC streaming client) and perf_analyzer.py."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys

import av
import psutil

from tests.conftest import REPO_ROOT


def run_script(name: str, *arguments: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / name), *arguments],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


def test_generate_script_saves_an_mp4_of_the_requested_shape(triton_server, tmp_path):
    output = tmp_path / "cats.mp4"
    completed = run_script("generate.py", "--url", triton_server.grpc_url, "--prompt", "two cats boxing",
                           "--steps", "3", "--frames", "9", "--height", "64", "--width", "96",
                           "--output", str(output))
    assert completed.returncode == 0, completed.stderr
    assert "3/3" in completed.stderr  # the progress bar reached the last step
    metadata = json.loads(completed.stdout[: completed.stdout.rindex("}") + 1])
    assert metadata["num_inference_steps"] == 3 and metadata["num_frames"] == 9
    with av.open(str(output)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (96, 64)
        assert sum(1 for _ in container.decode(video=0)) == 9


def test_generate_script_reports_a_rejected_request_in_one_line(triton_server, tmp_path):
    completed = run_script("generate.py", "--url", triton_server.grpc_url, "--prompt", "x", "--height", "100",
                           "--output", str(tmp_path / "never.mp4"))
    assert completed.returncode == 1
    assert "height" in completed.stderr and "Traceback" not in completed.stderr
    assert not (tmp_path / "never.mp4").exists()


def test_perf_analyzer_reports_pipeline_and_component_latency(triton_server):
    completed = run_script("perf_analyzer.py", "--url", triton_server.grpc_url,
                           "--models", "wan_pipeline,text_encoder", "--steps", "2", "--requests", "2")
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    table = completed.stdout[completed.stdout.index("model "):].splitlines()
    latencies = {line.split()[0]: float(line.split()[-1]) for line in table[1:] if line.strip()}
    assert set(latencies) == {"wan_pipeline", "text_encoder"}
    assert all(latency > 0 for latency in latencies.values())
    assert "Composing models" in completed.stdout  # per-component statistics of the BLS model


def listening_addresses(port: int) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Local addresses of the TCP sockets listening on `port` (IPv4-mapped IPv6 ones as their IPv4 address)."""
    addresses = set()
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
            address = ipaddress.ip_address(connection.laddr.ip)
            addresses.add(getattr(address, "ipv4_mapped", None) or address)
    return addresses


def test_tritonserver_listens_on_loopback_only(triton_server):
    for port in (triton_server.http_port, triton_server.grpc_port):
        addresses = listening_addresses(port)
        assert addresses and all(address.is_loopback for address in addresses), (port, addresses)
