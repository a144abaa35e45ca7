//! The projector: follows MongoDB change streams on `calls`, `users` and
//! `call_status` and keeps the Redis read model current.
//!
//! source ([`source`]: change stream, resume token) -> transform
//! ([`transform`]: pure, event + state -> operations) -> sink
//! (`callboard_readmodel::write`: one atomic write per tenant per batch),
//! with [`checkpoint`], [`warm`] and [`lease`] around them. Only the
//! projector holding the lease writes; the others wait to take over.

pub mod checkpoint;
pub mod lease;
pub mod source;
pub mod transform;
pub mod warm;

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use callboard_domain::render::UserFields;
use callboard_domain::TenantId;
use callboard_readmodel::write::{DocWindow, Guard, Writer};
use callboard_readmodel::{Command, Keys, ReadModelError, Redis, TenantState};
use mongodb::Database;
use redis::AsyncCommands;
use tracing::{info, info_span, warn, Instrument};

use checkpoint::{now_ms, BatchStats, Checkpoint};
use lease::{Keeper, Lease};
use source::{Source, StartAt};
use transform::Change;

#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    #[error("MongoDB: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error(transparent)]
    ReadModel(ReadModelError),
    #[error("lost the lease to another projector")]
    LeaseLost,
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
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            batch_max: 1000,
            batch_wait: Duration::from_millis(200),
            lease_ttl: Duration::from_secs(6),
            idle_checkpoint: Duration::from_secs(10),
            doc_window: DocWindow::default(),
        }
    }
}

pub struct Projector {
    db: Database,
    redis: Redis,
    keys: Keys,
    reader: callboard_readmodel::ReadModel,
    checkpoint: Checkpoint,
    fields: UserFields,
    config: ProjectorConfig,
    id: String,
}

/// A warm whose snapshot is loaded, waiting for the stream to catch up.
struct PendingWarm {
    epoch: u64,
    job: Option<String>,
    /// When the snapshot read ended (ms): events committed after it were
    /// not in it.
    snapshot_done_ms: i64,
}

