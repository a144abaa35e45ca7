//! Property tests of the apply logic against a real Redis: replaying any
//! suffix of the stream (with other batch boundaries, after a crash between
//! a tenant's write and the shared locators') leaves the same state, and
//! that state equals a snapshot of the final documents.

use std::collections::BTreeMap;

use bson::{doc, Bson, DateTime, Document};
use callboard_domain::TenantId;
use callboard_projector::transform::{needs, plan, Change};
use callboard_projector::warm::{refill_windows, CallSource, Load, Touched};
use callboard_readmodel::codec::CallEntry;
use callboard_readmodel::write::{DocWindow, Guard, Plan, Writer};
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
    for (i, r) in batches(changes.len(), cuts).into_iter().enumerate() {
        let p = plan_of(writer, &changes[r]).await;
        match crash_at {
            Some((at, how)) if at == i => {
                writer.apply(&partial(p, how)).await.unwrap();
                return;
            }
            _ => assert_eq!(writer.apply(&p).await.unwrap(), vec![], "no window runs short at these sizes"),
        }
    }
}

/// The plan of `batch`, from the locators `writer` reads now.
async fn plan_of(writer: &Writer, batch: &[Change]) -> Plan {
    let n = needs(batch);
    let view = writer.load_locators(&n.calls, &n.users, &n.statuses, &n.tenants).await.unwrap();
    plan(batch, &view, 0)
}

