#!/usr/bin/env bash
# Regenerates docs/mitmweb.png: `scripts/run.sh --demo --web` (local emulator + mitmweb), a streamed
# chat, a plain JSON completion and a request with a broken body, then headless Chromium on the chat's flow.
# Needs Debian's chromium (`apt-get install -y chromium`). Run by hand, not by CI.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$root/docs/mitmweb.png}
tab=${TAB:-response}  # request, response (shown with the "LLM stream" view), comment, timing ...
py=$root/.venv/bin/python
free_port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
web=$(free_port)
token=$("$py" -c 'import secrets; print(secrets.token_hex(16))')  # a throwaway UI token for this run
log=$(mktemp)
profile=$(mktemp -d)

"$root/scripts/run.sh" --demo --web --port "$port" -- \
    --set web_port="$web" --set web_open_browser=false --set web_password="$token" >"$log" 2>&1 &
launcher=$!
cleanup() {
    kill -INT "$launcher" 2>/dev/null && wait "$launcher" 2>/dev/null || true
    rm -rf "$log" "$profile"
}
trap cleanup EXIT

for _ in $(seq 300); do
    # A bare connect for the proxy: an HTTP probe would become a flow of its own.
    curl -s -o /dev/null "http://127.0.0.1:$web/" && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
done
api() { curl -sf -H "Authorization: Bearer $token" "http://127.0.0.1:$web$1"; }

curl -sN "http://127.0.0.1:$port/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"model": "vespa-demo", "messages": [{"role": "user", "content": "Hello!"}], "stream": true, "max_tokens": 12}' >/dev/null
curl -s "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' \
    -d '{"model": "vespa-demo", "prompt": "Hello!", "max_tokens": 12}' >/dev/null
curl -s "http://127.0.0.1:$port/v1/chat/completions" -H 'Content-Type: application/json' -d '{"model": ' >/dev/null
sleep 0.5
id=$(api /flows | "$py" -c 'import json, sys; print(next(f["id"] for f in json.load(sys.stdin) if " 200 route=" in f["comment"] and "streamed" in f["comment"]))')

chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile" \
    --window-size=1800,700 --virtual-time-budget=4000 --screenshot="$out" \
    "http://127.0.0.1:$web/?token=$token#/flows/$id/$tab" 2>/dev/null
echo "wrote $out"
