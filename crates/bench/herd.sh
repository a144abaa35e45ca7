#!/bin/bash
# The cold herd: 32 identical concurrent requests for a cold tenant with
# CALLS calls, against one `callboard serve` (no projector, so the tenant
# stays cold) on a fresh stand-in and Redis on free loopback ports.
# usage: crates/bench/herd.sh BIN LABEL [CALLS]   (run from the checkout; needs `make deps`)
set -u
BIN=$1; LABEL=$2; CALLS=${3:-20000}
cd "$(dirname "$0")/../.."
DB=herd; . crates/bench/servers.sh
seed_and_start serve 1 $CALLS
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
