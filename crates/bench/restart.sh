#!/bin/bash
# Redis lost with every tenant warm: TENANTS tenants (CALLS calls in all)
# warmed through `callboard run`, then Redis restarted empty (no
# persistence), then every tenant asked REQS times (64 at a time). Reports
# what reached MongoDB: live aggregations started, joined (coalesced) and
# refused, and the snapshots the re-warms ran.
# usage: crates/bench/restart.sh BIN [TENANTS] [CALLS] [REQS]   (from the checkout; needs `make deps`)
set -u
BIN=$1; TENANTS=${2:-1000}; CALLS=${3:-20000}; REQS=${4:-3}
cd "$(dirname "$0")/../.."
D=$(mktemp -d)
port() { python3 -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])"; }
MP=$(port); RP=$(port); HP=$(port)
.venv/bin/python ../shared/standin/nx_standin.py --db memory -p $MP --pid-file $D/nx.pid --log-file $D/nx.log > /dev/null 2>&1 &
redis() { redis-server --port $RP --save "" --appendonly no --dir $D --daemonize yes --pidfile $D/r.pid > /dev/null; }
redis
export CALLBOARD_MONGODB_URI="mongodb://127.0.0.1:$MP/?directConnection=true" CALLBOARD_MONGODB_DB=restart \
  CALLBOARD_REDIS_URL="redis://127.0.0.1:$RP" CALLBOARD_JWT_SECRET=restart-secret-0123456789abcdef-012345678 \
  CALLBOARD_HTTP_ADDR="127.0.0.1:$HP" CALLBOARD_LOG=warn
for i in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$MP) 2>/dev/null && break; sleep 0.1; done
$BIN seed --tenants $TENANTS --calls $CALLS --users 100 --statuses 5 --drop > /dev/null
$BIN create-indexes > /dev/null
$BIN run > $D/run.log 2>&1 & SP=$!
for i in $(seq 100); do curl -sf http://127.0.0.1:$HP/healthz > /dev/null && break; sleep 0.1; done
ADMIN=$($BIN token --tenant 1 --admin)
metric() { curl -s http://127.0.0.1:$HP/metrics | awk -v m="$1" '$1 == m {print $2}'; }
warm_all() {
  job=$(curl -s -X POST -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' -d '{"all": true}' \
    http://127.0.0.1:$HP/admin/cache/warm | python3 -c 'import json,sys; print(json.load(sys.stdin)["job_id"])')
  for i in $(seq 600); do
    state=$(curl -s -H "Authorization: Bearer $ADMIN" http://127.0.0.1:$HP/admin/cache/warm/$job | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')
    [ "$state" = done ] && return 0; sleep 0.5
  done
  echo "warm job $job never done" >&2; return 1
}
# Tenants are numbered 1..TENANTS by `seed`.
for t in $(seq $TENANTS); do echo "$t $($BIN token --tenant $t)"; done > $D/tokens
req() { curl -s -o /dev/null -w "%{http_code} %header{x-cache}\n" -X POST -H "Authorization: Bearer $2" -F limit=20 \
  http://127.0.0.1:$HP/crm/calls/get-grouped-by-status; }
export -f req; export HP
wave() { for r in $(seq $REQS); do cat $D/tokens; done | xargs -P 64 -L 1 bash -c 'req "$0" "$1"' > $D/wave; sort $D/wave | uniq -c | tr '\n' ' '; }
start=$(date +%s.%N); warm_all; warmed=$(echo "$(date +%s.%N) - $start" | bc)
before=$(wave)
q0=$(metric callboard_live_queries_total); j0=$(metric callboard_live_coalesced_total)
# Redis restarted empty.
kill $(cat $D/r.pid); sleep 0.5; redis
for i in $(seq 100); do redis-cli -p $RP ping > /dev/null 2>&1 && break; sleep 0.1; done
start=$(date +%s.%N); after=$(wave); took=$(echo "$(date +%s.%N) - $start" | bc)
q1=$(metric callboard_live_queries_total); j1=$(metric callboard_live_coalesced_total)
rejected=$(curl -s http://127.0.0.1:$HP/metrics | grep '^callboard_live_rejected_total' | tr '\n' ' ')
for i in $(seq 120); do
  w=$(metric callboard_warms_run); [ "${w:-0}" -ge "$TENANTS" ] && break; sleep 0.5
done
again=$(wave)
echo "$TENANTS tenants, $CALLS calls: warm-all took ${warmed}s; before the restart: $before"
echo "after Redis restarted empty, $((TENANTS * REQS)) requests (64 at a time) in ${took}s: $after"
echo "live aggregations started: $((q1 - q0)), joined a running one: $((j1 - j0)); ${rejected:-none refused}"
echo "snapshots run since the restart (warms): ${w:-0}; then: $again"
kill $SP; wait $SP 2>/dev/null; kill $(cat $D/nx.pid); kill $(cat $D/r.pid); rm -rf $D
