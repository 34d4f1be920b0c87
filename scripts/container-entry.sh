#!/bin/sh
# The container image's entry point (the Dockerfile installs it as vespa-container-entry): turns
# Docker-style *_FILE variables, which name a mounted secret such as
# VAST_ACCOUNT_KEY_FILE=/run/secrets/vast_account_key, into the key variables the launcher reads,
# then runs the `vespa` command with the arguments given. The key goes into the environment only,
# never into an argument, which `ps` shows to every user.
# The port comes from VESPA_PORT (the Dockerfile sets 8010), never from --port: the HEALTHCHECK,
# which runs apart from this process, reads the same variable, so the two cannot disagree.
set -eu
for arg in "$@"; do
  case $arg in
    --) break ;;  # mitmproxy's own arguments follow
    # argparse also takes an unambiguous prefix of --port
    --p | --po | --por | --port | --p=* | --po=* | --por=* | --port=*)
      echo "error: the port is set with VESPA_PORT in a container, not with $arg" >&2
      echo "hint: docker run -e VESPA_PORT=N ... (publish it with -p 127.0.0.1:N:N); the HEALTHCHECK follows VESPA_PORT." >&2
      exit 2 ;;
  esac
done
for name in VAST_ACCOUNT_KEY VAST_API_KEY; do
  eval "file=\${${name}_FILE:-}"
  [ -n "$file" ] || continue
  eval "direct=\${${name}:-}"
  if [ -n "$direct" ]; then
    echo "error: both $name and ${name}_FILE are set" >&2
    echo "hint: give the key one way: the variable, or the file it names." >&2
    exit 2
  fi
  if ! value=$(cat -- "$file" 2>/dev/null) || [ -z "$value" ]; then
    echo "error: ${name}_FILE names $file, which cannot be read or is empty" >&2
    echo "hint: mount the key file there (a Docker or Kubernetes secret, or docker run -v FILE:$file:ro) readable by uid $(id -u)." >&2
    exit 2
  fi
  export "$name=$value"
  unset "${name}_FILE"
done
exec vespa --port "${VESPA_PORT:-8010}" "$@"