/// `m` with the key prefix `p` replaced, so that runs under two prefixes
/// compare.
fn renamed(m: BTreeMap<String, Vec<String>>, p: &str) -> BTreeMap<String, Vec<String>> {
    m.into_iter().map(|(k, v)| (k.replacen(p, "x", 1), v)).collect()
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
        if [":state", ":meta", ":ver", ":fence"].iter().any(|s| key.ends_with(s)) || key.contains(":fence:") {
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

/// Cases per property: `CALLBOARD_TEST_REPLAY_CASES`, else 256 (the
/// cluster pass of `make test` runs fewer: the same properties, on slots
/// spread over three masters).
fn replay_cases() -> u32 {
    std::env::var("CALLBOARD_TEST_REPLAY_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: replay_cases(), ..ProptestConfig::default() })]

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
            let crash_start = batches(changes.len(), &cuts).get(crash_batch).map_or(changes.len(), |r| r.start);
            let from = ((crash_start as f64) * from_frac) as usize;
            let replay = replayed(&ops, from);
            apply(&writer, &replay, &replay_cuts, None).await;
            apply(&writer, &replay, &replay_cuts, None).await;
            let state_replayed = dump(&redis, &p_b).await;
            prop_assert_eq!(renamed(state_once.clone(), &p_a), renamed(state_replayed, &p_b));

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
            prop_assert_eq!(renamed(state_once, &p_a), renamed(state_snapshot, &p_c));
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
    #![proptest_config(ProptestConfig { cases: replay_cases(), ..ProptestConfig::default() })]

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
            prop_assert_eq!(renamed(dump(&redis, &p_a).await, &p_a), renamed(dump(&redis, &p_w).await, &p_w));
            Ok(())
        })?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: replay_cases(), ..ProptestConfig::default() })]

    /// A warm loaded in chunks between the stream's batches (`warm::Load`):
    /// the load begins at stream position `i`; chunk `k` holds the warming
    /// tenant's documents (each document in one chunk) as they were at a
    /// read position `r_k`, and is put once the stream has applied up to
    /// `a_k`, without the calls the events since `i` touched
    /// (`warm::Touched`). A read may be ahead of the stream or behind it
    /// (the cursor's batch fetched earlier). Whatever the positions, the
    /// result is the state after all events. Putting a chunk whole fails
    /// this: a call read before an event applied ahead of its chunk.
    #[test]
    fn a_snapshot_loaded_in_chunks_between_batches_converges(
        ops in proptest::collection::vec(op(), 1..25),
        cuts in proptest::collection::vec(0..25_usize, 0..5),
        i_frac in 0.0..1.0_f64,
        applied in proptest::collection::vec(0.0..1.0_f64, 1..4),
        read in proptest::collection::vec(0.0..1.0_f64, 4),
        chunk_of in proptest::collection::vec(0..4_usize, 4),
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

            let n = ops.len();
            let i = ((n as f64) * i_frac) as usize;
            let at = |f: f64| i + (((n - i) as f64) * f) as usize;
            let chunks = applied.len();
            let mut a: Vec<usize> = applied.iter().map(|f| at(*f)).collect();
            let mut r: Vec<usize> = read[..chunks].iter().map(|f| at(*f)).collect();
            a.sort();
            r.sort();
            let state_at = |pos: usize| {
                let mut docs: BTreeMap<i64, Option<Document>> = BTreeMap::new();
                for op in &ops[..pos] {
                    docs.insert(doc_of(op), document(op));
                }
                docs
            };
            let warm = Keys::new(&p_w);
            warm_all(&mut conn, &warm).await;
            let writer = Writer::new(redis.clone(), warm);
            apply(&writer, &changes[..i], &cuts, None).await;
            let tenant = TenantId::new(warmed).unwrap();
            writer.purge_tenant_calls(tenant).await.unwrap();
            let mut touched = Touched::default();
            let mut pos = i;
            for k in 0..chunks {
                for c in &changes[pos..a[k]] {
                    let Change::Call { doc, .. } = c else { unreachable!() };
                    touched.touch(doc.clone());
                }
                apply(&writer, &changes[pos..a[k]], &cuts, None).await;
                pos = a[k];
                let entries: Vec<CallEntry> = state_at(r[k])
                    .into_iter()
                    .filter(|(d, _)| chunk_of[(*d - 1) as usize] % chunks == k)
                    .filter_map(|(_, d)| d)
                    .filter_map(|d| CallEntry::from_document(&d))
                    .filter(|e| e.place.tenant == tenant)
                    .collect();
                writer.put_snapshot(tenant, &touched.untouched(entries)).await.unwrap();
            }
            apply(&writer, &changes[pos..], &cuts, None).await;
            prop_assert_eq!(renamed(dump(&redis, &p_a).await, &p_a), renamed(dump(&redis, &p_w).await, &p_w));
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

/// `warm::Load` itself. Each round puts the chunk read in the round before
/// and reads the next one. Whatever the number of documents (none, less
/// than a chunk, an exact multiple, and neither), every call is put once,
/// and the load ends exactly once, one round after the last full chunk (an
/// empty last chunk for an exact multiple). A call touched between two
/// rounds, after its chunk was read ahead and before it was put (an event
/// applied meanwhile), is not put: the filter runs at the put, not at the
/// read.
#[test]
fn a_load_puts_each_chunk_a_round_after_reading_it_without_the_calls_touched_meanwhile() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let redis = connect().await;
        let mut conn = redis.get().await.unwrap();
        let tenant = TenantId::new(1).unwrap();
        let key = |id: i64| callboard_domain::DocKey::from_bson(&Bson::Int64(id));
        for n in [0_i64, 999, 2000, 2500] {
            let prefix = fresh();
            let keys = Keys::new(&prefix);
            warm_all(&mut conn, &keys).await;
            let writer = Writer::new(redis.clone(), keys.clone());
            let docs: Vec<Document> =
                (1..=n).map(|id| doc! {"_id": id, "id": 100 + id, "tenant_id": 1_i64, "status_id": 1_i64}).collect();
            let source = Docs(docs.iter().map(|d| (key(d.get_i64("_id").unwrap()), d.clone())).collect());
            let stream = futures::stream::iter(docs.into_iter().map(Ok::<_, mongodb::error::Error>));
            let mut load = Load::from_source(tenant, stream);
            let mut rounds = 0;
            loop {
                rounds += 1;
                let done = load.next_chunk(&source, &writer).await.unwrap();
                // Round 1 put documents 1 to 1,000 and read 1,001 to 2,000.
                if rounds == 1 {
                    load.touch(key(1500));
                }
                if done {
                    break;
                }
                assert!(rounds <= 3, "{n} documents: no end after {rounds} rounds");
            }
            assert_eq!(rounds, n / 1000 + 1, "{n} documents");
            let skipped = i64::from(n >= 1500);
            assert_eq!(load.calls() as i64, n - skipped, "{n} documents");
            let members: i64 = conn.zcard(keys.zset(tenant, callboard_domain::StatusKey::new(1))).await.unwrap();
            assert_eq!(members, n - skipped, "{n} documents");
            let view = writer.load_locators(&[key(1500), key(n.min(999))], &[], &[], &[]).await.unwrap();
            assert!(!view.call_loc.contains_key(&key(1500)), "{n} documents: the touched call was put");
            assert_eq!(view.call_loc.contains_key(&key(n.min(999))), n > 0, "{n} documents");
        }
    });
}

