#!/usr/bin/env bash
# Run the test suite: creates or reuses .venv (VESPA_VENV), installs the runtime and test
# requirements in one pip call, then runs pytest with any arguments given.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
vespa_venv requirements.txt requirements-test.txt
"$VENV_PY" -c 'import sys, mitmproxy.version as v; print(f"Python {sys.version.split()[0]}, mitmproxy {v.VERSION}")'
exec "$VENV_PY" -m pytest "$@"
