#!/usr/bin/env bash
# `make run`: Redis and the MongoDB stand-in on loopback, demo data, the API.
# Everything started here stops with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

RUN_DIR=${RUN_DIR:-.run}
MONGO_PORT=${RUN_MONGO_PORT:-27018}
REDIS_PORT=${RUN_REDIS_PORT:-16379}
HTTP_ADDR=${RUN_HTTP_ADDR:-127.0.0.1:8006}
CALLS=${RUN_CALLS:-10000}
TENANTS=${RUN_TENANTS:-10}
STANDIN=${STANDIN:-../shared/standin/nx_standin.py}
BIN=target/release/callboard

mkdir -p "$RUN_DIR"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

port_busy() { (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  for _ in $(seq 1 200); do port_busy "$1" && return 0; sleep 0.05; done
  echo "nothing listens on port $1; see $RUN_DIR/*.log" >&2; exit 1
}

for p in "$MONGO_PORT" "$REDIS_PORT" "${HTTP_ADDR##*:}"; do
  if port_busy "$p"; then echo "port $p is in use; set RUN_MONGO_PORT, RUN_REDIS_PORT or RUN_HTTP_ADDR" >&2; exit 1; fi
done

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no >"$RUN_DIR/redis.log" 2>&1 &
pids+=($!)
.venv/bin/python "$STANDIN" --db memory -p "$MONGO_PORT" --host 127.0.0.1 \
  --pid-file "$RUN_DIR/nx.pid" --log-file "$RUN_DIR/nx.log" >"$RUN_DIR/nx.out" 2>&1 &
pids+=($!)
wait_port "$REDIS_PORT"
wait_port "$MONGO_PORT"

export CALLBOARD_MONGODB_URI="mongodb://127.0.0.1:$MONGO_PORT/?directConnection=true"
export CALLBOARD_REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
export CALLBOARD_HTTP_ADDR="$HTTP_ADDR"
export CALLBOARD_JWT_SECRET="${RUN_SECRET:-callboard-demo-secret-not-for-production}"

"$BIN" seed --tenants "$TENANTS" --calls "$CALLS" --drop
"$BIN" create-indexes >/dev/null
TOKEN=$("$BIN" token --tenant 6 --ttl 12h)
ADMIN=$("$BIN" token --tenant 6 --admin --ttl 12h)

# API and projector in one process: the first request of a tenant is
# answered live and warms it; the next ones are cache hits.
"$BIN" run &
pids+=($!)
wait_port "${HTTP_ADDR##*:}"
cat <<MSG

callboard is serving demo data on http://$HTTP_ADDR (tenant 6's token below, valid 12h).
The first request is answered live (X-Cache: miss) and warms tenant 6; the
next ones come from Redis (X-Cache: hit). Add -i to see the header.

  curl -X POST "http://$HTTP_ADDR/crm/calls/get-grouped-by-status" \\
    -H "Authorization: Bearer $TOKEN" \\
    -F "limit=20" -F "include_enrichment=true"

Operators (admin token):
  curl -H "Authorization: Bearer $ADMIN" http://$HTTP_ADDR/admin/cache/status

Ctrl-C stops the API, the projector, Redis and the stand-in.
MSG
wait "${pids[-1]}"