/// The batches `cuts` makes of `len` changes, as ranges.
fn batches(len: usize, cuts: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut bounds: Vec<usize> = cuts.iter().copied().filter(|c| *c > 0 && *c < len).collect();
    bounds.sort();
    bounds.dedup();
    bounds.push(len);
    let mut start = 0;
    bounds
        .into_iter()
        .filter_map(|end| {
            let r = start..end;
            start = end;
            (!r.is_empty()).then_some(r)
        })
        .collect()
}

/// The calls MongoDB holds at some position of the stream, as a window
/// refill reads them.
struct Docs(std::collections::HashMap<callboard_domain::DocKey, Document>);

impl Docs {
    /// After `ops[..at]`.
    fn at(ops: &[Op], at: usize) -> Self {
        let mut now = std::collections::HashMap::new();
        for op in &ops[..at.min(ops.len())] {
            let key = callboard_domain::DocKey::from_bson(&Bson::Int64(doc_of(op)));
            match document(op) {
                Some(d) => now.insert(key, d),
                None => now.remove(&key),
            };
        }
        Docs(now)
    }
}

impl CallSource for Docs {
    async fn calls(&self, ids: Vec<Bson>) -> Result<Vec<CallEntry>, callboard_projector::ProjectorError> {
        Ok(ids
            .iter()
            .filter_map(|id| self.0.get(&callboard_domain::DocKey::from_bson(id)))
            .filter_map(CallEntry::from_document)
            .collect())
    }
}

/// Plans and applies `changes` batch by batch, and refills the windows
/// each batch leaves short from the documents `source(end)` gives for the
/// batch ending at `end`, as the leader does.
async fn apply_refilling(writer: &Writer, changes: &[Change], cuts: &[usize], source: &dyn Fn(usize) -> Docs) {
    for r in batches(changes.len(), cuts) {
        let needy = writer.apply(&plan_of(writer, &changes[r.clone()]).await).await.unwrap();
        refill_windows(&source(r.end), writer, &needy).await.unwrap();
    }
}

/// Operations crowded onto few places, so that windows of two or three
/// documents fill, overflow and run short.
fn crowded_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1..10_i64, 1..3_i64, 1..3_i64, proptest::option::of(0..4_i64), proptest::bool::weighted(0.15), 1..4_i64)
            .prop_map(|(doc, tenant, status, start, deleted, owner)| Op::Upsert { doc, tenant, status, start, deleted, owner }),
        1 => (1..10_i64).prop_map(|doc| Op::Delete { doc }),
    ]
}

