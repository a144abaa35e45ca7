//! The projector's own throughput, with no MongoDB in the way: synthetic
//! change events (the seed's documents, as `ChangeStreamEvent`s) through
//! the transform (`change_of`, `needs`, `plan`) and the Redis apply
//! (`load_locators`, `apply`), in batches of `projector.batch_max`; and a
//! warm: the projector's own `warm::Load` over the snapshot's documents
//! from memory (each chunk decoded with `CallEntry::from_document` and put
//! with `put_snapshot` while the next is decoded; its final refill reads
//! the same documents). One real redis-server, started here. Each kind is
//! timed alone.
//!
//! Left out, because they need MongoDB: the document windows' refills
//! after deletes and moves out of a window (`apply` returns the statuses
//! that need one; counted here, not run).

use std::time::Instant;

use anyhow::Context;
use bson::{doc, Bson, DateTime, Document};
use callboard_domain::render::UserFields;
use callboard_domain::{DocKey, TenantId};
use callboard_projector::transform::{self, Change};
use callboard_projector::warm::{CallSource, Load};
use callboard_projector::ProjectorError;
use callboard_readmodel::codec::CallEntry;
use callboard_readmodel::write::Writer;
use callboard_readmodel::{Keys, Redis, TenantState};
use callboard_store::seed::SeedPlan;
use callboard_store::{CALLS, USERS};
use mongodb::change_stream::event::ChangeStreamEvent;

/// The projector's default batch (`projector.batch_max`).
pub const BATCH: usize = 1000;
/// The snapshot's documents by `_id`: where the warm's final refill reads
/// the calls it puts back.
struct Snapshot<'a>(std::collections::HashMap<DocKey, &'a Document>);

impl CallSource for Snapshot<'_> {
    async fn calls(&self, ids: Vec<Bson>) -> Result<Vec<CallEntry>, ProjectorError> {
        Ok(ids
            .iter()
            .filter_map(|id| self.0.get(&DocKey::from_bson(id)))
            .filter_map(|d| CallEntry::from_document(d))
            .collect())
    }
}

#[derive(Debug, Clone)]
pub struct PipelineResult {
    pub kind: String,
    pub events: u64,
    pub secs: f64,
    /// Distinct statuses whose document window an apply left short (a
    /// refill from MongoDB would follow, not run here; the warm's final
    /// refill is run, from the documents in memory).
    pub refills: u64,
    /// Where the time went, for the kinds run as change events.
    pub stages: Option<Stages>,
    /// Redis's CPU seconds in that time ([`redis_cpu`]).
    pub redis_secs: f64,
}

/// Seconds in each stage of a batch, summed over a kind's batches.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stages {
    /// `change_of` and `needs`: decoding the events.
    pub decode: f64,
    /// `load_locators`: one round trip of locator reads.
    pub load: f64,
    /// `plan`.
    pub plan: f64,
    /// `apply`: the scripts built and run (intents, tenants, then the rest).
    pub apply: f64,
}

/// Redis's CPU seconds so far (`INFO cpu`: user and system, all its
/// threads; with no persistence nearly all of it the command thread's).
/// Taken before and after a kind: how much of its time Redis was busy,
/// against the rest (the bench's own work and the loopback between).
pub async fn redis_cpu(redis: &Redis) -> anyhow::Result<f64> {
    let mut c = redis.get().await?;
    let info: String = redis::cmd("INFO").arg("cpu").query_async(&mut c).await?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':')))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .with_context(|| format!("INFO cpu has no {name}"))
    };
    Ok(field("used_cpu_user")? + field("used_cpu_sys")?)
}

impl PipelineResult {
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.secs.max(1e-9)
    }

    /// The share of the kind's time Redis was busy.
    pub fn redis_share(&self) -> f64 {
        self.redis_secs / self.secs.max(1e-9)
    }
}

fn event(op: &str, coll: &str, id: i64, full: Option<Document>) -> anyhow::Result<ChangeStreamEvent<Document>> {
    let mut e = doc! {
        "_id": {"_data": format!("{id:016x}")},
        "operationType": op,
        "ns": {"db": "crm", "coll": coll},
        "documentKey": {"_id": id},
    };
    if let Some(full) = full {
        e.insert("fullDocument", full);
    }
    Ok(bson::from_document(e)?)
}

