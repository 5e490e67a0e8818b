#!/usr/bin/env bash
# Proves the container deployment end to end: builds the image, checks the size of the layers it
# adds over the distroless base, starts docker-compose.yml (broker + simulator + PostgreSQL), runs
# both flows with curl, checks that a customer's identity is created once, reused and kept in
# PostgreSQL, checks that the broker runs as a non-root user, stops it with SIGTERM (it must drain
# and exit 0 in time), starts it again (the ledger survives) and tears everything down, whatever
# happens.
#
# Exit status: 0 all checks passed; 1 a check failed; 3 Docker (daemon or Compose) is not
# available, so nothing was tested. On the project's machines: bash ../shared/tools/local-docker.sh
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=giroident-broker:local               # the name docker-compose.yml uses
BASE=gcr.io/distroless/cc-debian12:nonroot  # the Dockerfile's runtime base
MAX_ADDED_BYTES=$((25 * 1000 * 1000))       # layers added over the base: under 25 MB
PROJECT=giroident-broker-test
BROKER=http://127.0.0.1:8080
SIM=https://127.0.0.1:8081
DRAIN_SECS=5 # server.drain_secs in config/compose.toml
STOP_TIMEOUT=20

step() { printf '\n== %s\n' "$*"; }
ok() { printf 'ok: %s\n' "$*"; }
fail() {
    printf 'FAIL: %s\n' "$*" >&2
    exit 1
}

if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
    echo "Docker is not available (no docker CLI or no running daemon): nothing was tested." >&2
    exit 3
fi
if docker compose version >/dev/null 2>&1; then
    compose=(docker compose -p "$PROJECT")
    compose_version=$(docker compose version)
elif command -v docker-compose >/dev/null 2>&1; then
    compose=(docker-compose -p "$PROJECT")
    compose_version=$(docker-compose version --short)
else
    echo "Docker Compose is not available (neither 'docker compose' nor docker-compose): nothing was tested." >&2
    exit 3
fi
command -v curl >/dev/null 2>&1 || fail "curl is needed on the host"

work=$(mktemp -d)
teardown() {
    status=$?
    if [ "$status" -ne 0 ]; then
        echo "-- logs after the failure" >&2
        "${compose[@]}" logs --no-color --tail 40 >&2 2>&1 || true
    fi
    step "teardown"
    "${compose[@]}" down --volumes --remove-orphans --timeout 5 2>&1 || true
    rm -rf "$work"
    exit "$status"
}
trap teardown EXIT

# curl_json NAME METHOD PATH [curl args...]: prints the status, leaves the body in $work/NAME.
curl_json() {
    local name=$1 method=$2 path=$3
    shift 3
    curl -sS -o "$work/$name" -w '%{http_code}' -X "$method" "$BROKER$path" \
        -H "X-Api-Key: $(cat deploy/compose/secrets/broker_api_key)" "$@"
}
# wait_healthy CONTAINER: waits up to 60 s for its healthcheck; prints the last status.
wait_healthy() {
    local health=
    for _ in $(seq 1 60); do
        health=$(docker inspect -f '{{.State.Health.Status}}' "$1")
        [ "$health" = healthy ] && break
        sleep 1
    done
    echo "$health"
}
json_string() { sed -n "s/.*\"$1\":\"\\([^\"]*\\)\".*/\\1/p" "$2"; }
redacted() { sed -E 's/"accessToken":"[^"]*"/"accessToken":"<redacted>"/' "$1"; }

step "docker build"
echo "docker $(docker version --format '{{.Server.Version}}'), compose $compose_version"
docker build --network host -q -t "$IMAGE" . >/dev/null
ok "built $IMAGE"

step "image"
base_bytes=$(docker image inspect -f '{{.Size}}' "$BASE")
image_bytes=$(docker image inspect -f '{{.Size}}' "$IMAGE")
added=$((image_bytes - base_bytes))
base_layers=$(docker history -q "$BASE" | wc -l)
image_layers=$(docker history -q "$IMAGE" | wc -l)
echo "layers added over $BASE:"
docker history --no-trunc --format '{{.Size}}\t{{.CreatedBy}}' "$IMAGE" |
    head -n $((image_layers - base_layers)) | cut -c1-110 | sed 's/^/  /'
