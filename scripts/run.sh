#!/usr/bin/env bash
# Start Vespa: creates or reuses .venv (first run installs requirements.txt), then hands over to
# the launcher. `scripts/run.sh --help` lists the options; `scripts/run.sh --demo` needs no account.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$root/scripts/_venv.sh"
vespa_venv requirements.txt
# No cd: relative paths given to mitmproxy after `--` stay relative to the caller's directory.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$VENV_PY" -m vespa.cli.launcher "$@"
