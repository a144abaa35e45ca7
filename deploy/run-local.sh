#!/usr/bin/env bash
# `make run`: Redis and the MongoDB stand-in on loopback, demo data, the API.
# `make run-cluster` (RUN_CLUSTER=1): a 3-master Redis Cluster on ports
# RUN_REDIS_PORT..+2 instead of one Redis, and the projector in
# RUN_PARTITIONS partitions (default 4).
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
CLUSTER=${RUN_CLUSTER:-0}
PARTITIONS=${RUN_PARTITIONS:-4}
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

REDIS_PORTS=("$REDIS_PORT")
[ "$CLUSTER" = 1 ] && REDIS_PORTS=("$REDIS_PORT" $((REDIS_PORT + 1)) $((REDIS_PORT + 2)))
for p in "$MONGO_PORT" "${REDIS_PORTS[@]}" "${HTTP_ADDR##*:}"; do
  if port_busy "$p"; then echo "port $p is in use; set RUN_MONGO_PORT, RUN_REDIS_PORT or RUN_HTTP_ADDR" >&2; exit 1; fi
done

if [ "$CLUSTER" = 1 ]; then
  rm -f "$RUN_DIR"/nodes-*.conf
  for p in "${REDIS_PORTS[@]}"; do
    redis-server --port "$p" --bind 127.0.0.1 --save "" --appendonly no --cluster-enabled yes \
      --cluster-config-file "nodes-$p.conf" --cluster-node-timeout 2000 --dir "$RUN_DIR" >"$RUN_DIR/redis-$p.log" 2>&1 &
    pids+=($!)
  done
  for p in "${REDIS_PORTS[@]}"; do wait_port "$p"; done
  redis-cli --cluster create "${REDIS_PORTS[@]/#/127.0.0.1:}" --cluster-yes >"$RUN_DIR/cluster-create.log"
  until redis-cli -p "$REDIS_PORT" cluster info | grep -q cluster_state:ok; do sleep 0.1; done
else
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no >"$RUN_DIR/redis.log" 2>&1 &
  pids+=($!)
fi
.venv/bin/python "$STANDIN" --db memory -p "$MONGO_PORT" --host 127.0.0.1 \
  --pid-file "$RUN_DIR/nx.pid" --log-file "$RUN_DIR/nx.log" >"$RUN_DIR/nx.out" 2>&1 &
pids+=($!)
wait_port "$REDIS_PORT"
wait_port "$MONGO_PORT"

export CALLBOARD_MONGODB_URI="mongodb://127.0.0.1:$MONGO_PORT/?directConnection=true"
if [ "$CLUSTER" = 1 ]; then
  nodes=("${REDIS_PORTS[@]/#/redis://127.0.0.1:}")
  export CALLBOARD_REDIS_CLUSTER_NODES=$(IFS=,; echo "${nodes[*]}")
  export CALLBOARD_PROJECTOR_PARTITIONS="$PARTITIONS"
else
  export CALLBOARD_REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
fi
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

callboard is serving demo data on http://$HTTP_ADDR (tenant 6's token below, valid 12h),
on ${CALLBOARD_REDIS_CLUSTER_NODES:-one Redis at $CALLBOARD_REDIS_URL}.
The first request is answered live (X-Cache: miss) and warms tenant 6; the
next ones come from Redis (X-Cache: hit). -i shows the headers: X-Cache,
X-Callboard-As-Of (every change committed before it is in the answer) and
X-Callboard-Lag-Ms.

  curl -i -X POST "http://$HTTP_ADDR/crm/calls/get-grouped-by-status" \\
    -H "Authorization: Bearer $TOKEN" \\
    -F "limit=20" -F "include_enrichment=true"

Read your writes (waits up to 1 s for the projector to pass the instant),
and a bound on staleness (older than 5 s: answered live):
  curl -i -X POST "http://$HTTP_ADDR/crm/calls/get-grouped-by-status" \\
    -H "Authorization: Bearer $TOKEN" -F "limit=5" \\
    -F "min_as_of=\$(date +%s%3N)" -F "max_staleness_ms=5000"

The live board (Kanban), in a browser:
  http://$HTTP_ADDR/board?access_token=$TOKEN

The same board as Server-Sent Events (a new event whenever it changes):
  curl -N "http://$HTTP_ADDR/crm/calls/stream?limit=5" -H "Authorization: Bearer $TOKEN"

Operators (admin token):
  CALLBOARD_URL=http://$HTTP_ADDR CALLBOARD_ADMIN_TOKEN=$ADMIN $BIN status
  curl -H "Authorization: Bearer $ADMIN" http://$HTTP_ADDR/admin/cache/status

The API document: http://$HTTP_ADDR/openapi.json

Ctrl-C stops the API, the projector, Redis and the stand-in.
MSG
wait "${pids[-1]}"