/// `ours` against `snap`, a snapshot of the final documents with the same
/// window: the same ZSETs and everything else; and in each status a window
/// `d` with `min(floor, size) <= d <= window size`, whose documents are
/// exactly the first `d` members', as the snapshot stores them.
async fn assert_windows_exact(redis: &Redis, ours: &str, snap: &str, window: DocWindow) -> Result<(), TestCaseError> {
    let strip = |m: BTreeMap<String, Vec<String>>, p: &str| {
        let mut m = renamed(m, p);
        m.retain(|k, _| !k.ends_with(":doc") && !k.ends_with(":dw"));
        m
    };
    prop_assert_eq!(strip(dump(redis, snap).await, snap), strip(dump(redis, ours).await, ours));
    let mut conn = redis.get().await.unwrap();
    for t in 1..4 {
        let tenant = TenantId::new(t).unwrap();
        let (k_ours, k_snap) = (Keys::new(ours), Keys::new(snap));
        let docs: BTreeMap<Vec<u8>, Vec<u8>> = conn.hgetall(k_ours.docs(tenant)).await.unwrap();
        let snap_docs: BTreeMap<Vec<u8>, Vec<u8>> = conn.hgetall(k_snap.docs(tenant)).await.unwrap();
        let mut expected = BTreeMap::new();
        for s in 1..4 {
            let status = callboard_domain::StatusKey::new(s);
            let members: Vec<Vec<u8>> = conn.zrevrange(k_ours.zset(tenant, status), 0, -1).await.unwrap();
            let d: Option<u64> = conn.hget(k_ours.windows(tenant), status.get()).await.unwrap();
            let d = d.unwrap_or(0);
            let size = members.len() as u64;
            prop_assert!(
                d <= window.size && d >= window.floor.min(size),
                "tenant {} status {}: window {} of {} members",
                t,
                s,
                d,
                size
            );
            for m in &members[..d as usize] {
                expected.insert(m.clone(), snap_docs.get(m).cloned().unwrap_or_default());
            }
        }
        prop_assert_eq!(docs, expected, "tenant {}: documents of exactly the window's members, as of now", t);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: replay_cases(), ..ProptestConfig::default() })]

    /// Document windows of two or three documents, refilled from MongoDB
    /// as it is some batches ahead of the stream (a refill can find a
    /// document moved, and stop there), then a crash and a replay: the
    /// ZSETs are the snapshot's, and every window holds exactly its first
    /// members' current documents, at least `floor` of them.
    #[test]
    fn document_windows_stay_exact_through_refills_crashes_and_replays(
        ops in proptest::collection::vec(crowded_op(), 1..40),
        cuts in proptest::collection::vec(0..40_usize, 0..8),
        replay_cuts in proptest::collection::vec(0..40_usize, 0..5),
        lag in 0..6_usize,
        (size, floor) in prop_oneof![Just((2_u64, 1_u64)), Just((3, 2)), Just((2, 2))],
        crash_batch in 0..9_usize,
        how in crash(),
        from_frac in 0.0..1.0_f64,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let redis = connect().await;
            let mut conn = redis.get().await.unwrap();
            let window = DocWindow { size, floor };
            let changes: Vec<Change> = ops.iter().map(change).collect();
            let (p_a, p_b, p_c) = (fresh(), fresh(), fresh());
            let lagged = |end: usize| Docs::at(&ops, end + lag);

            // Straight through.
            let once = Keys::new(&p_a);
            warm_all(&mut conn, &once).await;
            apply_refilling(&Writer::new(redis.clone(), once).with_window(window), &changes, &cuts, &lagged).await;

            // A snapshot of the final documents.
            let snap = Keys::new(&p_c);
            warm_all(&mut conn, &snap).await;
            let writer = Writer::new(redis.clone(), snap).with_window(window);
            let mut by_tenant: BTreeMap<i64, Vec<CallEntry>> = BTreeMap::new();
            for d in Docs::at(&ops, ops.len()).0.values() {
                if let Some(e) = CallEntry::from_document(d) {
                    by_tenant.entry(e.place.tenant.get()).or_default().push(e);
                }
            }
            for (t, entries) in &by_tenant {
                let needy = writer.put_snapshot(TenantId::new(*t).unwrap(), entries).await.unwrap();
                prop_assert!(needy.is_empty(), "a snapshot of everything fills every window");
            }
            assert_windows_exact(&redis, &p_a, &p_c, window).await?;

            // Crashed in a batch (its refills never ran), then replayed
            // from at or before it, with MongoDB at its final state.
            let crashed = Keys::new(&p_b);
            warm_all(&mut conn, &crashed).await;
            let writer = Writer::new(redis.clone(), crashed).with_window(window);
            let ranges = batches(changes.len(), &cuts);
            let crash_at = crash_batch.min(ranges.len() - 1);
            apply_refilling(&writer, &changes[..ranges[crash_at].start], &cuts, &lagged).await;
            writer.apply(&partial(plan_of(&writer, &changes[ranges[crash_at].clone()]).await, how)).await.unwrap();
            let from = ((ranges[crash_at].start as f64) * from_frac) as usize;
            let replay = replayed(&ops, from);
            let now = |_: usize| Docs::at(&ops, ops.len());
            apply_refilling(&writer, &replay, &replay_cuts, &now).await;
            assert_windows_exact(&redis, &p_b, &p_c, window).await?;
            Ok(())
        })?;
    }
}

/// What of `p` a crash at `how` lets run.
fn partial(p: Plan, how: Crash) -> Plan {
    let mut partial = Plan { intents: p.intents, ..Plan::default() };
    match how {
        Crash::AfterIntents => {}
        Crash::AfterTenants(k) => partial.tenants = p.tenants.into_iter().take(k).collect(),
        Crash::BeforeShared => partial.tenants = p.tenants,
    }
    partial
}

