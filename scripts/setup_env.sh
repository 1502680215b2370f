#!/usr/bin/env bash
# Creates (or updates) .venv with everything the project needs. Safe to run again: it only installs when
# requirements.txt changed. Used by the README's two commands and by CI.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
# The Triton Python-backend stub in the nvidia-pytriton wheel is built per Python minor version; we use 3.11.
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "setup_env: need Python 3.11 (set PYTHON=/path/to/python3.11); got $("$python" --version)" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv

stamp=.venv/.requirements.sha256
wanted=$(sha256sum requirements.txt scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -r requirements.txt
  # Only its tritonserver binary is used; its own Python pins would fight ours.
  .venv/bin/pip install --quiet --no-deps nvidia-pytriton==0.7.0
  # perf_analyzer ships in the 2.51 client wheel (the server's release); kept apart from the newer client library.
  .venv/bin/pip install --quiet --no-deps --upgrade --target .venv/perf_analyzer tritonclient==2.51.0
  echo "$wanted" > "$stamp"
fi

# perf_analyzer links Debian's libb64; everything else works without it.
if ! ldconfig -p | grep -q libb64.so.0d; then
  (apt-get update -qq && apt-get install -y -qq libb64-0d) >/dev/null 2>&1 \
    || echo "setup_env: could not install libb64-0d; perf_analyzer will not run" >&2
fi