impl Projector {
    pub fn new(db: Database, redis: Redis, keys: Keys, fields: UserFields, config: ProjectorConfig) -> Self {
        let id = format!("{}-{}-{:08x}", hostname(), std::process::id(), rand::random::<u32>());
        Self {
            checkpoint: Checkpoint::new(redis.clone(), keys.clone()),
            reader: callboard_readmodel::ReadModel::new(redis.clone(), keys.clone()),
            db,
            redis,
            keys,
            fields,
            config,
            id,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Runs until `shutdown` completes: waits for the lease, leads while it
    /// holds it, and goes back to waiting if it loses it or fails.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ProjectorError> {
        tokio::pin!(shutdown);
        let mut lease = Lease::new(self.redis.clone(), &self.keys, self.id.clone(), self.config.lease_ttl);
        info!(projector = %self.id, "projector started; waiting for the lease");
        loop {
            match lease.acquire().await {
                Ok(true) => {
                    info!(projector = %self.id, "lease acquired; leading");
                    let outcome = tokio::select! {
                        r = self.lead(&mut lease) => r,
                        _ = &mut shutdown => {
                            // The batch in flight is dropped before its
                            // checkpoint; the next leader replays it.
                            let _ = lease.release().await;
                            info!("projector stopped");
                            return Ok(());
                        }
                    };
                    match outcome {
                        Ok(()) => {}
                        Err(ProjectorError::LeaseLost) => warn!("lease lost; standing by"),
                        Err(e) => {
                            warn!(error = %e, "projector failed; retrying");
                            let _ = lease.release().await;
                        }
                    }
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "cannot reach Redis for the lease"),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = &mut shutdown => { info!("projector stopped"); return Ok(()); }
            }
        }
    }

    /// Leads: opens the stream at the checkpoint (bootstrapping when there
    /// is none, or when MongoDB no longer has it) and applies batches.
    async fn lead(&self, lease: &mut Lease) -> Result<(), ProjectorError> {
        let (keeper, renewer) = lease.keep_alive();
        let token: u64 = {
            let mut c = self.redis.get().await?;
            c.incr(self.keys.fence_seq(), 1).await?
        };
        // Every write of this leadership is fenced by `token` (tenants and
        // locator shards) and the lease (the shared `{g}` keys).
        let writer =
            Writer::guarded(self.redis.clone(), self.keys.clone(), Guard::Leader { token, owner: lease.id.clone() })
                .with_window(self.config.doc_window);
        let result = self.lead_with(&keeper, &lease.id, &writer).await;
        renewer.abort();
        result
    }

    async fn lead_with(&self, keeper: &Keeper, owner: &str, writer: &Writer) -> Result<(), ProjectorError> {
        let mut source = self.open_source(owner, writer).await?;
        let mut pending: HashMap<TenantId, PendingWarm> = HashMap::new();
        self.resume_warms(&mut pending, keeper, writer).await?;
        let mut last_resume = Instant::now();
        let mut last_beat = Instant::now();
        let mut last_idle_checkpoint = Instant::now();
        loop {
            if !keeper.is_safe() {
                return Err(ProjectorError::LeaseLost);
            }
            if last_beat.elapsed() >= Duration::from_secs(1) {
                self.checkpoint.heartbeat(&[]).await?;
                last_beat = Instant::now();
            }
            if last_resume.elapsed() >= Duration::from_secs(5) {
                // Warms whose command a fenced-out leader took and lost.
                self.resume_warms(&mut pending, keeper, writer).await?;
                last_resume = Instant::now();
            }
            self.run_commands(&mut pending, keeper, writer).await?;
            let events = match source.next_batch(self.config.batch_max, self.config.batch_wait).await {
                Ok(events) => events,
                Err(e) if source::is_history_lost(&e) => {
                    source = self.recover_history_lost(&e, owner, writer).await?;
                    pending.clear();
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if events.is_empty() {
                // Caught up: every snapshot loaded so far is complete.
                for (tenant, warm) in pending.drain() {
                    self.finish_warm(tenant, warm, writer).await?;
                }
                // Keep the checkpoint moving on an idle stream (the
                // server's post-batch token), so a long quiet spell cannot
                // outlive the oplog window.
                if last_idle_checkpoint.elapsed() >= self.config.idle_checkpoint {
                    if let Some(token) = source.resume_token() {
                        if !self.checkpoint.save(owner, &token, BatchStats::default()).await? {
                            return Err(ProjectorError::LeaseLost);
                        }
                    }
                    last_idle_checkpoint = Instant::now();
                }
                continue;
            }
            let span = info_span!(
                "projector_batch",
                events = events.len(),
                tenants = tracing::field::Empty,
                lag_ms = tracing::field::Empty
            );
            if !keeper.is_safe() {
                return Err(ProjectorError::LeaseLost);
            }
            let reset = self.apply_batch(&events, owner, writer).instrument(span).await?;
            let newest_ms = events.iter().filter_map(transform::event_ms).max().unwrap_or(0);
            let caught_up: Vec<TenantId> =
                pending.iter().filter(|(_, w)| newest_ms > w.snapshot_done_ms + 1000).map(|(t, _)| *t).collect();
            for tenant in caught_up {
                if let Some(warm) = pending.remove(&tenant) {
                    self.finish_warm(tenant, warm, writer).await?;
                }
            }
            if let Some(token) = reset {
                warn!("a watched collection was dropped or renamed; rebuilding the read model");
                source = self.rebuild(StartAt::StartAfter(token), owner, writer).await?;
                pending.clear();
            }
        }
    }

    async fn open_source(&self, owner: &str, writer: &Writer) -> Result<Source, ProjectorError> {
        let checkpoint = self.checkpoint.load().await?;
        let schema = writer.schema().await?;
        if checkpoint.is_some() && schema.as_deref() != Some(callboard_readmodel::keys::SCHEMA) {
            warn!(found = ?schema, wanted = callboard_readmodel::keys::SCHEMA, "read model in another format: rebuilding");
            return self.restart_read_model(owner, writer).await;
        }
        match checkpoint {
            Some(token) => match Source::open(&self.db, StartAt::ResumeAfter(token)).await {
                Ok(s) => Ok(s),
                Err(e) if source::is_history_lost(&e) => self.recover_history_lost(&e, owner, writer).await,
                Err(e) => Err(e.into()),
            },
            None => {
                info!("no checkpoint: bootstrapping the read model");
                self.rebuild(StartAt::Now, owner, writer).await
            }
        }
    }

    /// MongoDB no longer holds the checkpoint's history: every tenant goes
    /// cold, the read model is rebuilt, and the tenants that were warm are
    /// warmed again.
    async fn recover_history_lost(
        &self,
        cause: &mongodb::error::Error,
        owner: &str,
        writer: &Writer,
    ) -> Result<Source, ProjectorError> {
        warn!(error = %cause, "change stream history lost; marking every tenant cold and re-warming");
        self.checkpoint.heartbeat(&[("history_lost_total", 1)]).await?;
        self.restart_read_model(owner, writer).await
    }

    /// Empties and rebuilds the read model, and queues a warm of every
    /// tenant that was warm or warming.
    async fn restart_read_model(&self, owner: &str, writer: &Writer) -> Result<Source, ProjectorError> {
        let reader = &self.reader;
        let warm: Vec<TenantId> =
            reader.tenant_states().await?.into_iter().filter(|(_, s)| s.is_maintained()).map(|(t, _)| t).collect();
        let source = self.rebuild(StartAt::Now, owner, writer).await?;
        for t in &warm {
            reader.request_warm(*t).await?;
        }
        info!(tenants = warm.len(), "re-warm queued");
        Ok(source)
    }

    /// Empties the read model and reloads users and statuses, with the
    /// stream opened first so nothing committed meanwhile is missed.
    async fn rebuild(&self, start: StartAt, owner: &str, writer: &Writer) -> Result<Source, ProjectorError> {
        if !self.checkpoint.clear(owner).await? {
            return Err(ProjectorError::LeaseLost);
        }
        writer.purge_all().await?;
        let source = Source::open(&self.db, start).await?;
        let (users, statuses) = warm::bootstrap_globals(&self.db, writer, &self.fields).await?;
        writer.set_schema().await?;
        info!(users, statuses, "users and statuses loaded");
        Ok(source)
    }

    /// Applies one batch; returns the token after a reset event if the
    /// batch holds one (events after it are not applied).
    async fn apply_batch(
        &self,
        events: &[mongodb::change_stream::event::ChangeStreamEvent<bson::Document>],
        owner: &str,
        writer: &Writer,
    ) -> Result<Option<mongodb::change_stream::event::ResumeToken>, ProjectorError> {
        let mut changes = Vec::with_capacity(events.len());
        let mut applied = 0;
        let mut reset = None;
        for event in events {
            match transform::change_of(event, &self.fields) {
                Some(Change::Reset) => {
                    reset = Some(event.id.clone());
                    break;
                }
                Some(change) => changes.push(change),
                None => {}
            }
            applied += 1;
        }
        let needs = transform::needs(&changes);
        let view = writer.load_locators(&needs.calls, &needs.users, &needs.statuses, &needs.tenants).await?;
        let last = &events[applied.max(1) - 1];
        let event_ms = transform::event_ms(last).unwrap_or_else(now_ms);
        let plan = transform::plan(&changes, &view, event_ms);
        tracing::Span::current().record("tenants", plan.tenants.len());
        let needy = writer.apply(&plan).await?;
        let refilled = warm::refill_windows(&self.db, writer, &needy).await?;
        if refilled > 0 {
            self.checkpoint.heartbeat(&[("window_refills_total", refilled)]).await?;
        }
        let lag_ms = now_ms() - event_ms;
        tracing::Span::current().record("lag_ms", lag_ms);
        let stats = BatchStats { events: applied as u64, last_event_ms: Some(event_ms), lag_ms: Some(lag_ms) };
        let token = reset.clone().unwrap_or_else(|| last.id.clone());
        if !self.checkpoint.save(owner, &token, stats).await? {
            return Err(ProjectorError::LeaseLost);
        }
        Ok(reset)
    }

    /// Runs queued commands: warms (a snapshot per tenant) and purges.
    async fn run_commands(
        &self,
        pending: &mut HashMap<TenantId, PendingWarm>,
        keeper: &Keeper,
        writer: &Writer,
    ) -> Result<(), ProjectorError> {
        let reader = &self.reader;
        for _ in 0..16 {
            // Never take a command this projector might not finish.
            if !keeper.is_safe() {
                return Err(ProjectorError::LeaseLost);
            }
            let mut c = self.redis.get().await?;
            let raw: Option<String> = c.lpop(self.keys.commands(), None).await?;
            drop(c);
            let Some(raw) = raw else { return Ok(()) };
            match Command::parse(&raw) {
                Some(Command::Warm { tenant, epoch, job }) => {
                    self.warm(tenant, epoch, job, pending, keeper, writer).await?;
                }
                Some(Command::Purge { tenant }) => {
                    if reader.tenant_state(tenant).await? == TenantState::Cold {
                        let removed = writer.purge_tenant_calls(tenant).await?;
                        pending.remove(&tenant);
                        info!(tenant = %tenant, removed, "tenant invalidated");
                    }
                }
                None => warn!(command = %raw, "malformed command"),
            }
        }
        Ok(())
    }

    /// Loads `tenant`'s snapshot unless its state moved on (invalidated,
    /// or a newer warm queued); it turns warm once the stream catches up.
    async fn warm(
        &self,
        tenant: TenantId,
        epoch: u64,
        job: Option<String>,
        pending: &mut HashMap<TenantId, PendingWarm>,
        keeper: &Keeper,
        writer: &Writer,
    ) -> Result<(), ProjectorError> {
        let reader = &self.reader;
        if reader.tenant_state(tenant).await? != TenantState::Warming(epoch) {
            return self.job_done(job.as_deref(), writer).await;
        }
        if pending.get(&tenant).is_some_and(|p| p.epoch == epoch) {
            return Ok(()); // already loaded, waiting to catch up
        }
        let started = now_ms();
        let span = info_span!("warm", tenant = %tenant, epoch, calls = tracing::field::Empty);
        let calls = warm::snapshot_tenant(&self.db, writer, tenant, keeper).instrument(span.clone()).await?;
        span.record("calls", calls);
        let done = now_ms();
        info!(tenant = %tenant, calls, ms = done - started, "snapshot loaded");
        // Warm once the stream is past the snapshot's *end*: events from
        // during the read may be older than what it saw.
        if let Some(previous) = pending.insert(tenant, PendingWarm { epoch, job, snapshot_done_ms: done }) {
            self.job_done(previous.job.as_deref(), writer).await?;
        }
        Ok(())
    }

    /// Warms a previous leader left unfinished (its progress was in its
    /// memory): they are redone from their snapshot.
    async fn resume_warms(
        &self,
        pending: &mut HashMap<TenantId, PendingWarm>,
        keeper: &Keeper,
        writer: &Writer,
    ) -> Result<(), ProjectorError> {
        let reader = &self.reader;
        for (tenant, epoch, job) in reader.warming().await? {
            if pending.get(&tenant).is_some_and(|p| p.epoch == epoch) {
                continue;
            }
            // Queued warms not yet taken are left to the queue.
            if reader.is_queued(tenant, epoch).await? {
                continue;
            }
            info!(tenant = %tenant, epoch, "resuming an unfinished warm");
            self.warm(tenant, epoch, job, pending, keeper, writer).await?;
        }
        Ok(())
    }

    async fn finish_warm(&self, tenant: TenantId, warm: PendingWarm, writer: &Writer) -> Result<(), ProjectorError> {
        if writer.mark_warm(tenant, warm.epoch).await? {
            info!(tenant = %tenant, epoch = warm.epoch, "tenant warm");
            self.checkpoint.heartbeat(&[("warms_total", 1)]).await?;
        }
        self.job_done(warm.job.as_deref(), writer).await
    }

    async fn job_done(&self, job: Option<&str>, writer: &Writer) -> Result<(), ProjectorError> {
        if let Some(job) = job {
            writer.job_done(job).await?;
        }
        Ok(())
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "host".into())
}
