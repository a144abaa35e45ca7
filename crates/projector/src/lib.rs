//! The projector: follows MongoDB change streams on `calls`, `users` and
//! `call_status` and keeps the Redis read model current.
//!
//! source ([`source`]: change stream, resume token) -> transform
//! ([`transform`]: pure, event + state -> operations) -> sink
//! (`callboard_readmodel::write`: one atomic write per tenant per batch),
//! with [`checkpoint`], [`warm`] and [`lease`] around them.
//!
//! Tenants are spread over `partitions` by a stable hash. Every partition
//! has a lease, a checkpoint, a change stream and locators of its own;
//! only the process holding a partition's lease writes for it. Processes
//! register as members and share the partitions out between them
//! ([`Projector::run`]); `leader` is one partition's loop.

pub mod checkpoint;
pub mod history;
mod leader;
pub mod lease;
pub mod source;
pub mod transform;
pub mod verifier;
pub mod warm;
pub mod watermark;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use callboard_domain::render::UserFields;
use callboard_readmodel::keys::Partitioning;
use callboard_readmodel::write::{DocWindow, Guard, Writer};
use callboard_readmodel::{Keys, ReadModelError, Redis};
use mongodb::Database;
use redis::AsyncCommands;
use tracing::{info, warn};

use checkpoint::Checkpoint;
use lease::Lease;

#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    #[error("MongoDB: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error(transparent)]
    ReadModel(ReadModelError),
    #[error("lost the lease to another projector")]
    LeaseLost,
    #[error("Redis holds an older checkpoint than this projector saved (restored from an older state)")]
    StateRegressed,
    #[error("a Redis master holds less than the last checkpoint says was written")]
    MasterBehind,
}

impl From<ReadModelError> for ProjectorError {
    fn from(e: ReadModelError) -> Self {
        match e {
            ReadModelError::Fenced => ProjectorError::LeaseLost,
            other => ProjectorError::ReadModel(other),
        }
    }
}

impl From<redis::RedisError> for ProjectorError {
    fn from(e: redis::RedisError) -> Self {
        ProjectorError::ReadModel(e.into())
    }
}

#[derive(Debug, Clone)]
pub struct ProjectorConfig {
    /// Events per batch at most.
    pub batch_max: usize,
    /// How long to wait for a batch's first event.
    pub batch_wait: Duration,
    pub lease_ttl: Duration,
    /// How often an idle stream's position is checkpointed.
    pub idle_checkpoint: Duration,
    /// How many first calls of each status keep their documents in Redis.
    pub doc_window: DocWindow,
    /// Projector partitions: every process must be given the same count.
    pub partitions: u32,
    /// Where partition 0's leader writes watermarks ([`watermark`]); none:
    /// answers' `as_of` comes from the stream alone.
    pub watermark_collection: Option<String>,
    pub watermark_interval: Duration,
    /// Warn when the oldest checkpoint's age passes this share of
    /// MongoDB's history window ([`history`]).
    pub history_warn_share: f64,
    /// The background verifier ([`verifier`]); none: not run.
    pub reconcile: Option<verifier::ReconcileConfig>,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            batch_max: 1000,
            batch_wait: Duration::from_millis(200),
            lease_ttl: Duration::from_secs(6),
            idle_checkpoint: Duration::from_secs(10),
            doc_window: DocWindow::default(),
            partitions: 1,
            watermark_collection: Some("callboard_watermarks".into()),
            watermark_interval: Duration::from_millis(100),
            history_warn_share: 0.5,
            reconcile: None,
        }
    }
}

pub struct Projector {
    db: Database,
    redis: Redis,
    keys: Keys,
    reader: callboard_readmodel::ReadModel,
    fields: UserFields,
    config: ProjectorConfig,
    id: String,
    /// Set at shutdown: leaders stop after the batch they are on.
    stopping: std::sync::atomic::AtomicBool,
    /// When this process last quarantined tenants (the breaker).
    quarantines: std::sync::Mutex<std::collections::VecDeque<std::time::Instant>>,
    /// The background verifier's query budget, shared by the partitions.
    reconcile_pace: Arc<verifier::Pace>,
}

/// At most this many quarantines per [`QUARANTINE_WINDOW`] in a process:
/// past it Redis is taken to reject writes in general, and partitions
/// retry from their checkpoints rather than quarantine every tenant.
const MAX_QUARANTINES: usize = 5;
const QUARANTINE_WINDOW: Duration = Duration::from_secs(60);

/// A process's share of the partitions. It holds at most `ceil` (the
/// partitions over the live members, rounded up) and takes free ones up to
/// that; it gives one up when it holds more, or when it holds more than
/// `floor` and is the member holding most while another holds fewer than
/// `floor` (`give_up`). So a leader is not displaced by a newcomer that
/// would only hold as many, and the partitions end within one of even.
struct Share {
    floor: usize,
    ceil: usize,
    /// Partitions no one leads.
    free: Vec<u32>,
    give_up: bool,
}

/// How recently a member must have renewed its membership to count.
const MEMBER_WINDOW: Duration = Duration::from_secs(3);