echo "added bytes: $added ($((added / 1000)) kB)"
[ "$added" -lt "$MAX_ADDED_BYTES" ] || fail "the image adds $added bytes, limit $MAX_ADDED_BYTES"
ok "added layers under 25 MB"
user=$(docker image inspect -f '{{.Config.User}}' "$IMAGE")
case "$user" in "" | 0 | 0:* | root | root:*) fail "the image runs as '$user'" ;; esac
ok "image user: $user"

step "compose up"
bash deploy/compose/make-secrets.sh
"${compose[@]}" up -d --no-build 2>&1
broker_id=$("${compose[@]}" ps -q broker)
[ -n "$broker_id" ] || fail "no broker container"
health=$(wait_healthy "$broker_id")
[ "$health" = healthy ] || fail "broker health: $health"
sim_id=$("${compose[@]}" ps -q simulator)
pg_id=$("${compose[@]}" ps -q postgres)
[ -n "$pg_id" ] || fail "no postgres container"
ok "postgres $(docker inspect -f '{{.State.Health.Status}}' "$pg_id"), simulator $(docker inspect -f '{{.State.Health.Status}}' "$sim_id"), broker $health (HEALTHCHECK: giroident-broker healthcheck)"
pg_ports=$(docker port "$pg_id")
[ -z "$pg_ports" ] || fail "PostgreSQL is published on the host: $pg_ports"
ok "PostgreSQL is not published on the host"

step "API key"
status=$(curl -sS -o /dev/null -w '%{http_code}' -X POST "$BROKER/kyc-sessions" \
    -H 'Content-Type: application/json' -d '{"flow":"access"}')
echo "POST /kyc-sessions without X-Api-Key -> $status"
[ "$status" = 401 ] || fail "a request without an API key answered $status"
ok "callers need the compose secret's API key"

