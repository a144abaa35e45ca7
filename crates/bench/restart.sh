#!/bin/bash
# Redis lost with every tenant warm: TENANTS tenants (CALLS calls in all)
# warmed through `callboard run`, then Redis restarted empty (no
# persistence), then every tenant asked REQS times (64 at a time). Reports
# what reached MongoDB: live aggregations started, joined (coalesced) and
# refused, and the warms completed since.
# usage: crates/bench/restart.sh BIN [TENANTS] [CALLS] [REQS]   (from the checkout; needs `make deps`)
set -u
BIN=$1; TENANTS=${2:-1000}; CALLS=${3:-20000}; REQS=${4:-3}
cd "$(dirname "$0")/../.."
DB=restart; . crates/bench/servers.sh
seed_and_start run $TENANTS $CALLS
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
old=$(cat $D/r.pid); kill $old; while kill -0 $old 2>/dev/null; do sleep 0.05; done; start_redis
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
echo "warms completed since the restart: ${w:-0}; then: $again"
