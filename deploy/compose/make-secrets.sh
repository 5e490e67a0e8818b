#!/usr/bin/env bash
# Creates the demo secrets docker-compose.yml reads, unless they exist: a random finAPI client
# secret (the simulator and the broker share it), a random caller API key, a random PostgreSQL
# password, the broker's password key (identities.password_key_file), and the database URL built
# from the PostgreSQL password (rewritten whenever it no longer matches), and the simulator's
# HTTPS certificates (openssl): a fresh certificate authority (finapi_ca, the broker's
# finapi.ca_file; its key is thrown away once it has signed) and the simulator's certificate for
# `simulator`, `localhost` and 127.0.0.1 (sim_tls_cert, sim_tls_key), remade when one of the
# three is missing or the certificate expires within a day. Demo only: real deployments take
# their secrets from a secret store, and reach finAPI with its public certificate.
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

tls_valid() {
    [ -s "$dir/finapi_ca" ] && [ -s "$dir/sim_tls_key" ] && [ -s "$dir/sim_tls_cert" ] \
        && openssl x509 -in "$dir/sim_tls_cert" -noout -checkend 86400 >/dev/null
}
if ! tls_valid; then
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    # ECDSA P-256, a year; the authority may sign server certificates only (pathlen 0).
    openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
        -keyout "$work/ca.key" -out "$dir/finapi_ca" -days 365 \
        -subj "/CN=giroident-broker compose simulator CA $(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
        -keyout "$dir/sim_tls_key" -out "$work/sim.csr" -subj "/CN=simulator" 2>/dev/null
    printf '%s\n' "subjectAltName=DNS:simulator,DNS:localhost,IP:127.0.0.1" \
        "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
        "extendedKeyUsage=serverAuth" >"$work/sim.ext"
    openssl x509 -req -in "$work/sim.csr" -CA "$dir/finapi_ca" -CAkey "$work/ca.key" \
        -set_serial "0x$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')" -days 365 \
        -extfile "$work/sim.ext" -out "$dir/sim_tls_cert" 2>/dev/null
    echo "created $dir/finapi_ca, $dir/sim_tls_cert, $dir/sim_tls_key"
fi

for name in finapi_client_secret broker_api_key postgres_password identity_password_key database_url \
    finapi_ca sim_tls_cert sim_tls_key; do
    # Compose (without Swarm) bind-mounts the file as it is; the containers run as uid 65532
    # (broker, simulator) and as the postgres user.
    chmod 0644 "$dir/$name"
done
