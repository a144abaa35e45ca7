#!/bin/bash
# The cold herd: 32 identical concurrent requests for a cold tenant with
# CALLS calls, against one `callboard serve` (no projector, so the tenant
# stays cold) on a fresh stand-in and Redis on free loopback ports.
# usage: crates/bench/herd.sh BIN LABEL [CALLS]   (run from the checkout; needs `make deps`)
set -u
BIN=$1; LABEL=$2; CALLS=${3:-20000}
cd "$(dirname "$0")/../.."
D=$(mktemp -d)
port() { python3 -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])"; }
MP=$(port); RP=$(port); HP=$(port)
.venv/bin/python ../shared/standin/nx_standin.py --db memory -p $MP --pid-file $D/nx.pid --log-file $D/nx.log > /dev/null 2>&1 &
redis-server --port $RP --save "" --appendonly no --dir $D --daemonize yes --pidfile $D/r.pid > /dev/null
export CALLBOARD_MONGODB_URI="mongodb://127.0.0.1:$MP/?directConnection=true" CALLBOARD_MONGODB_DB=herd \
  CALLBOARD_REDIS_URL="redis://127.0.0.1:$RP" CALLBOARD_JWT_SECRET=herd-secret-0123456789abcdef-0123456789 \
  CALLBOARD_HTTP_ADDR="127.0.0.1:$HP" CALLBOARD_LOG=warn
for i in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$MP) 2>/dev/null && break; sleep 0.1; done
$BIN seed --tenants 1 --calls $CALLS --users 100 --statuses 5 --drop > /dev/null
$BIN create-indexes > /dev/null
$BIN serve > $D/serve.log 2>&1 & SP=$!
for i in $(seq 100); do curl -sf http://127.0.0.1:$HP/healthz > /dev/null && break; sleep 0.1; done
TOKEN=$($BIN token --tenant 1)
req() { curl -s -o /dev/null -w "%{http_code} %{time_total}\n" -X POST -H "Authorization: Bearer $TOKEN" -F limit=20 http://127.0.0.1:$HP/crm/calls/get-grouped-by-status; }
export -f req; export TOKEN HP
one=$(req)
start=$(date +%s.%N)
seq 32 | xargs -P 32 -I{} bash -c req > $D/out
end=$(date +%s.%N)
total=$(echo "$end - $start" | bc)
codes=$(awk '{print $1}' $D/out | sort | uniq -c | tr '\n' ' ')
maxt=$(awk '{print $2}' $D/out | sort -n | tail -1)
queries=$(curl -s http://127.0.0.1:$HP/metrics | grep '^callboard_live_queries_total' | awk '{print $2}')
echo "$LABEL: one cold request: $one; 32 concurrent: wall ${total}s, codes: $codes, slowest ${maxt}s, live aggregations counted: ${queries:-n/a}"
kill $SP; kill $(cat $D/nx.pid); kill $(cat $D/r.pid); rm -rf $D
