# Sourced by the scripts beside it (run from the checkout, with BIN and
# DB set): a MongoDB stand-in and a Redis (no persistence) on free
# loopback ports in a temporary directory $D, the CALLBOARD_* variables
# for them, and every process stopped on exit.
D=$(mktemp -d)
port() { python3 -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])"; }
MP=$(port); RP=$(port); HP=$(port); SP=
start_redis() { redis-server --port $RP --save "" --appendonly no --dir $D --daemonize yes --pidfile $D/r.pid > /dev/null; }
stop_all() {
  [ -n "$SP" ] && { kill $SP; wait $SP 2>/dev/null; }
  kill $(cat $D/nx.pid 2>/dev/null) $(cat $D/r.pid 2>/dev/null) 2>/dev/null
  rm -rf $D
}
trap stop_all EXIT
.venv/bin/python ../shared/standin/nx_standin.py --db memory -p $MP --pid-file $D/nx.pid --log-file $D/nx.log > /dev/null 2>&1 &
start_redis
export CALLBOARD_MONGODB_URI="mongodb://127.0.0.1:$MP/?directConnection=true" CALLBOARD_MONGODB_DB=$DB \
  CALLBOARD_REDIS_URL="redis://127.0.0.1:$RP" CALLBOARD_JWT_SECRET="$DB-secret-0123456789abcdef-0123456789" \
  CALLBOARD_HTTP_ADDR="127.0.0.1:$HP" CALLBOARD_LOG=warn
for i in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$MP) 2>/dev/null && break; sleep 0.1; done

# seed_and_start COMMAND TENANTS CALLS: seeds the data, creates the
# indexes, starts `BIN COMMAND` (pid in SP) and waits until it answers.
seed_and_start() {
  $BIN seed --tenants $2 --calls $3 --users 100 --statuses 5 --drop > /dev/null
  $BIN create-indexes > /dev/null
  $BIN $1 > $D/$1.log 2>&1 & SP=$!
  for i in $(seq 100); do curl -sf http://127.0.0.1:$HP/healthz > /dev/null && break; sleep 0.1; done
}
