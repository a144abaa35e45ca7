//! Property tests of the apply logic against a real Redis: replaying any
//! suffix of the stream (with other batch boundaries, after a crash between
//! a tenant's write and the shared locators') leaves the same state, and
//! that state equals a snapshot of the final documents.

use std::collections::BTreeMap;

use bson::{doc, Bson, DateTime, Document};
use callboard_domain::TenantId;
use callboard_projector::transform::{needs, plan, Change};
use callboard_readmodel::codec::CallEntry;
use callboard_readmodel::write::{Plan, Writer};
use callboard_readmodel::{Conn, Keys, Redis, TenantState};
use callboard_testkit::TestRedis;
use proptest::prelude::*;
use redis::AsyncCommands;

#[derive(Debug, Clone)]
enum Op {
    Upsert { doc: i64, tenant: i64, status: i64, start: Option<i64>, deleted: bool, owner: i64 },
    Delete { doc: i64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1..5_i64, 1..4_i64, 1..4_i64, proptest::option::of(0..4_i64), proptest::bool::weighted(0.2), 1..4_i64)
            .prop_map(|(doc, tenant, status, start, deleted, owner)| Op::Upsert { doc, tenant, status, start, deleted, owner }),
        1 => (1..5_i64).prop_map(|doc| Op::Delete { doc }),
    ]
}

fn document(op: &Op) -> Option<Document> {
    match op {
        Op::Upsert { doc, tenant, status, start, deleted, owner } => {
            let mut d = doc! {"_id": *doc, "id": 100 + *doc, "tenant_id": *tenant, "status_id": if status % 2 == 0 { Bson::String(status.to_string()) } else { Bson::Int64(*status) }, "owner_id": *owner};
            if let Some(s) = start {
                d.insert("start_time", DateTime::from_millis(1_000_000 * s));
            }
            if *deleted {
                d.insert("deleted", 1);
            }
            Some(d)
        }
        Op::Delete { .. } => None,
    }
}

fn change(op: &Op) -> Change {
    let doc_id = match op {
        Op::Upsert { doc, .. } | Op::Delete { doc } => *doc,
    };
    let key = callboard_domain::DocKey::from_bson(&Bson::Int64(doc_id));
    Change::Call { doc: key, state: document(op).map(|d| CallEntry::from_document(&d)) }
}

async fn warm_all(conn: &mut Conn, keys: &Keys) {
    for t in 1..4 {
        let _: () = conn.set(keys.state(TenantId::new(t).unwrap()), TenantState::encode_warm(1)).await.unwrap();
    }
}

/// Where a crash interrupts the apply of one batch.
#[derive(Debug, Clone, Copy)]
enum Crash {
    AfterIntents,
    /// After this many tenants' scripts.
    AfterTenants(usize),
    BeforeShared,
}

fn crash() -> impl Strategy<Value = Crash> {
    prop_oneof![Just(Crash::AfterIntents), (0..3_usize).prop_map(Crash::AfterTenants), Just(Crash::BeforeShared)]
}

/// Applies `changes` in batches cut at `cuts`; with `crash_at`, the batch
/// of that index stops where the crash says and nothing after it runs.
async fn apply(writer: &Writer, changes: &[Change], cuts: &[usize], crash_at: Option<(usize, Crash)>) {
    let mut start = 0;
    let mut bounds: Vec<usize> = cuts.iter().copied().filter(|c| *c > 0 && *c < changes.len()).collect();
    bounds.sort();
    bounds.dedup();
    bounds.push(changes.len());
    for (i, end) in bounds.into_iter().enumerate() {
        let batch = &changes[start..end];
        start = end;
        if batch.is_empty() {
            continue;
        }
        let n = needs(batch);
        let view = writer.load_locators(&n.calls, &n.users, &n.statuses, &n.tenants).await.unwrap();
        let p = plan(batch, &view, 0);
        match crash_at {
            Some((at, how)) if at == i => {
                let mut partial = Plan { intents: p.intents.clone(), ..Plan::default() };
                match how {
                    Crash::AfterIntents => {}
                    Crash::AfterTenants(k) => partial.tenants = p.tenants.clone().into_iter().take(k).collect(),
                    Crash::BeforeShared => partial.tenants = p.tenants.clone(),
                }
                writer.apply(&partial).await.unwrap();
                return;
            }
            _ => assert_eq!(writer.apply(&p).await.unwrap(), vec![], "no window runs short at these sizes"),
        }
    }
}

/// The events of `ops[from..]` as a restarted projector sees them: an
/// update is looked up again (`fullDocument: updateLookup`), so it carries
/// the document as it is *now*, or is skipped if it was deleted since.
fn replayed(ops: &[Op], from: usize) -> Vec<Change> {
    let mut now: BTreeMap<i64, Option<Document>> = BTreeMap::new();
    for op in ops {
        now.insert(doc_of(op), document(op));
    }
    ops[from..]
        .iter()
        .filter_map(|op| match op {
            Op::Delete { .. } => Some(change(op)),
            Op::Upsert { .. } => {
                let current = now.get(&doc_of(op)).cloned().flatten()?;
                let key = callboard_domain::DocKey::from_bson(&Bson::Int64(doc_of(op)));
                Some(Change::Call { doc: key, state: Some(CallEntry::from_document(&current)) })
            }
        })
        .collect()
}