/// A partition this process leads: the task that leads it.
struct Owned {
    task: tokio::task::JoinHandle<()>,
}

impl Projector {
    pub fn new(db: Database, redis: Redis, keys: Keys, fields: UserFields, config: ProjectorConfig) -> Self {
        let id = format!("{}-{}-{:08x}", hostname(), std::process::id(), rand::random::<u32>());
        Self {
            reader: callboard_readmodel::ReadModel::new(redis.clone(), keys.clone()),
            db,
            redis,
            keys,
            fields,
            id,
            stopping: Default::default(),
            quarantines: Default::default(),
            reconcile_pace: Arc::new(verifier::Pace::new(
                config.reconcile.as_ref().map_or(1.0, |r| r.max_queries_per_s),
            )),
            config,
        }
    }

    /// Whether one more quarantine is allowed now (and counts it if so).
    pub(crate) fn may_quarantine(&self) -> bool {
        let mut recent = self.quarantines.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        while recent.front().is_some_and(|t| now.duration_since(*t) > QUARANTINE_WINDOW) {
            recent.pop_front();
        }
        if recent.len() >= MAX_QUARANTINES {
            return false;
        }
        recent.push_back(now);
        true
    }

    /// Whether the process is shutting down ([`Projector::run`]).
    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn partitioning(&self) -> Partitioning {
        Partitioning::new(self.config.partitions)
    }

