#!/bin/bash
# The other tenants' projection lag while a big tenant warms: tenant 1 has
# CALLS calls and is cold, tenant 2 is warm; a probe inserts a call into
# tenant 2 every 50 ms, on a fixed schedule, and a reader times how long
# until the API serves each as a hit. Lag is reported for a quiet spell, then while tenant
# 1's warm runs (from its request until its job is done).
# usage: crates/bench/warm-lag.sh BIN LABEL [CALLS]   (from the checkout; needs `make deps`)
set -u
BIN=$1; LABEL=$2; CALLS=${3:-100000}
cd "$(dirname "$0")/../.."
DB=warmlag; . crates/bench/servers.sh
seed_and_start run 1 $CALLS
URI=$CALLBOARD_MONGODB_URI API=http://127.0.0.1:$HP TWO=$($BIN token --tenant 2) ADMIN=$($BIN token --tenant 1 --admin) \
  LABEL=$LABEL .venv/bin/python - <<'PY'
import json, os, threading, time, urllib.request
import pymongo

api, label = os.environ["API"], os.environ["LABEL"]
calls = pymongo.MongoClient(os.environ["URI"])["warmlag"]["calls"]

def post(path, token, body):
    req = urllib.request.Request(api + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return r.headers.get("x-cache"), json.load(r)

def get(path, token):
    req = urllib.request.Request(api + path, headers={"Authorization": "Bearer " + token})
    with urllib.request.urlopen(req) as r:
        return json.load(r)

def newest_two():
    cache, body = post("/crm/calls/get-grouped-by-status", os.environ["TWO"], {"limit": 1})
    ids = [c["id"] for g in body["data"] for c in g["calls"]]
    return cache, ids

# Tenant 2: a few calls, warmed.
base = 1_900_000_000_000
calls.insert_many([{"id": 10_000_000 + i, "tenant_id": 2, "status_id": 1, "start_time": base + i} for i in range(50)])
deadline = time.time() + 60
while newest_two()[0] != "hit":
    assert time.time() < deadline, "tenant 2 never warm"
    time.sleep(0.1)

def probe(seconds, first_id, stop=None):
    """Inserts a newest call of tenant 2 every 50 ms, on a fixed schedule
    whatever the lag (a writer thread), while a reader polls the newest call
    served from the cache: a write is shown once the newest hit's id is at
    least its own (tenant 2's events apply in commit order, and an answer is
    one moment). Returns the lag of each write, ms."""
    acked, shown, lock, done = {}, {}, threading.Lock(), threading.Event()
    def writer():
        n, end, t0 = 0, time.time() + seconds, time.time()
        while (stop is None and time.time() < end) or (stop is not None and not stop.is_set()):
            cid = first_id + n
            calls.insert_one({"id": cid, "tenant_id": 2, "status_id": 1, "start_time": base + 1_000_000 + cid})
            with lock:
                acked[cid] = time.time()
            n += 1
            time.sleep(max(0.0, t0 + n * 0.05 - time.time()))
        done.set()
    w = threading.Thread(target=writer)
    w.start()
    while True:
        finished = done.is_set()
        cache, ids = newest_two()
        now = time.time()
        if cache == "hit" and ids:
            with lock:
                for cid, at in acked.items():
                    if cid <= max(ids) and cid not in shown:
                        shown[cid] = (now - at) * 1000
        with lock:
            if finished and len(shown) == len(acked):
                break
        time.sleep(0.002)
    w.join()
    return [shown[c] for c in sorted(shown)]

def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))]

quiet = probe(5, 20_000_000)
# Tenant 1's warm, from an operator, while the probe runs.
stop = threading.Event()
out = {}
t = threading.Thread(target=lambda: out.setdefault("lags", probe(0, 30_000_000, stop)))
t.start()
started = time.time()
job = post("/admin/cache/warm", os.environ["ADMIN"], {"tenant_id": 1})[1]["job_id"]
while get("/admin/cache/warm/" + job, os.environ["ADMIN"])["state"] != "done":
    time.sleep(0.05)
warm_s = time.time() - started
stop.set(); t.join()
during = out["lags"]
print(f"{label}: quiet: {len(quiet)} writes, p50 {pct(quiet, 50):.0f} ms, p99 {pct(quiet, 99):.0f} ms, max {max(quiet):.0f} ms")
print(f"{label}: while a {calls.count_documents({'tenant_id': 1})}-call tenant warms ({warm_s:.1f} s): {len(during)} writes, "
      f"p50 {pct(during, 50):.0f} ms, p99 {pct(during, 99):.0f} ms, max {max(during):.0f} ms")
PY