/// What of `p` is left after a freeze at `how`: the rest of the tenants,
/// and the shared keys.
fn rest(p: Plan, how: Crash) -> Plan {
    let done = match how {
        Crash::AfterIntents => 0,
        Crash::AfterTenants(k) => k,
        Crash::BeforeShared => p.tenants.len(),
    };
    Plan { intents: Vec::new(), tenants: p.tenants.into_iter().skip(done).collect(), global: p.global }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: replay_cases(), ..ProptestConfig::default() })]

    /// A leader freezes inside a batch; its lease passes to a successor,
    /// which raises its fences, replays from the checkpoint (at or before
    /// that batch) and applies some or all of its batches; the old leader
    /// then wakes up and goes on writing, the rest of its batch and maybe
    /// the next ones, until a fence stops it; then the successor finishes.
    /// The end state is exactly the state of one uninterrupted run:
    /// whatever the stale leader still managed to write, it wrote nothing
    /// the successor had moved past.
    #[test]
    fn a_stale_leader_cannot_write_over_its_successor(
        ops in proptest::collection::vec(op(), 1..25),
        cuts in proptest::collection::vec(0..25_usize, 0..5),
        replay_cuts in proptest::collection::vec(0..25_usize, 0..5),
        freeze_batch in 0..6_usize,
        how in crash(),
        from_frac in 0.0..1.0_f64,
        successor_first in 0..6_usize,
        stale_batches in 0..3_usize,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let redis = connect().await;
            let mut conn = redis.get().await.unwrap();
            let changes: Vec<Change> = ops.iter().map(change).collect();
            let (p_a, p_b) = (fresh(), fresh());
            let once = Keys::new(&p_a);
            warm_all(&mut conn, &once).await;
            apply(&Writer::new(redis.clone(), once), &changes, &cuts, None).await;

            let keys = Keys::new(&p_b);
            warm_all(&mut conn, &keys).await;
            let _: () = conn.set(keys.lease(), "old").await.unwrap();
            let old = Writer::guarded(redis.clone(), keys.clone(), Guard::Leader { token: 1, owner: "old".into() });
            let ranges = batches(changes.len(), &cuts);
            let frozen = freeze_batch.min(ranges.len() - 1);
            apply(&old, &changes[..ranges[frozen].start], &cuts, None).await;
            let frozen_plan = plan_of(&old, &changes[ranges[frozen].clone()]).await;
            old.apply(&partial(frozen_plan.clone(), how)).await.unwrap();

            // The lease passes; the successor fences every shard first.
            let _: () = conn.set(keys.lease(), "new").await.unwrap();
            let new = Writer::guarded(redis.clone(), keys.clone(), Guard::Leader { token: 2, owner: "new".into() });
            new.claim_shards().await.unwrap();
            let from = ((ranges[frozen].start as f64) * from_frac) as usize;
            let replay = replayed(&ops, from);
            let replay_ranges = batches(replay.len(), &replay_cuts);
            let split = successor_first.min(replay_ranges.len());
            let cut_at = replay_ranges.get(split).map_or(replay.len(), |r| r.start);
            apply(&new, &replay[..cut_at], &replay_cuts, None).await;

            // The old leader wakes up: the rest of its batch, then up to
            // `stale_batches` batches after it, until a fence stops it. (A
            // real one checks its lease before each batch; this one
            // relies on the fences alone.)
            let mut later = ranges.iter().skip(frozen + 1).take(stale_batches);
            let mut next = Some(rest(frozen_plan, how));
            while let Some(p) = next.take() {
                match old.apply(&p).await {
                    Ok(_) => {}
                    Err(callboard_readmodel::ReadModelError::Fenced) => break,
                    Err(e) => panic!("the stale leader's write failed otherwise: {e}"),
                }
                if let Some(r) = later.next() {
                    next = Some(plan_of(&old, &changes[r.clone()]).await);
                }
            }
            apply(&new, &replay[cut_at..], &replay_cuts, None).await;
            // The lease is this test's, not state.
            let _: () = conn.del(keys.lease()).await.unwrap();
            prop_assert_eq!(renamed(dump(&redis, &p_a).await, &p_a), renamed(dump(&redis, &p_b).await, &p_b));
            Ok(())
        })?;
    }
}
