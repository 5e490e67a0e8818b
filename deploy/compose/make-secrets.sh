#!/usr/bin/env bash
# Creates the demo secrets docker-compose.yml reads, unless they exist: a random finAPI client
# secret (the simulator and the broker share it), a random caller API key, a random PostgreSQL
# password, the broker's password key (identities.password_key_file), and the database URL built
# from the PostgreSQL password (rewritten whenever it no longer matches). Demo only: real
# deployments take their secrets from a secret store.
set -euo pipefail
dir="$(cd "$(dirname "$0")" && pwd)/secrets"
mkdir -p "$dir"
# The URL must match the postgres service of docker-compose.yml (POSTGRES_USER, POSTGRES_DB).
DB_USER=giroident
DB_NAME=giroident
DB_HOST=postgres:5432

for name in finapi_client_secret broker_api_key postgres_password identity_password_key; do
    file="$dir/$name"
    if [ ! -s "$file" ]; then
        # 32 random bytes, hex: no characters that need quoting anywhere, URLs included.
        od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$file"
        echo >>"$file"
        echo "created $file"
    fi
done

url="postgres://$DB_USER:$(tr -d '\n' <"$dir/postgres_password")@$DB_HOST/$DB_NAME"
if [ "$(cat "$dir/database_url" 2>/dev/null)" != "$url" ]; then
    printf '%s\n' "$url" >"$dir/database_url"
    echo "created $dir/database_url"
fi

for name in finapi_client_secret broker_api_key postgres_password identity_password_key database_url; do
    # Compose (without Swarm) bind-mounts the file as it is; the containers run as uid 65532
    # (broker, simulator) and as the postgres user.
    chmod 0644 "$dir/$name"
done