fn doc_of(op: &Op) -> i64 {
    match op {
        Op::Upsert { doc, .. } | Op::Delete { doc } => *doc,
    }
}

/// Every key under the prefix but tenant states, meta and versions, as text
/// (binary members and fields escaped).
async fn dump(redis: &Redis, prefix: &str) -> BTreeMap<String, Vec<String>> {
    let keys: Vec<String> = redis.scan(&format!("{prefix}:*")).await.unwrap();
    let mut conn = redis.get().await.unwrap();
    let conn = &mut conn;
    let mut out = BTreeMap::new();
    for key in keys {
        // Bookkeeping that differs by history, not state: the tenant
        // states, the last event time, the write counter and the fences.
        if [":state", ":meta", ":ver", ":fence"].iter().any(|s| key.ends_with(s)) {
            continue;
        }
        let kind: String = redis::cmd("TYPE").arg(&key).query_async(conn).await.unwrap();
        let mut value: Vec<String> = match kind.as_str() {
            "zset" => {
                let v: Vec<(Vec<u8>, f64)> = conn.zrange_withscores(&key, 0, -1).await.unwrap();
                v.into_iter().map(|(m, s)| format!("{}={s}", m.escape_ascii())).collect()
            }
            "hash" => {
                let v: BTreeMap<Vec<u8>, Vec<u8>> = conn.hgetall(&key).await.unwrap();
                v.into_iter().map(|(k, v)| format!("{}={}", k.escape_ascii(), v.escape_ascii())).collect()
            }
            other => vec![other.to_string()],
        };
        value.sort();
        if !value.is_empty() {
            out.insert(key, value);
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn replaying_any_suffix_converges_to_the_snapshot_state(
        ops in proptest::collection::vec(op(), 1..25),
        cuts in proptest::collection::vec(0..25_usize, 0..5),
        replay_cuts in proptest::collection::vec(0..25_usize, 0..5),
        crash_batch in 0..6_usize,
        how in crash(),
        from_frac in 0.0..1.0_f64,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let redis = connect().await;
            let mut conn = redis.get().await.unwrap();
            let changes: Vec<Change> = ops.iter().map(change).collect();
            let (p_a, p_b, p_c) = (fresh(), fresh(), fresh());

            // Once, straight through.
            let once = Keys::new(&p_a);
            warm_all(&mut conn, &once).await;
            apply(&Writer::new(redis.clone(), once), &changes, &cuts, None).await;
            let state_once = dump(&redis, &p_a).await;

            // Crash mid-way, then replay a suffix that starts at or before
            // the crashed batch (the checkpoint never passes an unapplied
            // batch), cut differently.
            let crashed = Keys::new(&p_b);
            warm_all(&mut conn, &crashed).await;
            let writer = Writer::new(redis.clone(), crashed);
            apply(&writer, &changes, &cuts, Some((crash_batch, how))).await;
            let mut bounds: Vec<usize> = cuts.iter().copied().filter(|c| *c > 0 && *c < changes.len()).collect();
            bounds.sort();
            bounds.dedup();
            let crash_start = if crash_batch == 0 { 0 } else { bounds.get(crash_batch - 1).copied().unwrap_or(changes.len()) };
            let from = ((crash_start as f64) * from_frac) as usize;
            let replay = replayed(&ops, from);
            apply(&writer, &replay, &replay_cuts, None).await;
            apply(&writer, &replay, &replay_cuts, None).await;
            let state_replayed = dump(&redis, &p_b).await;
            let rename = |m: BTreeMap<String, Vec<String>>, p: &str| -> BTreeMap<String, Vec<String>> {
                m.into_iter().map(|(k, v)| (k.replacen(p, "x", 1), v)).collect()
            };
            prop_assert_eq!(rename(state_once.clone(), &p_a), rename(state_replayed, &p_b));

            // And it is what a snapshot of the final documents gives.
            let mut last: BTreeMap<i64, Option<Document>> = BTreeMap::new();
            for op in &ops {
                let id = match op { Op::Upsert { doc, .. } | Op::Delete { doc } => *doc };
                last.insert(id, document(op));
            }
            let snap = Keys::new(&p_c);
            warm_all(&mut conn, &snap).await;
            let writer = Writer::new(redis.clone(), snap);
            let mut by_tenant: BTreeMap<i64, Vec<CallEntry>> = BTreeMap::new();
            for d in last.values().flatten() {
                if let Some(e) = CallEntry::from_document(d) {
                    by_tenant.entry(e.place.tenant.get()).or_default().push(e);
                }
            }
            for (t, entries) in &by_tenant {
                writer.put_snapshot(TenantId::new(*t).unwrap(), entries).await.unwrap();
            }
            let state_snapshot = dump(&redis, &p_c).await;
            prop_assert_eq!(rename(state_once, &p_a), rename(state_snapshot, &p_c));
            Ok(())
        })?;
    }
}

