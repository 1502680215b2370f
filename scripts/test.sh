#!/usr/bin/env bash
# The README's test command: installs what is needed, then runs every test (unit and end-to-end against a
# real tritonserver and uvicorn on loopback). Extra arguments go to pytest, e.g. `scripts/test.sh tests/unit`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q -ra "$@"
