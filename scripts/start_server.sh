#!/usr/bin/env bash
# Start tritonserver (the pip wheel's binary via scripts/tritonserver.py, or a `tritonserver` on PATH) and the
# /v1 front end, wait until both are ready, and stop both on Ctrl-C / SIGTERM (or when either one exits).
#
#   scripts/start_server.sh [--port 8000] [--host 127.0.0.1] [--model-repository model_repository]
#                           [--triton-http-port 8100] [--triton-grpc-port 8101] [--triton-metrics-port 8102]
#                           [--ready-timeout 600] [-- FRONT-END FLAGS...]
#
# Flags after `--` go to `python -m frontend` (see `python -m frontend --help`: data folder, queue size ...).
# Build the repository first: python export/build_engines.py --output model_repository
set -euo pipefail
cd "$(dirname "$0")/.."

port=${PORT:-8000}
host=${HOST:-127.0.0.1}
repository=${MODEL_REPOSITORY:-model_repository}
http_port=${TRITON_HTTP_PORT:-8100}
grpc_port=${TRITON_GRPC_PORT:-8101}
metrics_port=${TRITON_METRICS_PORT:-8102}
ready_timeout=600
frontend_args=()

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --port) port=$2; shift 2 ;;
    --host) host=$2; shift 2 ;;
    --model-repository) repository=$2; shift 2 ;;
    --triton-http-port) http_port=$2; shift 2 ;;
    --triton-grpc-port) grpc_port=$2; shift 2 ;;
    --triton-metrics-port) metrics_port=$2; shift 2 ;;
    --ready-timeout) ready_timeout=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; frontend_args=("$@"); break ;;
    *) echo "start_server: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
if [ ! -f "$repository/wan_pipeline/config.pbtxt" ]; then
  echo "start_server: $repository has no built wan_pipeline model;" \
       "run: $python export/build_engines.py --output $repository" >&2
  exit 1
fi

triton_pid=""
frontend_pid=""
stop_all() {
  trap - INT TERM EXIT
  for pid in $frontend_pid $triton_pid; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in $frontend_pid $triton_pid; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}
trap 'echo "start_server: stopping"; stop_all; exit 130' INT TERM
trap stop_all EXIT

echo "start_server: tritonserver on ${TRITON_ADDRESS:-127.0.0.1} (http $http_port, grpc $grpc_port, metrics $metrics_port) on $repository"
"$python" scripts/tritonserver.py --model-repository "$repository" --http-port "$http_port" \
  --grpc-port "$grpc_port" --metrics-port "$metrics_port" &
triton_pid=$!

echo "start_server: front end on http://$host:$port"
"$python" -m frontend --host "$host" --port "$port" --triton-url "127.0.0.1:$grpc_port" "${frontend_args[@]}" &
frontend_pid=$!

probe_host=$host
[ "$probe_host" = "0.0.0.0" ] && probe_host=127.0.0.1
deadline=$((SECONDS + ready_timeout))
until "$python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
      "http://$probe_host:$port/readyz" 2>/dev/null; do
  for pid in $triton_pid $frontend_pid; do
    if ! kill -0 "$pid" 2>/dev/null; then echo "start_server: a server exited during start-up" >&2; exit 1; fi
  done
  if [ $SECONDS -ge $deadline ]; then echo "start_server: not ready after ${ready_timeout}s" >&2; exit 1; fi
  sleep 1
done
echo "start_server: ready - try: $python scripts/post.py --url http://$probe_host:$port"

# Run until either server exits or we are told to stop.
set +e
wait -n "$triton_pid" "$frontend_pid"
status=$?
echo "start_server: a server exited (status $status); stopping the other" >&2
exit "$status"
