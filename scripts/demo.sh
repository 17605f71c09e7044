#!/usr/bin/env bash
# The main job: the service (which starts a local Ray head), the quickstart job end to end over REST,
# then a query of the trained policy through the OpenAI-compatible API.
set -euo pipefail
cd "$(dirname "$0")/.."
export RMDISTILL_HOME="${RMDISTILL_HOME:-$HOME/.rmdistill}"
port="${RMDISTILL_PORT:-8000}"
spec="${1:-examples/quickstart.yaml}"
mkdir -p "$RMDISTILL_HOME"
log="$RMDISTILL_HOME/demo-service.log"
echo "starting the service on 127.0.0.1:$port (log: $log)"
# --stop-cluster: the demo leaves nothing running (by default the Ray head and its jobs outlive the service).
.venv/bin/rmdistill serve --port "$port" --stop-cluster >"$log" 2>&1 &
server=$!
trap 'kill -TERM "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
.venv/bin/python scripts/demo.py --url "http://127.0.0.1:$port" --spec "$spec"
