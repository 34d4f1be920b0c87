# Sourced by run.sh and test.sh: find Python 3.11+, create or reuse the venv, install what the
# requirement files ask for. A stamp of their contents makes later runs skip pip entirely.
# Inputs: VESPA_PYTHON (interpreter to use), VESPA_VENV (venv dir, default .venv), and the
# requirement files as arguments. Sets VENV_PY.

_vespa_find_python() {
  if [ -n "${VESPA_PYTHON:-}" ]; then echo "$VESPA_PYTHON"; return; fi
  local best="" best_minor=0 c minor
  for c in python3.14 python3.13 python3.12 python3.11 python3 \
           "$HOME"/.pyenv/versions/3.1[1-9]*/bin/python3 /usr/local/bin/python3.1[1-9] /usr/bin/python3.1[1-9]; do
    minor=$("$c" -c 'import sys; print(sys.version_info[1] if sys.version_info[:2] >= (3, 11) else 0)' 2>/dev/null) || continue
    if [ "${minor:-0}" -gt "$best_minor" ]; then best=$c; best_minor=$minor; fi
  done
  [ -n "$best" ] && echo "$best"
}

vespa_venv() {
  local root venv py stamp want
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  venv=${VESPA_VENV:-$root/.venv}
  case "$venv" in /*) ;; *) venv=$root/$venv ;; esac
  VENV_PY=$venv/bin/python
  want=$(cd "$root" && cat "$@" | sha256sum | cut -c1-16)
  stamp=$venv/.vespa-installed
  if [ -x "$VENV_PY" ] && grep -qx "$want" "$stamp" 2>/dev/null; then return 0; fi
  if [ ! -x "$VENV_PY" ]; then
    py=$(_vespa_find_python) || true
    if [ -z "$py" ]; then
      echo "error: Vespa needs Python 3.11 or newer, and none was found on PATH." >&2
      echo "hint: install python3.11+ (e.g. 'apt-get install python3.11 python3.11-venv' or pyenv), or point VESPA_PYTHON at one." >&2
      return 2
    fi
    echo "Creating $venv with $("$py" --version 2>&1) ..." >&2
    "$py" -m venv "$venv" || { echo "error: '$py -m venv' failed (on Debian: apt-get install python3-venv)." >&2; return 2; }
  fi
  echo "Installing $* into $venv (first run only) ..." >&2
  local args=() f
  for f in "$@"; do args+=(-r "$root/$f"); done
  # One pip call for every file: mitmproxy pins h11/h2 tightly, and a later separate install
  # (e.g. openai) would silently move them.
  local log; log=$(mktemp)
  if ! "$VENV_PY" -m pip install -q --disable-pip-version-check "${args[@]}" >"$log" 2>&1; then
    grep -v "^WARNING: Location" "$log" >&2; rm -f "$log"
    echo "error: pip install failed (see above)." >&2; return 2
  fi
  rm -f "$log"
  # Append: run.sh (runtime only) and test.sh (runtime + test) share the venv; each set keeps
  # its own line, so alternating between them never reinstalls.
  echo "$want" >> "$stamp"
}
