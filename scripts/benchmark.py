"""Benchmark: the same generation through Triton and through diffusers' WanPipeline in-process.

Same checkpoint, seed, size, frames and steps on both sides; runs alternate (Triton, diffusers, Triton, ...)
so that load on the machine hits both alike. Prints the median of each stage in ms and the ratio
Triton/diffusers (below 1.0: Triton is faster), at the model's default size and at a larger, DiT-dominated one.

    python scripts/benchmark.py [--checkpoint DIR] [--repository DIR] [--repeats 3]

Triton stage times come from the pipeline's own `timings_ms`; `total` is the client's wall time on both
sides. The script starts its own tritonserver on free ports (after `export/build_engines.py`, a no-op when
the repository is up to date).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from frontend.triton_client import TritonPipelineClient  # noqa: E402
from scripts.tritonserver import server_command, server_environment  # noqa: E402

STAGES = ("text_encoder", "dit_step", "dit_total", "vae_decode", "mp4", "total")
PROMPT = "Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a spotlighted stage."


@dataclass(frozen=True)
class Setting:
    name: str
    height: int
    width: int
    num_frames: int
    steps: int
    guidance_scale: float = 5.0
    seed: int = 42


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_triton(repository: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    command = server_command(repository, http_port, grpc_port, metrics_port)
    process = subprocess.Popen(command, env=server_environment(), stdout=open(log_path, "wb"),
                               stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2):
                return process, f"127.0.0.1:{grpc_port}"
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"tritonserver did not become ready; see {log_path}")


async def run_triton(client: TritonPipelineClient, setting: Setting) -> dict[str, float]:
    inputs = {"prompt": PROMPT, "seed": setting.seed, "num_inference_steps": setting.steps,
              "num_frames": setting.num_frames, "height": setting.height, "width": setting.width,
              "guidance_scale": setting.guidance_scale}

    async def ignore_progress(step: int, total: int) -> None:
        return None

    started = time.perf_counter()
    generation = await client.generate(inputs, ignore_progress)
    total = (time.perf_counter() - started) * 1000
    timings = generation.metadata["timings_ms"]
    steps = timings["dit_steps"]
    return {"text_encoder": timings["text_encoder"], "dit_step": statistics.median(steps),
            "dit_total": sum(steps), "vae_decode": timings["vae_decode"], "mp4": timings["mp4"], "total": total}


@contextmanager
def timed_calls(owner, method: str):
    """Records (start, end) of every call of `owner.method` while the block runs."""
    calls: list[tuple[float, float]] = []
    original = getattr(owner, method)

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            calls.append((started, time.perf_counter()))

    setattr(owner, method, timed)
    try:
        yield calls
    finally:
        delattr(owner, method)


def run_diffusers(pipeline, setting: Setting, workdir: Path) -> dict[str, float]:
    import torch
    from diffusers.utils import export_to_video

    step_ends: list[float] = []

    def on_step_end(pipe, step, timestep, callback_kwargs):
        step_ends.append(time.perf_counter())
        return callback_kwargs

    with timed_calls(pipeline.text_encoder, "forward") as text_encoder, \
            timed_calls(pipeline.transformer, "forward") as dit, timed_calls(pipeline.vae, "decode") as vae:
        started = time.perf_counter()
        frames = pipeline(PROMPT, negative_prompt="", height=setting.height, width=setting.width,
                          num_frames=setting.num_frames, num_inference_steps=setting.steps,
                          guidance_scale=setting.guidance_scale, output_type="np", callback_on_step_end=on_step_end,
                          generator=torch.Generator().manual_seed(setting.seed)).frames[0]
    mp4_started = time.perf_counter()
    export_to_video(list(frames), str(workdir / "diffusers.mp4"), fps=16)
    finished = time.perf_counter()
    step_starts = [dit[0][0], *step_ends[:-1]]  # a step: its first DiT call to the scheduler's update
    steps = [(end - begin) * 1000 for begin, end in zip(step_starts, step_ends)]
    return {"text_encoder": sum(end - begin for begin, end in text_encoder) * 1000,
            "dit_step": statistics.median(steps), "dit_total": sum(steps),
            "vae_decode": sum(end - begin for begin, end in vae) * 1000, "mp4": (finished - mp4_started) * 1000,
            "total": (finished - started) * 1000}


def median_stages(runs: list[dict[str, float]]) -> dict[str, float]:
    return {stage: statistics.median(run[stage] for run in runs) for stage in STAGES}


def print_table(setting: Setting, triton: dict[str, float], diffusers: dict[str, float], repeats: int) -> None:
    print(f"\n{setting.name}: {setting.width}x{setting.height}, {setting.num_frames} frames, {setting.steps} steps, "
          f"guidance {setting.guidance_scale}, median of {repeats}")
    print(f"{'stage':<14} {'diffusers ms':>13} {'triton ms':>11} {'triton/diffusers':>17}")
    for stage in STAGES:
        ratio = triton[stage] / diffusers[stage] if diffusers[stage] else float("nan")
        print(f"{stage:<14} {diffusers[stage]:>13.1f} {triton[stage]:>11.1f} {ratio:>17.2f}")


def ensure_repository(checkpoint: Path | None, repository: Path) -> None:
    command = [sys.executable, str(REPO_ROOT / "export" / "build_engines.py"), "--output", str(repository),
               "--backend", "onnxruntime"]
    if checkpoint is not None:
        command += ["--checkpoint", str(checkpoint)]
    subprocess.run(command, check=True)


async def compare(client: TritonPipelineClient, pipeline, settings: list[Setting], repeats: int,
                  workdir: Path) -> None:
    for setting in settings:
        await run_triton(client, setting), run_diffusers(pipeline, setting, workdir)  # warm-up
        triton_runs, diffusers_runs = [], []
        for _ in range(repeats):
            triton_runs.append(await run_triton(client, setting))
            diffusers_runs.append(run_diffusers(pipeline, setting, workdir))
        print_table(setting, median_stages(triton_runs), median_stages(diffusers_runs), repeats)


async def benchmark(url: str, pipeline, large: Setting, repeats: int, workdir: Path) -> None:
    client = TritonPipelineClient(url, "wan_pipeline")
    try:
        info = await client.model_info()
        demo = Setting("demo (model defaults)", info.default_height, info.default_width, info.default_num_frames,
                       info.default_num_inference_steps, info.default_guidance_scale)
        await compare(client, pipeline, [demo, large], repeats, workdir)
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="diffusers checkpoint (default: the embedded tiny one)")
    parser.add_argument("--repository", type=Path, default=REPO_ROOT / "model_repository",
                        help="model repository built from that checkpoint (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side and setting (default %(default)s)")
    parser.add_argument("--large", default="256x256x33x10",
                        help="the DiT-dominated setting as HEIGHTxWIDTHxFRAMESxSTEPS (default %(default)s)")
    args = parser.parse_args(argv)

    from diffusers import WanPipeline

    from export.checkpoint import default_checkpoint

    height, width, frames, steps = (int(value) for value in args.large.split("x"))
    large = Setting("large (DiT-dominated)", height, width, frames, steps)
    ensure_repository(args.checkpoint, args.repository)
    pipeline = WanPipeline.from_pretrained(str(args.checkpoint or default_checkpoint()))
    pipeline.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as workdir:
        server, url = start_triton(args.repository, Path(workdir) / "tritonserver.log")
        try:
            asyncio.run(benchmark(url, pipeline, large, args.repeats, Path(workdir)))
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()