/// A key prefix no other case uses (cases of both tests share a server).
fn fresh() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!("p{}", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// One server (or cluster, with `CALLBOARD_TEST_REDIS_TOPOLOGY=cluster`)
/// per test thread, for all its cases. Per thread, not per process: the
/// servers are started with PR_SET_PDEATHSIG, which fires when the *thread*
/// that started them exits. A connection per case: each case has its own
/// runtime.
async fn connect() -> Redis {
    thread_local! {
        static SERVER: TestRedis = {
            let dir = std::env::temp_dir().join(callboard_testkit::unique_db_name("replay"));
            std::fs::create_dir_all(&dir).unwrap();
            TestRedis::start(&dir).unwrap()
        };
    }
    match SERVER.with(|s| s.setting()) {
        ("CALLBOARD_REDIS_URL", url) => Redis::single_url(&url, 4).unwrap(),
        (_, seeds) => Redis::cluster(&seeds.split(',').map(str::to_string).collect::<Vec<_>>()).await.unwrap(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// A warm of one tenant: its snapshot is read at some moment `j` while
    /// the stream (maintaining every other tenant) is paused at an earlier
    /// position `i`; the events from `i` on are then applied. Whatever
    /// `i <= j`, the result is the state after all events, in that tenant
    /// and in the others a call moved to or from.
    #[test]
    fn a_snapshot_plus_the_events_since_an_earlier_position_converges(
        ops in proptest::collection::vec(op(), 1..25),
        cuts in proptest::collection::vec(0..25_usize, 0..5),
        i_frac in 0.0..1.0_f64,
        j_frac in 0.0..1.0_f64,
        warmed in 1..4_i64,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let redis = connect().await;
            let mut conn = redis.get().await.unwrap();
            let changes: Vec<Change> = ops.iter().map(change).collect();
            let (p_a, p_w) = (fresh(), fresh());
            let once = Keys::new(&p_a);
            warm_all(&mut conn, &once).await;
            apply(&Writer::new(redis.clone(), once), &changes, &cuts, None).await;

            let j = ((ops.len() as f64) * j_frac) as usize;
            let i = ((j as f64) * i_frac) as usize;
            let mut at_j: BTreeMap<i64, Option<Document>> = BTreeMap::new();
            for op in &ops[..j] {
                at_j.insert(doc_of(op), document(op));
            }
            // The stream reaches i with every tenant maintained; then one
            // tenant is warmed from a snapshot read at j; then the stream
            // goes on from i.
            let warm = Keys::new(&p_w);
            warm_all(&mut conn, &warm).await;
            let writer = Writer::new(redis.clone(), warm);
            apply(&writer, &changes[..i], &cuts, None).await;
            let tenant = TenantId::new(warmed).unwrap();
            writer.purge_tenant_calls(tenant).await.unwrap();
            let entries: Vec<CallEntry> =
                at_j.values().flatten().filter_map(CallEntry::from_document).filter(|e| e.place.tenant == tenant).collect();
            writer.put_snapshot(tenant, &entries).await.unwrap();
            apply(&writer, &changes[i..], &cuts, None).await;
            let rename = |m: BTreeMap<String, Vec<String>>, p: &str| -> BTreeMap<String, Vec<String>> {
                m.into_iter().map(|(k, v)| (k.replacen(p, "x", 1), v)).collect()
            };
            prop_assert_eq!(rename(dump(&redis, &p_a).await, &p_a), rename(dump(&redis, &p_w).await, &p_w));
            Ok(())
        })?;
    }
}

/// A snapshot scan can return a document twice, in two places (it moved
/// within the index being scanned). The last one read wins, and nothing is
/// left in the first place: no locator would name it, so no event could
/// ever remove it.
#[test]
fn a_document_read_twice_by_a_snapshot_ends_in_one_place() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let redis = connect().await;
        let mut conn = redis.get().await.unwrap();
        let prefix = fresh();
        let keys = Keys::new(&prefix);
        warm_all(&mut conn, &keys).await;
        let at = |status: i64| {
            CallEntry::from_document(&doc! {"_id": 7, "id": 107, "tenant_id": 1, "status_id": status}).unwrap()
        };
        let tenant = TenantId::new(1).unwrap();
        Writer::new(redis.clone(), keys.clone()).put_snapshot(tenant, &[at(1), at(2)]).await.unwrap();
        let first: u64 = conn.zcard(format!("{prefix}:{{t1}}:z:1")).await.unwrap();
        let second: u64 = conn.zcard(format!("{prefix}:{{t1}}:z:2")).await.unwrap();
        assert_eq!((first, second), (0, 1), "the call must be in status 2 only");
    });
}
