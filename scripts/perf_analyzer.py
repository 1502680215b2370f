"""Run perf_analyzer against the pipeline (gRPC streaming, with per-component statistics) and each component
model, then print a latency table.

    python scripts/perf_analyzer.py --url 127.0.0.1:8101 [--models wan_pipeline,text_encoder,dit]

Component inputs get the shapes of one generation at the served model's default size (batch 2 = prompt and
negative prompt, text length 512); `--steps` keeps the pipeline runs short. perf_analyzer comes from the
tritonclient 2.51 wheel that scripts/setup_env.sh installs under .venv/perf_analyzer.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import tritonclient.grpc as grpcclient

REPO_ROOT = Path(__file__).resolve().parents[1]
PIPELINE = "wan_pipeline"
COMPONENTS = ("text_encoder", "dit", "vae_decode_first", "vae_decode_step")
# Symbolic axes of each component input; a dim fixed in the model config wins over these.
AXES = {
    "text_encoder": {"input_ids": "BL", "attention_mask": "BL"},
    "dit": {"hidden_states": "BCfhw", "timestep": "B", "encoder_hidden_states": "BLD"},
    "vae_decode_first": {"latents": "BCfhw"},
}
DEFAULT_MODELS = (PIPELINE, *AXES)


def perf_analyzer_binary() -> Path:
    binary = REPO_ROOT / ".venv" / "perf_analyzer" / "bin" / "perf_analyzer"
    if not binary.exists():
        raise SystemExit(f"perf_analyzer not found at {binary.relative_to(REPO_ROOT)}: run scripts/setup_env.sh")
    return binary


def perf_analyzer_environment() -> dict[str, str]:
    """perf_analyzer links libcudart even on CPU; the nvidia-cuda-runtime-cu12 wheel provides it."""
    import nvidia.cuda_runtime

    env = dict(os.environ)
    cudart = Path(nvidia.cuda_runtime.__path__[0]) / "lib"
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(cudart), env.get("LD_LIBRARY_PATH")]))
    return env


def model_parameters(client: grpcclient.InferenceServerClient, model: str) -> dict[str, str]:
    config = client.get_model_config(model, as_json=True)["config"]
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def axis_sizes(pipeline_parameters: dict[str, str], text_length: int) -> dict[str, int]:
    height, width = int(pipeline_parameters["default_height"]), int(pipeline_parameters["default_width"])
    frames = int(pipeline_parameters["default_num_frames"])
    return {"B": 2, "L": text_length, "f": (frames - 1) // 4 + 1, "h": height // 8, "w": width // 8}


def component_shapes(client: grpcclient.InferenceServerClient, model: str, sizes: dict[str, int]) -> list[str]:
    """`--shape name:d0,d1,...` arguments: the config's fixed dims, the symbolic sizes for its -1 dims."""
    shapes = []
    for tensor in client.get_model_config(model, as_json=True)["config"]["input"]:
        axes = AXES[model][tensor["name"]]
        dims = [int(dim) if int(dim) > 0 else sizes[axis] for dim, axis in zip(tensor["dims"], axes)]
        shapes += ["--shape", f"{tensor['name']}:{','.join(map(str, dims))}"]
    return shapes


def run_perf_analyzer(arguments: list[str], report: Path) -> dict[str, str]:
    # Second-scale requests on a shared CPU jitter more than perf_analyzer's default 10% stability band.
    command = [str(perf_analyzer_binary()), *arguments, "--stability-percentage", "50", "--max-trials", "20",
               "--verbose-csv", "-f", str(report)]
    print("$", " ".join(command), flush=True)
    completed = subprocess.run(command, env=perf_analyzer_environment(), capture_output=True, text=True)
    print(completed.stdout[-4000:], flush=True)
    if completed.returncode != 0:
        raise SystemExit(f"perf_analyzer failed ({completed.returncode}): {completed.stderr.strip()[-2000:]}")
    with open(report, newline="") as handle:
        return next(csv.DictReader(handle))


def pipeline_arguments(url: str, prompt: str, steps: int, requests: int, workdir: Path) -> list[str]:
    data = workdir / "pipeline_input.json"
    data.write_text(json.dumps({"data": [{
        "prompt": {"content": [prompt], "shape": [1]},
        "num_inference_steps": {"content": [steps], "shape": [1]},
    }]}))
    return ["-m", PIPELINE, "-u", url, "-i", "grpc", "--streaming", "--input-data", str(data),
            "--bls-composing-models", ",".join(COMPONENTS), "--measurement-mode", "count_windows",
            "--measurement-request-count", str(requests), "--concurrency-range", "1"]


def component_arguments(url: str, model: str, shapes: list[str], requests: int) -> list[str]:
    return ["-m", model, "-u", url, "-i", "grpc", "--input-data", "zero", *shapes, "--measurement-mode", "count_windows",
            "--measurement-request-count", str(requests), "--concurrency-range", "1"]


def print_table(rows: list[tuple[str, dict[str, str]]]) -> None:
    print(f"\n{'model':<20} {'infer/s':>9} {'p50 ms':>10} {'p99 ms':>10} {'avg ms':>10}")
    for model, row in rows:
        p50, p99, avg = (float(row[key]) / 1000 for key in ("p50 latency", "p99 latency", "Avg latency"))
        print(f"{model:<20} {float(row['Inferences/Second']):>9.2f} {p50:>10.1f} {p99:>10.1f} {avg:>10.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="127.0.0.1:8101", help="Triton gRPC endpoint (default %(default)s)")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"comma-separated, from {', '.join(DEFAULT_MODELS)} (default: all)")
    parser.add_argument("--prompt", default="Two anthropomorphic cats in comfy boxing gear fight on a stage.")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps per pipeline request")
    parser.add_argument("--requests", type=int, default=3, help="requests per measurement window")
    parser.add_argument("--text-length", type=int, default=512, help="text tokens per prompt for components")
    args = parser.parse_args(argv)

    models = [model for model in args.models.split(",") if model]
    unknown = sorted(set(models) - set(DEFAULT_MODELS))
    if unknown:
        parser.error(f"unknown models: {', '.join(unknown)}")
    client = grpcclient.InferenceServerClient(args.url)
    sizes = axis_sizes(model_parameters(client, PIPELINE), args.text_length)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for model in models:
            if model == PIPELINE:
                arguments = pipeline_arguments(args.url, args.prompt, args.steps, args.requests, Path(workdir))
            else:
                arguments = component_arguments(args.url, model, component_shapes(client, model, sizes),
                                                args.requests)
            rows.append((model, run_perf_analyzer(arguments, Path(workdir) / f"{model}.csv")))
    print_table(rows)


if __name__ == "__main__":
    sys.exit(main())