/// Calls owned by user 1 at the head of each [`calls`] list (a rename's
/// fan-out; the seed gives it about 1% of the others too).
const USER_1_CALLS: usize = 10_000;

/// The seed's calls `1..=n`, all in `tenant`, each with `_id` = its id;
/// user 1 owns the first [`USER_1_CALLS`].
fn calls(n: u64, tenant: i64) -> Vec<Document> {
    let plan = SeedPlan { tenants: 1, calls: n, users: 100, statuses: 5, seed: 7 };
    (0..plan.batches())
        .flat_map(|b| plan.call_documents(b))
        .enumerate()
        .map(|(i, mut d)| {
            let id = d.get_i64("id").unwrap_or(0);
            d.insert("_id", id);
            d.insert("tenant_id", tenant);
            if i < USER_1_CALLS {
                d.insert("owner_id", 1_i64);
            }
            d
        })
        .collect()
}

/// Runs `events` through the transform and the apply, a batch at a time.
async fn project(
    writer: &Writer,
    redis: &Redis,
    kind: &str,
    events: &[ChangeStreamEvent<Document>],
) -> anyhow::Result<PipelineResult> {
    let fields = UserFields::default();
    let cpu = redis_cpu(redis).await?;
    let started = Instant::now();
    let mut short = std::collections::HashSet::new();
    let mut stages = Stages::default();
    for batch in events.chunks(BATCH) {
        let at = Instant::now();
        let changes: Vec<Change> = batch.iter().filter_map(|e| transform::change_of(e, &fields)).collect();
        let needs = transform::needs(&changes);
        let decoded = Instant::now();
        let view = writer.load_locators(&needs.calls, &needs.users, &needs.statuses, &needs.tenants).await?;
        let loaded = Instant::now();
        let plan = transform::plan(&changes, &view, 0);
        let planned = Instant::now();
        short.extend(writer.apply(&plan).await?);
        stages.decode += (decoded - at).as_secs_f64();
        stages.load += (loaded - decoded).as_secs_f64();
        stages.plan += (planned - loaded).as_secs_f64();
        stages.apply += planned.elapsed().as_secs_f64();
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(PipelineResult {
        kind: kind.to_string(),
        events: events.len() as u64,
        secs,
        refills: short.len() as u64,
        stages: Some(stages),
        redis_secs: redis_cpu(redis).await? - cpu,
    })
}

/// One run's figures.
pub struct PipelineRun {
    pub results: Vec<PipelineResult>,
    /// Calls the warm loaded, and what Redis held by key type right after it.
    pub warm_calls: u64,
    pub warm_costs: Vec<crate::memory::KeyCost>,
}

/// Every figure, on a fresh Redis: a warm of `calls` calls, then `events`
/// events of each kind against it.
pub async fn run(calls_n: u64, events_n: u64) -> anyhow::Result<PipelineRun> {
    let dir = tempfile_dir()?;
    let server = callboard_testkit::RedisServer::start(&dir).context("start redis-server")?;
    let redis = Redis::single_url(&server.url(), 4)?;
    let keys = Keys::new("cb");
    let writer = Writer::new(redis.clone(), keys.clone());
    let (t1, t2) = (TenantId::new(1)?, TenantId::new(2)?);
    let mut c = redis.get().await?;
    for t in [t1, t2] {
        let _: () = redis::AsyncCommands::set(&mut c, keys.state(t), TenantState::encode_warm(1)).await?;
    }
    let mut out = Vec::new();

    // A warm's snapshot load, timed from documents in memory (owned, as a
    // cursor yields them, and made before the clock starts).
    let docs = calls(calls_n, 1);
    let snapshot = Snapshot(docs.iter().filter_map(|d| d.get("_id").map(|id| (DocKey::from_bson(id), d))).collect());
    let source = futures::stream::iter(docs.clone().into_iter().map(Ok::<_, mongodb::error::Error>));
    let cpu = redis_cpu(&redis).await?;
    let started = Instant::now();
    let mut load = Load::from_source(t1, source);
    while !load.next_chunk(&snapshot, &writer).await? {}
    out.push(PipelineResult {
        kind: "warm: snapshot chunks (calls)".into(),
        events: docs.len() as u64,
        secs: started.elapsed().as_secs_f64(),
        refills: load.short_windows() as u64,
        stages: None,
        redis_secs: redis_cpu(&redis).await? - cpu,
    });
    let warm_costs = crate::memory::key_costs(&[server.url()], &keys).await?;

    let n = events_n.min(calls_n) as usize;
    let newest = 1_900_000_000_000_i64;
    // Inserts: new calls, newest first in their statuses.
    let inserted = calls(n as u64, 1);
    let inserts: Vec<_> = inserted
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, mut d)| {
            let id = 10_000_000 + i as i64;
            d.insert("_id", id);
            d.insert("id", id);
            d.insert("start_time", DateTime::from_millis(newest + i as i64));
            event("insert", CALLS, id, Some(d))
        })
        .collect::<Result<_, _>>()?;
    out.push(project(&writer, &redis, "inserts", &inserts).await?);
    // Status moves of warm calls (update events carry the full document).
    let moved: Vec<_> = docs
        .iter()
        .take(n)
        .map(|d| {
            let mut d = d.clone();
            let next = match d.get("status_id") {
                Some(Bson::Int64(s)) => s % 5 + 1,
                Some(Bson::String(s)) => s.parse::<i64>().unwrap_or(0) % 5 + 1,
                _ => 1,
            };
            d.insert("status_id", next);
            let id = d.get_i64("_id").unwrap_or(0);
            event("update", CALLS, id, Some(d))
        })
        .collect::<Result<_, _>>()?;
    out.push(project(&writer, &redis, "status moves", &moved).await?);
    // Moves to another warm tenant.
    let to_tenant_2: Vec<_> = docs
        .iter()
        .skip(n)
        .take(n)
        .map(|d| {
            let mut d = d.clone();
            d.insert("tenant_id", 2_i64);
            event("update", CALLS, d.get_i64("_id").unwrap_or(0), Some(d))
        })
        .collect::<Result<_, _>>()?;
    out.push(project(&writer, &redis, "tenant moves", &to_tenant_2).await?);
    // Deletes (the event carries only the `_id`).
    let deletes: Vec<_> = docs
        .iter()
        .skip(2 * n)
        .take(n)
        .map(|d| event("delete", CALLS, d.get_i64("_id").unwrap_or(0), None))
        .collect::<Result<_, _>>()?;
    out.push(project(&writer, &redis, "deletes", &deletes).await?);
    // User renames: a user is stored once and spliced in at read time, so
    // a rename writes one hash field and one stamp, whatever the number of
    // calls it shows on. One rename of user 1 alone (the owner of the
    // first USER_1_CALLS of the warm's calls and of the inserts, none of
    // them deleted above), then updates of distinct users (in one batch,
    // renames of one user fold into one write).
    let deleted = 2 * n..3 * n;
    let by_1 = |d: &Document| d.get_i64("owner_id").ok() == Some(1);
    let owned = docs.iter().enumerate().filter(|(i, d)| !deleted.contains(i) && by_1(d)).count()
        + inserted.iter().filter(|d| by_1(d)).count();
    let one = [event("update", USERS, 1, Some(doc! {"_id": 1_i64, "id": 1_i64, "name": "Renamed"}))?];
    out.push(project(&writer, &redis, &format!("one rename of user 1 (owns {owned} calls)"), &one).await?);
    let renames: Vec<_> = (1..=n as i64)
        .map(|u| event("update", USERS, u, Some(doc! {"_id": u, "id": u, "name": format!("Renamed {u}")})))
        .collect::<Result<_, _>>()?;
    out.push(
        project(&writer, &redis, &format!("user updates ({n} distinct users, the seed's 100 and new ones)"), &renames)
            .await?,
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(PipelineRun { results: out, warm_calls: docs.len() as u64, warm_costs })
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("cb-pipeline-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
