"""Run the `tritonserver` binary that ships in the `nvidia-pytriton` wheel (CPU), or one already on PATH.

`python scripts/tritonserver.py --model-repository model_repository` runs it in the foreground; tests and
`start_server.sh` use `server_command()` to get the same command line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import sysconfig
from pathlib import Path

STUB_NAME = "triton_python_backend_stub"


def pytriton_root() -> Path | None:
    root = Path(sysconfig.get_paths()["purelib"]) / "pytriton" / "tritonserver"
    return root if (root / "bin" / "tritonserver").exists() else None


def _install_python_stub(root: Path) -> None:
    """The Python backend looks for its stub beside it; the wheel keeps one stub per Python version apart."""
    target = root / "backends" / "python" / STUB_NAME
    if not target.exists():
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        shutil.copy2(root / "python_backend_stubs" / version / STUB_NAME, target)


def server_command(model_repository: Path, http_port: int, grpc_port: int, metrics_port: int,
                   extra_args: list[str] = (), address: str = "127.0.0.1") -> list[str]:
    """Triton listens on `address` only (tritonserver's own default is every interface): its ports have no
    authentication, so only the front end beside it should reach them (SECURITY.md)."""
    ports = [f"--http-port={http_port}", f"--grpc-port={grpc_port}", f"--metrics-port={metrics_port}"]
    addresses = [f"--http-address={address}", f"--grpc-address={address}", f"--metrics-address={address}"]
    common = [f"--model-repository={Path(model_repository).resolve()}", *addresses, *ports, *extra_args]
    root = pytriton_root()
    if root is not None:
        _install_python_stub(root)
        return [str(root / "bin" / "tritonserver"), f"--backend-directory={root / 'backends'}", *common]
    installed = shutil.which("tritonserver")
    if installed is None:
        raise SystemExit("no tritonserver found: install nvidia-pytriton (see requirements.txt) or put one on PATH")
    return [installed, *common]


def server_environment() -> dict[str, str]:
    """The Python stub runs models with the packages of the `python3` found first on PATH, and must embed
    the libpython of that same interpreter: the system's 3.11 lacks symbols that pyenv's modules need."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and Path(libdir, sysconfig.get_config_var("INSTSONAME") or "").is_file():
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, env.get("LD_LIBRARY_PATH")]))
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--http-port", type=int, default=int(os.environ.get("TRITON_HTTP_PORT", 8100)))
    parser.add_argument("--grpc-port", type=int, default=int(os.environ.get("TRITON_GRPC_PORT", 8101)))
    parser.add_argument("--metrics-port", type=int, default=int(os.environ.get("TRITON_METRICS_PORT", 8102)))
    parser.add_argument("--address", default=os.environ.get("TRITON_ADDRESS", "127.0.0.1"),
                        help="interface of all three ports (default %(default)s; "
                             "0.0.0.0 exposes them, unauthenticated)")
    args, extra = parser.parse_known_args()
    command = server_command(args.model_repository, args.http_port, args.grpc_port, args.metrics_port, extra,
                             args.address)
    os.execvpe(command[0], command, server_environment())


if __name__ == "__main__":
    main()