step "metrics"
metrics=$(docker exec "$broker_id" /usr/local/bin/giroident-broker healthcheck --url http://127.0.0.1:9090/metrics 2>&1) \
    || fail "the admin listener did not answer /metrics inside the container: $metrics"
echo "admin listener /metrics from inside the container: $metrics"
ok "admin listener answers inside the container (not published on the host)"

step "standalone flow"
status=$(curl_json standalone POST /kyc-sessions -H 'Content-Type: application/json' \
    -d '{"flow":"standalone","clientReference":"container-test-1"}')
echo "POST /kyc-sessions standalone -> $status $(redacted "$work/standalone")"
[ "$status" = 201 ] || fail "standalone flow answered $status"
[ -n "$(json_string accessToken "$work/standalone")" ] || fail "no accessToken"
ok "standalone flow"

step "access flow"
status=$(curl_json access POST /kyc-sessions -H 'Content-Type: application/json' \
    -d '{"flow":"access","email":"jane@example.com"}')
echo "POST /kyc-sessions access -> $status $(redacted "$work/access")"
[ "$status" = 201 ] || fail "access flow answered $status"
token=$(json_string accessToken "$work/access")
[ -n "$token" ] || fail "no accessToken"
status=$(curl_json delete DELETE /kyc-sessions/current -H "Authorization: Bearer $token")
echo "DELETE /kyc-sessions/current -> $status"
[ "$status" = 204 ] || fail "delete answered $status"
status=$(curl_json delete-again DELETE /kyc-sessions/current -H "Authorization: Bearer $token")
echo "DELETE /kyc-sessions/current (same token again) -> $status $(cat "$work/delete-again")"
[ "$status" = 401 ] || fail "second delete answered $status"
ok "access flow"

step "managed identity"
REFERENCE=container-customer-1
for expected in created reused; do
    status=$(curl_json "identity-$expected" POST /kyc-sessions -H 'Content-Type: application/json' \
        -d "{\"flow\":\"access\",\"clientReference\":\"$REFERENCE\",\"email\":\"jane@example.com\"}")
    echo "POST /kyc-sessions access, clientReference $REFERENCE -> $status $(redacted "$work/identity-$expected")"
    [ "$status" = 201 ] || fail "access flow with a clientReference answered $status"
    identity=$(json_string identity "$work/identity-$expected")
    [ "$identity" = "$expected" ] || fail "identity is '$identity', expected '$expected'"
done
user_created=$(json_string userId "$work/identity-created")
user_reused=$(json_string userId "$work/identity-reused")
[ -n "$user_created" ] && [ "$user_created" = "$user_reused" ] ||
    fail "the reused session has user '$user_reused', the first '$user_created'"
status=$(curl_json identity-get GET "/identities/$REFERENCE")
echo "GET /identities/$REFERENCE -> $status $(cat "$work/identity-get")"
[ "$status" = 200 ] || fail "GET /identities/$REFERENCE answered $status"
[ "$(json_string state "$work/identity-get")" = active ] || fail "the identity is not active"
# The ledger is PostgreSQL's, not a file in the broker's container.
rows=$(docker exec "$pg_id" psql -U giroident -d giroident -tAc \
    "SELECT count(*) FROM identities WHERE finapi_user_id = '$user_created'")
echo "identities in PostgreSQL for $user_created: $rows"
[ "$rows" = 1 ] || fail "the identity is not in PostgreSQL ($rows rows)"
ok "identity created once, reused, listed, and kept in PostgreSQL"
echo "simulator stats (over HTTPS, verified): $(curl -sS --cacert deploy/compose/secrets/finapi_ca "$SIM/__sim/stats")"

step "non-root"
top=$(docker top "$broker_id" -eo uid,gid,pid,args)
echo "$top" | sed 's/^/  /'
uids=$(echo "$top" | awk 'NR > 1 {print $1}')
[ -n "$uids" ] || fail "no broker process"
for uid in $uids; do [ "$uid" != 0 ] && [ "$uid" != root ] || fail "a broker process runs as root"; done
pid=$(docker inspect -f '{{.State.Pid}}' "$broker_id")
if [ -r "/proc/$pid/status" ]; then
    grep -E '^(Uid|Gid|CapEff):' "/proc/$pid/status" | sed 's/^/  /'
    awk '/^Uid:/ {for (i = 2; i <= 5; i++) if ($i == 0) exit 1}' "/proc/$pid/status" ||
        fail "the broker has uid 0"
fi
ok "the broker's process runs as uid $uids"

step "SIGTERM"
started=$(date +%s)
docker stop --time "$STOP_TIMEOUT" "$broker_id" >/dev/null &
stopper=$!
readyz=
for _ in $(seq 1 50); do
    readyz=$(curl -s -o /dev/null -w '%{http_code}' "$BROKER/readyz" || true)
    [ "$readyz" = 503 ] && break
    sleep 0.1
done
[ "$readyz" = 503 ] || fail "/readyz answered $readyz after SIGTERM, not 503"
echo "GET /readyz while draining -> $readyz"
status=$(curl_json draining POST /kyc-sessions -H 'Content-Type: application/json' \
    -d '{"flow":"standalone","clientReference":"container-test-2"}')
echo "POST /kyc-sessions while draining -> $status"
[ "$status" = 201 ] || fail "a request during the drain period answered $status"
wait "$stopper"
elapsed=$(($(date +%s) - started))
exit_code=$(docker inspect -f '{{.State.ExitCode}}' "$broker_id")
echo "exit code $exit_code after ${elapsed}s (drain ${DRAIN_SECS}s, docker stop timeout ${STOP_TIMEOUT}s)"
docker logs "$broker_id" 2>&1 | grep -E 'SIGTERM received|draining|drain period over|broker stopped' |
    sed -E 's/.*"message":"([^"]*)".*/  log: \1/'
[ "$exit_code" = 0 ] || fail "the broker exited $exit_code"
[ "$elapsed" -ge "$DRAIN_SECS" ] || fail "stopped after ${elapsed}s, before the drain period ended"
[ "$elapsed" -lt "$STOP_TIMEOUT" ] || fail "stopped only after docker stop's timeout"
ok "SIGTERM: drained, exited 0 within the grace period"

step "restart"
docker start "$broker_id" >/dev/null
health=$(wait_healthy "$broker_id")
[ "$health" = healthy ] || fail "broker health after the restart: $health"
status=$(curl_json identity-after-restart GET "/identities/$REFERENCE")
echo "GET /identities/$REFERENCE after the restart -> $status"
[ "$status" = 200 ] || fail "the identity was lost with the restart ($status)"
ok "the ledger outlives the broker's container"

printf '\nPASS: image, compose, both flows, managed identity on PostgreSQL, non-root, SIGTERM, restart\n'
