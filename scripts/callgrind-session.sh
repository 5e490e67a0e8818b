#!/usr/bin/env bash
# Instructions per session (access flow, or standalone with FLOW=standalone) of the release
# broker (docs/BENCHMARKS.md, "Third round" and "Tracing (issue 14)"): the broker under
# `valgrind --tool=callgrind`, the simulator beside it, WARMUP sessions, counters zeroed
# (`callgrind_control -z`), SESSIONS sessions from 8 keep-alive connections (curl's parallel
# mode), counters dumped; prints total Ir / sessions.
#
# Usage: scripts/callgrind-session.sh [VAR=VALUE ...]
#   The VAR=VALUE pairs are extra environment of the broker, e.g. OTEL_TRACES_SAMPLER=always_on.
#   The word `otel-receiver` among them starts a local OTLP/HTTP receiver (python3, answers 200
#   to every POST) and points OTEL_EXPORTER_OTLP_ENDPOINT at it.
# Environment: SESSIONS (default 1000), WARMUP (200), BIN (target/release/giroident-broker),
#   SIM_BIN (the simulator's binary, BIN by default: set it to the broker when BIN is the
#   floor of the stack, `target/release/examples/floor`), OUT (directory for callgrind.out files; default a temp dir, kept), FLOW (`access`, the
#   default, or `standalone`: each session creates a process for one fixed client reference
#   and exchanges its token).
# Everything listens on 127.0.0.1. Needs valgrind, curl, python3, sha256sum.
set -euo pipefail

SESSIONS=${SESSIONS:-1000}
WARMUP=${WARMUP:-200}
BIN=${BIN:-target/release/giroident-broker}
SIM_BIN=${SIM_BIN:-$BIN}
FLOW=${FLOW:-access}
case "$FLOW" in
  access) BODY='{"flow":"access"}' ;;
  standalone) BODY='{"flow":"standalone","clientReference":"bench-customer-4711"}' ;;
  *) echo "FLOW must be access or standalone, not $FLOW" >&2; exit 2 ;;
esac
OUT=${OUT:-$(mktemp -d /tmp/callgrind-session.XXXXXX)}
API_KEY=bench-api-key-0123456789abcdef
PASSWORD_KEY=bench-password-key-0123456789abcdef-0123456789
DIGEST=$(printf %s "$API_KEY" | sha256sum | cut -d' ' -f1)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_200() { # URL, seconds
  for _ in $(seq $(( $2 * 10 ))); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$1" || true)" = 200 ] && return 0
    sleep 0.1
  done
  echo "$1 did not answer 200" >&2; return 1
}

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$OUT/ledger"; }
trap cleanup EXIT

extra=()
for kv in "$@"; do
  if [ "$kv" = otel-receiver ]; then
    rport=$(free_port)
    python3 - "$rport" <<'PY' &
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
    PIDS+=($!)
    extra+=("OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$rport")
  else
    extra+=("$kv")
  fi
done

sport=$(free_port)
env -i RUST_LOG=warn GIROIDENT_SIM_CLIENT_SECRET=demo-client-secret \
  "$SIM_BIN" sim --listen "127.0.0.1:$sport" --client-id demo-client --client-token-ttl-secs 3600 &
PIDS+=($!)
wait_200 "http://127.0.0.1:$sport/__sim/stats" 10

bport=$(free_port)
mkdir -p "$OUT/ledger"
env -i PATH="$PATH" \
  GIROIDENT_BROKER_SERVER__LISTEN="127.0.0.1:$bport" \
  GIROIDENT_BROKER_ADMIN__LISTEN=127.0.0.1:0 \
  GIROIDENT_BROKER_AUTH__CALLERS="[{name = \"bench\", key_sha256 = \"$DIGEST\", flows = [\"standalone\", \"access\"]}]" \
  GIROIDENT_BROKER_LIMITS__CALLER_RATE_PER_SEC=10000000 \
  GIROIDENT_BROKER_LIMITS__CALLER_BURST=10000000 \
  GIROIDENT_BROKER_LIMITS__MAX_IN_FLIGHT=100000 \
  GIROIDENT_BROKER_SERVER__DRAIN_SECS=0 \
  GIROIDENT_BROKER_FINAPI__ACCESS_URL="http://127.0.0.1:$sport" \
  GIROIDENT_BROKER_FINAPI__PROCESS_CONTROLLER_URL="http://127.0.0.1:$sport" \
  GIROIDENT_BROKER_FINAPI__ALLOW_INSECURE_HTTP=true \
  GIROIDENT_BROKER_FINAPI__CLIENT_ID=demo-client \
  GIROIDENT_BROKER_FINAPI__CLIENT_SECRET=demo-client-secret \
  GIROIDENT_BROKER_IDENTITIES__DATABASE_URL="sqlite://$OUT/ledger/identities.db" \
  GIROIDENT_BROKER_IDENTITIES__PASSWORD_KEY="$PASSWORD_KEY" \
  GIROIDENT_BROKER_LOG__FILTER=warn RUST_LOG=warn \
  "${extra[@]}" \
  valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out.%p" "$BIN" serve \
  2>"$OUT/valgrind.log" &
BROKER=$!
PIDS+=($BROKER)
wait_200 "http://127.0.0.1:$bport/readyz" 120

sessions() { # N: sessions of $FLOW from 8 keep-alive connections; prints the count of 201s
  curl -s --no-progress-meter -Z --parallel-max 8 -o /dev/null -w '%{http_code}\n' \
    -H "x-api-key: $API_KEY" -H 'content-type: application/json' -d "$BODY" \
    "http://127.0.0.1:$bport/kyc-sessions?n=[1-$1]" | grep -c '^201$' || true
}

ok=$(sessions "$WARMUP"); echo "warm-up: $ok/$WARMUP sessions answered 201" >&2
# Let the exporter's queue drain before zeroing, so that the measured window holds its own work.
sleep 2
callgrind_control -z "$BROKER" >/dev/null
ok=$(sessions "$SESSIONS"); echo "measured: $ok/$SESSIONS sessions answered 201" >&2
# One batch export interval, so that the spans of the measured sessions are exported inside it.
sleep 6
callgrind_control -d "$BROKER" >/dev/null
sleep 1
dump=$(ls -t "$OUT"/callgrind.out.* | head -1)
ir=$(grep -m1 '^summary:\|^totals:' "$dump" | awk '{print $2}')
echo "dump: $dump" >&2
echo "flow: $FLOW, env: ${extra[*]:-(none)}"
echo "sessions: $ok, Ir: $ir, Ir/session: $(( ir / (ok > 0 ? ok : 1) ))"
