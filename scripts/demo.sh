#!/usr/bin/env bash
# The main job: `rmdistill demo` starts the service (which starts a local Ray head), runs the quickstart job end to
# end over REST, prints its evaluation and the dashboard's address, then asks the trained policy for a review. The
# service stays up for the dashboard until Ctrl+C, then stops with its Ray head.
set -euo pipefail
cd "$(dirname "$0")/.."
export RMDISTILL_HOME="${RMDISTILL_HOME:-$HOME/.rmdistill}"
url="http://127.0.0.1:${RMDISTILL_PORT:-8000}"
exec .venv/bin/rmdistill --url "$url" demo ${1:+--spec "$1"}