    /// Runs until `shutdown` completes. Every half second the process
    /// renews its membership, works out its share of the partitions
    /// ([`Share`]), gives up a partition above it and takes free ones below
    /// it. A partition it leads runs in a task of its own until its
    /// lease is lost or it fails.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ProjectorError> {
        tokio::pin!(shutdown);
        let this = Arc::new(self);
        let partitions = this.partitioning().count();
        info!(projector = %this.id, partitions, "projector started");
        let mut owned: BTreeMap<u32, Owned> = BTreeMap::new();
        // Start the search for free partitions at a place of our own, so
        // that processes starting together do not all race for the same.
        let offset = rand::random::<u32>() % partitions;
        // Free partitions, by how many rounds in a row they were seen free.
        let mut stale: BTreeMap<u32, u32> = BTreeMap::new();
        loop {
            owned.retain(|p, o| {
                let alive = !o.task.is_finished();
                if !alive {
                    info!(partition = p, "partition no longer led here");
                }
                alive
            });
            match this.share().await {
                Ok(Share { floor, ceil, free, give_up }) => {
                    // A partition nobody takes for a few rounds (its share
                    // fell to a member that has just gone) is taken by
                    // whoever sees it, above its share if need be.
                    stale.retain(|p, _| free.contains(p));
                    for p in &free {
                        *stale.entry(*p).or_insert(0) += 1;
                    }
                    if owned.len() > ceil || (owned.len() > floor && give_up) {
                        if let Some((&p, _)) = owned.iter().next_back() {
                            let o = owned.remove(&p).expect("just seen");
                            o.task.abort();
                            let _ = o.task.await;
                            let _ = this.lease(p).release().await;
                            info!(partition = p, floor, ceil, "partition given up for another member");
                        }
                    }
                    for i in 0..partitions {
                        let p = (offset + i) % partitions;
                        let orphaned = stale.get(&p).is_some_and(|rounds| *rounds >= 3);
                        if owned.contains_key(&p) || (owned.len() >= ceil && !orphaned) {
                            continue;
                        }
                        let mut lease = this.lease(p);
                        match lease.acquire().await {
                            Ok(true) => {
                                info!(partition = p, "lease acquired; leading");
                                let me = this.clone();
                                owned.insert(p, Owned { task: tokio::spawn(async move { me.lead(p, lease).await }) });
                            }
                            Ok(false) => {}
                            Err(e) => warn!(error = %e, "cannot reach Redis for a lease"),
                        }
                    }
                }
                Err(e) => warn!(error = %e, "cannot reach Redis for the membership"),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = &mut shutdown => break,
            }
        }
        // Each leader finishes the batch it is on, checkpoints it and
        // returns; the lease is then released, so that a standby takes the
        // partition at its next round (half a second) rather than after the
        // lease's TTL. A leader still busy after a lease's time (a long
        // snapshot) is abandoned: its warm is resumed by the next leader.
        this.stopping.store(true, std::sync::atomic::Ordering::Relaxed);
        // Out of the membership first, so that the others' shares count
        // without this process by the time its partitions come free.
        if let Ok(mut c) = this.redis.get().await {
            let _: Result<i64, _> = c.zrem(this.keys.members(), &this.id).await;
        }
        let deadline = tokio::time::Instant::now() + this.config.lease_ttl;
        for (p, mut o) in owned {
            if tokio::time::timeout_at(deadline, &mut o.task).await.is_err() {
                warn!(partition = p, "leader still busy at shutdown: abandoning its batch");
                o.task.abort();
                let _ = o.task.await;
            }
            match this.lease(p).release().await {
                Ok(_) => info!(partition = p, "lease released"),
                Err(e) => warn!(partition = p, error = %e, "cannot release the lease; it expires on its own"),
            }
        }
        info!("projector stopped");
        Ok(())
    }

    fn lease(&self, partition: u32) -> Lease {
        Lease::new(self.redis.clone(), &self.keys.in_partition(partition), self.id.clone(), self.config.lease_ttl)
    }

    /// Renews this process's membership and works out its share (see
    /// [`Share`]). A member is live while it renewed within
    /// [`MEMBER_WINDOW`] (six rounds): a process that died or froze stops
    /// counting long before its leases expire, so no share is kept for it.
    async fn share(&self) -> Result<Share, ProjectorError> {
        let now = checkpoint::now_ms();
        let ttl = MEMBER_WINDOW.as_millis() as i64;
        let mut c = self.redis.get().await?;
        let (members,): (Vec<String>,) = callboard_readmodel::conn::transaction(
            &mut c,
            redis::pipe()
                .atomic()
                .zadd(self.keys.members(), &self.id, now)
                .ignore()
                .zrembyscore(self.keys.members(), "-inf", now - ttl)
                .ignore()
                .zrangebyscore(self.keys.members(), now - ttl, "+inf"),
            &self.keys.members(),
        )
        .await?;
        let (n, p) = (members.len().max(1), self.partitioning().count() as usize);
        let mut leases = redis::pipe();
        for partition in 0..p as u32 {
            leases.get(self.keys.in_partition(partition).lease());
        }
        let owners: Vec<Option<String>> =
            callboard_readmodel::conn::transaction(&mut c, &leases, &self.keys.members()).await?;
        let free = owners.iter().enumerate().filter(|(_, o)| o.is_none()).map(|(i, _)| i as u32).collect();
        let held = |m: &str| owners.iter().filter(|o| o.as_deref() == Some(m)).count();
        let (floor, ceil) = (p / n, p.div_ceil(n));
        let starved = members.iter().any(|m| held(m) < floor);
        let richest = members.iter().max_by_key(|m| (held(m), m.as_str())).is_some_and(|m| *m == self.id);
        Ok(Share { floor, ceil, free, give_up: starved && richest })
    }

    /// Leads `partition` while `lease` holds, logging why it stopped.
    async fn lead(self: Arc<Self>, partition: u32, mut lease: Lease) {
        let outcome = self.lead_partition(partition, &mut lease).await;
        match outcome {
            Ok(()) => {}
            Err(ProjectorError::LeaseLost) => warn!(partition, "lease lost; standing by"),
            Err(e) => {
                warn!(partition, error = %e, "projector failed; retrying");
                let _ = lease.release().await;
            }
        }
    }

    async fn lead_partition(&self, partition: u32, lease: &mut Lease) -> Result<(), ProjectorError> {
        let (keeper, renewer) = lease.keep_alive();
        // The renewer stops with this leadership, however it ends (a task
        // aborted when the partition is given up drops this future).
        let _renewer = AbortOnDrop(renewer);
        let token: u64 = {
            let mut c = self.redis.get().await?;
            c.incr(self.keys.fence_seq(), 1).await?
        };
        // Every write of this leadership is fenced by `token` (tenants and
        // locator shards) and the partition's lease (the shared `{g}` keys).
        let writer =
            Writer::guarded(self.redis.clone(), self.keys.clone(), Guard::Leader { token, owner: lease.id.clone() })
                .with_window(self.config.doc_window)
                .for_partition(partition, self.partitioning());
        let leader = leader::Leader {
            p: self,
            scope: writer.scope(),
            checkpoint: Checkpoint::new(self.redis.clone(), self.keys.in_partition(partition)),
            writer,
            keeper,
            owner: lease.id.clone(),
            token,
            batches: Default::default(),
            saved: Default::default(),
            marker_tags: Default::default(),
        };
        // Partition 0's leader marks the stream for every partition (each
        // reads all of it); the marks stop with the leadership.
        let _marks = match (&self.config.watermark_collection, Partitioning::owns_globals(partition)) {
            (Some(collection), true) => Some(AbortOnDrop(tokio::spawn(watermark::write_marks(
                self.db.clone(),
                collection.clone(),
                self.config.watermark_interval,
            )))),
            _ => None,
        };
        // ...and watches how much history MongoDB keeps.
        let _history = Partitioning::owns_globals(partition).then(|| {
            AbortOnDrop(tokio::spawn(history::watch(
                self.db.client().clone(),
                self.redis.clone(),
                self.reader.clone(),
                self.keys.clone(),
                self.config.partitions,
                self.config.history_warn_share,
            )))
        });
        // ...and each leader verifies its tenants against MongoDB.
        let _verifier = self.config.reconcile.clone().map(|config| {
            AbortOnDrop(tokio::spawn(verifier::run(
                self.reader.clone().with_user_fields(self.fields.clone()),
                callboard_store::LiveQuery::new(self.db.clone(), self.fields.clone()),
                self.partitioning(),
                partition,
                config,
                self.reconcile_pace.clone(),
            )))
        });
        let span = tracing::info_span!("partition", partition);
        tracing::Instrument::instrument(leader.run(), span).await
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "host".into())
}
