#!/usr/bin/env bash
# The README's main command: install what is needed, build the default model repository (the embedded tiny
# random-weight checkpoint: its video is noise), start tritonserver and the /v1 front end, generate one
# video from a prompt through the API, print where the mp4 is, and stop both servers.
#
#   scripts/demo.sh ["a prompt"]          (PORT=8000 and TRITON_*_PORT=8100-8102 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
prompt=${1:-"Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a spotlighted stage."}
port=${PORT:-8000}

bash scripts/setup_env.sh
.venv/bin/python export/build_engines.py --output model_repository

log=server_data/demo_servers.log
mkdir -p server_data
scripts/start_server.sh --port "$port" --model-repository model_repository >"$log" 2>&1 &
server=$!
trap 'kill -TERM "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
until grep -q "start_server: ready" "$log"; do
  kill -0 "$server" 2>/dev/null || { echo "demo: the servers failed to start; see $log" >&2; tail -20 "$log" >&2; exit 1; }
  sleep 1
done

mkdir -p outputs
.venv/bin/python scripts/post.py --url "http://127.0.0.1:$port" --prompt "$prompt" --output outputs/demo.mp4
echo "demo: video written to $(pwd)/outputs/demo.mp4 (server copy under server_data/outputs/)"
