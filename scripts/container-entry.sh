#!/bin/sh
# The container image's entry point (the Dockerfile installs it as vespa-container-entry): turns
# Docker-style *_FILE variables, which name a mounted secret such as
# VAST_ACCOUNT_KEY_FILE=/run/secrets/vast_account_key, into the key variables the launcher reads,
# then runs the `vespa` command with the arguments given. The key goes into the environment only,
# never into an argument, which `ps` shows to every user.
set -eu
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
exec vespa "$@"
