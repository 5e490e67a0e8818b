#!/usr/bin/env bash
# Creates the demo secrets docker-compose.yml reads, unless they exist: a random finAPI client
# secret (the simulator and the broker share it) and a random caller API key. Demo only: real
# deployments take their secrets from a secret store.
set -euo pipefail
dir="$(cd "$(dirname "$0")" && pwd)/secrets"
mkdir -p "$dir"
for name in finapi_client_secret broker_api_key; do
    file="$dir/$name"
    if [ ! -s "$file" ]; then
        # 32 random bytes, hex: no characters that need quoting anywhere.
        od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$file"
        echo >>"$file"
        echo "created $file"
    fi
    # Compose (without Swarm) bind-mounts the file as it is; the containers run as uid 65532.
    chmod 0644 "$file"
done
