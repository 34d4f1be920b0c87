#!/usr/bin/env bash
# Run the benchmarks (issue 8): creates or reuses .venv, installs requirements.txt together with
# bench/requirements.txt (one pip call, so mitmproxy's pins hold; matplotlib and py-spy stay out
# of the runtime requirements), then runs `python -m bench` with any arguments given.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
vespa_venv requirements.txt bench/requirements.txt
"$VENV_PY" -c 'import sys, mitmproxy.version as v; print(f"Python {sys.version.split()[0]}, mitmproxy {v.VERSION}")'
exec "$VENV_PY" -m bench "$@"
