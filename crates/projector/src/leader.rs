//! One partition's leadership: the loop that follows the change stream and
//! applies what falls in the partition's scope, with its commands, warms
//! and rebuilds. Every write goes through the partition's guarded
//! [`Writer`]; [`Keeper`] says whether the lease leaves time to start one.
//!
//! Redis losing its last writes: every checkpoint carries the sequence of
//! its batch (`token << 32 | batches`, so it only grows, across leaders and
//! rebuilds), and on a cluster a marker with the same sequence is written on
//! every master after the batch's data and before the checkpoint. On every
//! lead and every second the leader compares: a checkpoint older than the
//! one it saved itself (Redis came back from an older snapshot) makes it
//! resume from the checkpoint Redis has, whose data it matches; a master
//! whose marker is older than the checkpoint (an async replica promoted
//! behind) holds less than the checkpoint claims, so the partition is
//! rebuilt and its warm tenants warmed again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use callboard_domain::{TenantId, Watermark};
use callboard_readmodel::state::progress;
use callboard_readmodel::write::{Scope, Writer};
use callboard_readmodel::{Command, PoisonEvent, ReadModelError, TenantState};
use redis::AsyncCommands;
use tracing::{info, info_span, warn, Instrument};

use crate::checkpoint::{now_ms, BatchStats, Checkpoint};
use crate::lease::Keeper;
use crate::source::{self, Source, StartAt};
use crate::transform::{self, Change};
use crate::{warm, watermark, Projector, ProjectorError};

type Event = mongodb::change_stream::event::ChangeStreamEvent<bson::Document>;
type ResumeToken = mongodb::change_stream::event::ResumeToken;

/// Evaluates `$step` (a `Result<_, ProjectorError>` expression) until it
/// succeeds, again after a passing Redis error
/// ([`ReadModelError::is_passing`]: a failover under way, writes refused) with a growing pause (50 ms to 1 s), up to
/// [`PASSING_TRIES`] times and for as long as the lease holds: while
/// renewals fail too it waits, writing nothing, until one gets through
/// ([`Keeper::wait_safe`]). Every step retried this way
/// is idempotent (a batch replays to the same state). Anything else, or
/// the lease lost, ends the leadership as before: it is led again from the
/// checkpoint.
macro_rules! retrying {
    ($leader:expr, $what:literal, $step:expr) => {{
        let mut pause = Duration::from_millis(50);
        let mut tries = 0;
        loop {
            tries += 1;
            match $step {
                Err(ProjectorError::ReadModel(e)) if e.is_passing() && tries < PASSING_TRIES => {
                    warn!(step = $what, error = %e, pause_ms = pause.as_millis() as u64, "Redis error; retrying in place");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                    if !$leader.keeper.wait_safe().await {
                        break Err(ProjectorError::LeaseLost);
                    }
                }
                other => break other,
            }
        }
    }};
}

/// How many times [`retrying!`] tries a step (about 3 s of pauses): a
/// condition that lasts longer ends the leadership, and the partition is
/// led again from its checkpoint, as any other failure.
const PASSING_TRIES: u32 = 7;

/// How many times a batch is tried while Redis rejects one of its writes,
/// before it is applied event by event to find the poison one.
const POISON_TRIES: u32 = 3;

/// A warm under way: waiting for its turn, its snapshot loading, then,
/// once loaded, waiting for the stream to catch up.
struct PendingWarm {
    epoch: u64,
    job: Option<String>,
    stage: Stage,
    /// The order warms were taken in: snapshots load first come, first
    /// served.
    seq: u64,
    started_ms: i64,
    /// When the snapshot read ended (ms): events committed after it were
    /// not in it. Meaningless before [`Stage::Loaded`].
    snapshot_done_ms: i64,
}

/// Where a warm's snapshot is. One loads at a time per partition: its
/// purge, cursor and touched calls exist only from its turn on, so a
/// warm-all over thousands of tenants holds one cursor, and a cursor is
/// never left idle long enough for the server to time it out.
enum Stage {
    Queued,
    /// A chunk per round ([`warm::Load`]).
    Loading(Box<warm::Load>),
    Loaded,
}

impl PendingWarm {
    fn loaded(&self) -> bool {
        matches!(self.stage, Stage::Loaded)
    }

    fn loading(&mut self) -> Option<&mut warm::Load> {
        match &mut self.stage {
            Stage::Loading(load) => Some(load.as_mut()),
            _ => None,
        }
    }
}

/// What one partition's leader works with.
pub(crate) struct Leader<'a> {
    pub p: &'a Projector,
    pub scope: Scope,
    pub writer: Writer,
    pub checkpoint: Checkpoint,
    pub keeper: Keeper,
    /// The lease holder's id.
    pub owner: String,
    /// This leadership's fence token: the high half of batch sequences.
    pub token: u64,
    /// Batches checkpointed by this leadership.
    pub batches: AtomicU64,
    /// The sequence of the last checkpoint this leadership saved (0: none).
    pub saved: AtomicU64,
    /// The markers' hash tags, one per master (refreshed every check).
    pub marker_tags: Mutex<Vec<String>>,
}

/// What a durability check found.
#[derive(Debug, PartialEq, Eq)]
enum Durability {
    Intact,
    /// A master holds less than the checkpoint says was written.
    MasterBehind,
}

impl Leader<'_> {
    /// Leads the partition: opens the stream at the checkpoint
    /// (bootstrapping when there is none, or when MongoDB no longer has it)
    /// and applies batches until the lease is lost or something fails.
    pub(crate) async fn run(&self) -> Result<(), ProjectorError> {
        self.writer.claim_shards().await?;
        let mut source = match self.check_durability().await? {
            Durability::Intact => self.open_source().await?,
            Durability::MasterBehind => self.restart_read_model().await?,
        };
        let mut pending: HashMap<TenantId, PendingWarm> = HashMap::new();
        self.resume_warms(&mut pending).await?;
        let mut last_resume = Instant::now();
        let mut last_beat = Instant::now();
        let mut last_idle_checkpoint = Instant::now();
        // Where this leadership stands for answers' `as_of`.
        let mut tracker = watermark::Tracker::default();
        let mut published = Watermark::default();
        let marks = self.p.config.watermark_collection.as_deref();
        loop {
            if self.p.stopping() {
                // Everything applied is checkpointed (each batch saves its
                // own); warms still pending are resumed by the next leader.
                info!("shutting down: leadership handed back");
                return Ok(());
            }
            if !self.keeper.wait_safe().await {
                return Err(ProjectorError::LeaseLost);
            }
            if last_beat.elapsed() >= Duration::from_secs(1) {
                retrying!(self, "heartbeat", self.checkpoint.heartbeat(&[]).await.map_err(ProjectorError::from))?;
                if retrying!(self, "durability check", self.check_durability().await)? == Durability::MasterBehind {
                    source = self.restart_read_model().await?;
                    pending.clear();
                    tracker.reset();
                    published = Watermark::default();
                }
                last_beat = Instant::now();
            }
            if last_resume.elapsed() >= Duration::from_secs(5) {
                // Warms whose command a fenced-out leader took and lost.
                self.resume_warms(&mut pending).await?;
                last_resume = Instant::now();
            }
            if let Some(rebuilt) = self.run_commands(&mut pending).await? {
                source = rebuilt;
                pending.clear();
                tracker.reset();
                published = Watermark::default();
            }
            // One chunk of a loading snapshot per round; while one loads,
            // the stream is not waited on for long.
            let loading = self.load_chunk(&mut pending).await?;
            let wait = if loading { Duration::from_millis(5) } else { self.p.config.batch_wait };
            let events = match source.next_batch(self.p.config.batch_max, wait).await {
                Ok(events) => events,
                Err(e) if source::is_history_lost(&e) => {
                    source = self.recover_history_lost(&e).await?;
                    pending.clear();
                    tracker.reset();
                    published = Watermark::default();
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if events.is_empty() {
                // Caught up: every snapshot loaded so far is complete.
                let loaded: Vec<TenantId> = pending.iter().filter(|(_, w)| w.loaded()).map(|(t, _)| *t).collect();
                for tenant in loaded {
                    if let Some(warm) = pending.remove(&tenant) {
                        retrying!(
                            self,
                            "finish warm",
                            self.finish_warm(tenant, warm.epoch, warm.job.as_deref()).await
                        )?;
                    }
                }
                let w = tracker.applied(&[], marks, source.drained(), now_ms());
                retrying!(self, "watermark", self.publish(&mut published, w).await)?;
                // Keep the checkpoint moving on an idle stream (the
                // server's post-batch token), so a long quiet spell cannot
                // outlive the oplog window.
                if last_idle_checkpoint.elapsed() >= self.p.config.idle_checkpoint {
                    if let Some(token) = source.resume_token() {
                        retrying!(self, "idle checkpoint", self.save_checkpoint(&token, BatchStats::default()).await)?;
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
            if !self.keeper.wait_safe().await {
                return Err(ProjectorError::LeaseLost);
            }
            // Calls these events change: a loading snapshot's chunks skip
            // them from now on (`warm::Load`).
            for load in pending.values_mut().filter_map(PendingWarm::loading) {
                for key in events.iter().filter_map(transform::call_key) {
                    load.touch(key);
                }
            }
            let reset = retrying!(self, "apply", self.apply_events(&events).instrument(span.clone()).await)?;
            if reset.is_none() {
                let w = tracker.applied(&events, marks, source.drained(), now_ms());
                retrying!(self, "watermark", self.publish(&mut published, w).await)?;
            }
            let newest_ms = events.iter().filter_map(transform::event_ms).max().unwrap_or(0);
            let caught_up: Vec<TenantId> = pending
                .iter()
                .filter(|(_, w)| w.loaded() && newest_ms > w.snapshot_done_ms + 1000)
                .map(|(t, _)| *t)
                .collect();
            for tenant in caught_up {
                if let Some(warm) = pending.remove(&tenant) {
                    retrying!(self, "finish warm", self.finish_warm(tenant, warm.epoch, warm.job.as_deref()).await)?;
                }
            }
            if let Some(token) = reset {
                warn!("a watched collection was dropped or renamed; rebuilding the read model");
                source = self.rebuild(StartAt::StartAfter(token)).await?;
                // The rebuild purged their states: nothing resumes them.
                for (_, dropped) in pending.drain() {
                    self.job_done(dropped.job.as_deref()).await?;
                }
                tracker.reset();
                published = Watermark::default();
            }
        }
    }

    /// The settings this leader stores data with.
    fn fingerprint(&self) -> callboard_readmodel::Fingerprint {
        callboard_readmodel::Fingerprint {
            user_fields: Some(self.p.fields.names().to_vec()),
            doc_window: Some(self.p.config.doc_window.size),
        }
    }

    /// The change stream from `start`, with the watermark collection.
    async fn open_stream(&self, start: StartAt) -> Result<Source, mongodb::error::Error> {
        Source::open(&self.p.db, start, self.p.config.watermark_collection.as_deref()).await
    }

    /// Raises the partition's published watermark to `w` if it is
    /// higher ([`watermark`]): after the events it stands for are applied.
    async fn publish(&self, published: &mut Watermark, w: Watermark) -> Result<(), ProjectorError> {
        if w.at_ms <= published.at_ms && w.through <= published.through {
            return Ok(());
        }
        if !self.checkpoint.publish_as_of(&self.owner, w).await? {
            return Err(ProjectorError::LeaseLost);
        }
        *published = published.max(w);
        Ok(())
    }

    async fn open_source(&self) -> Result<Source, ProjectorError> {
        let checkpoint = self.checkpoint.load().await?.map(|c| c.token);
        let schema = self.writer.schema().await?;
        let wanted = self.writer.schema_mark();
        if checkpoint.is_some() && schema.as_deref() != Some(wanted.as_str()) {
            warn!(found = ?schema, %wanted, "read model in another format (or partition count): rebuilding the partition");
            return self.restart_read_model().await;
        }
        if checkpoint.is_some() {
            let found = self
                .writer
                .fingerprint()
                .await?
                .unwrap_or(callboard_readmodel::Fingerprint { user_fields: None, doc_window: None });
            let wanted = self.fingerprint();
            if found.doc_window.is_some() && found.doc_window != wanted.doc_window {
                warn!(found = ?found.doc_window, wanted = ?wanted.doc_window, "projector.doc_window changed: rebuilding the partition");
                return self.restart_read_model().await;
            }
            // Other user fields (or none recorded, as after an upgrade):
            // the users are stored again with this allowlist (by the
            // partition that stores them). A window not recorded adapts at
            // each status's next change.
            if self.scope.owns_globals() && found.user_fields != wanted.user_fields {
                warn!(found = ?found.user_fields, wanted = ?wanted.user_fields, "query.user_fields changed: storing the users again");
                let (users, statuses) = warm::bootstrap_globals(&self.p.db, &self.writer, &self.p.fields).await?;
                info!(users, statuses, "users and statuses stored again");
            }
            if found != wanted {
                self.writer.set_fingerprint(&wanted).await?;
            }
        }
        match checkpoint {
            Some(token) => match self.open_stream(StartAt::ResumeAfter(token)).await {
                Ok(s) => Ok(s),
                Err(e) if source::is_history_lost(&e) => self.recover_history_lost(&e).await,
                Err(e) => Err(e.into()),
            },
            None => {
                // A partition with no checkpoint may still have warm
                // tenants: after the partition count changed, or another
                // partition's rebuild left them. They are warmed again.
                info!("no checkpoint: bootstrapping the read model");
                self.restart_read_model().await
            }
        }
    }

    /// MongoDB no longer holds the checkpoint's history: every tenant goes
    /// cold, the read model is rebuilt, and the tenants that were warm are
    /// warmed again.
    async fn recover_history_lost(&self, cause: &mongodb::error::Error) -> Result<Source, ProjectorError> {
        warn!(error = %cause, "change stream history lost; marking every tenant cold and re-warming");
        self.checkpoint.heartbeat(&[(progress::HISTORY_LOST, 1)]).await?;
        self.restart_read_model().await
    }

    /// Empties and rebuilds the read model, and queues a warm of every
    /// tenant that was warm. A tenant that was warming keeps its warm (its
    /// epoch and job): its command, if still queued, runs, and otherwise it
    /// is resumed. Were it given a new warm, the queued one would be skipped
    /// as superseded and count its job done while the tenant is still
    /// warming.
    async fn restart_read_model(&self) -> Result<Source, ProjectorError> {
        let reader = &self.p.reader;
        let warm: Vec<TenantId> = reader
            .tenant_states()
            .await?
            .into_iter()
            .filter(|(t, s)| matches!(s, TenantState::Warm(_)) && self.scope.owns_tenant(*t))
            .map(|(t, _)| t)
            .collect();
        let warming: Vec<(TenantId, u64, Option<String>)> =
            reader.warming().await?.into_iter().filter(|(t, _, _)| self.scope.owns_tenant(*t)).collect();
        let source = self.rebuild(StartAt::Now).await?;
        for t in &warm {
            reader.request_warm(*t).await?;
        }
        // A warm requested while the partition was listed and purged lost
        // its state with the purge, but its command is still queued (only
        // this leader takes it): its state is put back, so that the command
        // runs instead of being skipped as superseded. Not for a tenant
        // whose invalidation is queued after it.
        let mut c = self.p.redis.get().await?;
        let queued: Vec<String> = c.lrange(self.p.keys.commands(), 0, -1).await?;
        let commands: Vec<Command> = queued.iter().filter_map(|q| Command::parse(q)).collect();
        let mut restored = 0;
        for (t, epoch, job) in &warming {
            let purged = commands.iter().any(|c| matches!(c, Command::Purge { tenant } if tenant == t));
            if !purged {
                restored += u32::from(reader.restore_warming(*t, *epoch, job.as_deref()).await?);
            }
        }
        for (i, command) in commands.iter().enumerate() {
            let Command::Warm { tenant, epoch, job } = command else { continue };
            let purged_later =
                commands[i + 1..].iter().any(|c| matches!(c, Command::Purge { tenant: t } if t == tenant));
            if self.scope.owns_tenant(*tenant) && !purged_later {
                restored += u32::from(reader.restore_warming(*tenant, *epoch, job.as_deref()).await?);
            }
        }
        info!(tenants = warm.len(), warming = warming.len(), restored, "re-warm queued");
        Ok(source)
    }

    /// Empties the read model and reloads users and statuses, with the
    /// stream opened first so nothing committed meanwhile is missed.
    async fn rebuild(&self, start: StartAt) -> Result<Source, ProjectorError> {
        if !self.checkpoint.clear(&self.owner).await? {
            return Err(ProjectorError::LeaseLost);
        }
        // No checkpoint now: nothing saved to compare with.
        self.saved.store(0, Ordering::Relaxed);
        self.writer.purge_all().await?;
        let source = self.open_stream(start).await?;
        let (users, statuses) = warm::bootstrap_globals(&self.p.db, &self.writer, &self.p.fields).await?;
        self.writer.set_schema().await?;
        self.writer.set_fingerprint(&self.fingerprint()).await?;
        info!(users, statuses, "users and statuses loaded");
        Ok(source)
    }

    /// Applies a batch ([`Leader::apply_batch`]). A write Redis rejects
    /// (the same error whatever the timing: [`ReadModelError::Rejected`])
    /// is tried [`POISON_TRIES`] times; then the batch is applied one event
    /// at a time, so that the event whose write fails is known: its tenant
    /// is quarantined ([`Leader::quarantine`]) and the event applied again
    /// without it. An event still rejected for the same tenant (a write
    /// quarantining does not stop, such as the tenant's own statuses) is
    /// skipped: logged, counted, and checkpointed past. The rest of the
    /// stream goes on.
    async fn apply_events(&self, events: &[Event]) -> Result<Option<ResumeToken>, ProjectorError> {
        let mut pause = Duration::from_millis(100);
        for attempt in 1..=POISON_TRIES {
            match self.apply_batch(events).await {
                Err(ProjectorError::ReadModel(ReadModelError::Rejected { tenant, source }))
                    if attempt < POISON_TRIES =>
                {
                    warn!(tenant = %tenant, error = %source, "Redis rejected a write; trying the batch again");
                    tokio::time::sleep(pause).await;
                    pause *= 4;
                }
                Err(ProjectorError::ReadModel(ReadModelError::Rejected { .. })) => break,
                other => return other,
            }
        }
        // Tenants quarantined during this pass (or before it: their state
        // says so), whose rejections skip the event rather than quarantine
        // them again.
        let mut quarantined = Vec::new();
        for event in events {
            loop {
                match self.apply_batch(std::slice::from_ref(event)).await {
                    Ok(Some(reset)) => return Ok(Some(reset)),
                    Ok(None) => break,
                    Err(ProjectorError::ReadModel(ReadModelError::Rejected { tenant, source }))
                        if !quarantined.contains(&tenant)
                            && self.p.reader.tenant_state(tenant).await? != TenantState::Quarantined =>
                    {
                        self.quarantine(tenant, Some(event), &source).await?;
                        quarantined.push(tenant);
                    }
                    Err(ProjectorError::ReadModel(ReadModelError::Rejected { tenant, source })) => {
                        quarantined.push(tenant);
                        tracing::error!(tenant = %tenant, event_id = ?event.id, error = %source,
                            "poison event still rejected after its tenant's quarantine: skipped");
                        self.checkpoint.heartbeat(&[(progress::POISON_EVENTS, 1)]).await?;
                        let stats = BatchStats { events: 1, last_event_ms: transform::event_ms(event), lag_ms: None };
                        self.save_checkpoint(&event.id, stats).await?;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(None)
    }

    /// Takes `tenant` out of the projection: it is answered live until an
    /// operator warms it again. `event` is the one whose write failed
    /// (none: its snapshot's).
    async fn quarantine(
        &self,
        tenant: TenantId,
        event: Option<&Event>,
        error: &redis::RedisError,
    ) -> Result<(), ProjectorError> {
        let extjson = |b: Result<bson::Bson, bson::ser::Error>| {
            b.map(|b| b.into_relaxed_extjson().to_string()).unwrap_or_default()
        };
        let record = PoisonEvent {
            tenant_id: tenant.get(),
            event_id: event.map(|e| extjson(bson::to_bson(&e.id))).unwrap_or_default(),
            operation: event
                .map(|e| extjson(bson::to_bson(&e.operation_type)).trim_matches('"').to_string())
                .unwrap_or_else(|| "snapshot".into()),
            document_key: event
                .and_then(|e| e.document_key.as_ref())
                .map(|k| extjson(Ok(k.into())))
                .unwrap_or_default(),
            error: error.to_string(),
            at_ms: now_ms(),
        };
        if !self.p.may_quarantine() {
            tracing::error!(tenant = %tenant, error = %error,
                "Redis rejects many tenants' writes: not quarantining more; the partition retries from its checkpoint");
            return Err(ProjectorError::ReadModel(ReadModelError::Rejected { tenant, source: error.clone() }));
        }
        tracing::error!(tenant = %tenant, event_id = %record.event_id, operation = %record.operation,
            document_key = %record.document_key, error = %record.error,
            "poison event: Redis rejects this write every time; the tenant is quarantined and answered live");
        self.writer.quarantine(tenant, &record).await?;
        self.checkpoint.heartbeat(&[(progress::POISON_EVENTS, 1)]).await?;
        Ok(())
    }

    /// Applies one batch; returns the token after a reset event if the
    /// batch holds one (events after it are not applied).
    async fn apply_batch(&self, events: &[Event]) -> Result<Option<ResumeToken>, ProjectorError> {
        let mut changes = Vec::with_capacity(events.len());
        let mut applied = 0;
        let mut reset = None;
        for event in events {
            match transform::change_of(event, &self.p.fields) {
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
        let view = self.writer.load_locators(&needs.calls, &needs.users, &needs.statuses, &needs.tenants).await?;
        let last = &events[applied.max(1) - 1];
        let event_ms = transform::event_ms(last).unwrap_or_else(now_ms);
        let plan = transform::plan(&changes, &view, event_ms);
        tracing::Span::current().record("tenants", plan.tenants.len());
        let needy = self.writer.apply(&plan).await?;
        let refilled = warm::refill_windows(&self.p.db, &self.writer, &needy).await?;
        if refilled > 0 {
            self.checkpoint.heartbeat(&[(progress::WINDOW_REFILLS, refilled)]).await?;
        }
        let lag_ms = now_ms() - event_ms;
        tracing::Span::current().record("lag_ms", lag_ms);
        let stats = BatchStats { events: applied as u64, last_event_ms: Some(event_ms), lag_ms: Some(lag_ms) };
        // Up to the last event applied, never the reset itself: the reset
        // is checkpointed by the rebuild it stands for (which clears the
        // checkpoint first), so a crash before that rebuild reads the
        // reset again rather than resuming past it onto a stale model.
        if applied > 0 {
            self.save_checkpoint(&last.id, stats).await?;
        }
        Ok(reset)
    }

    /// Marks every master with the next sequence, then saves the
    /// checkpoint with it (if the lease still holds).
    async fn save_checkpoint(
        &self,
        token: &mongodb::change_stream::event::ResumeToken,
        stats: BatchStats,
    ) -> Result<(), ProjectorError> {
        let seq = (self.token << 32) | (self.batches.fetch_add(1, Ordering::Relaxed) + 1);
        let tags = self.marker_tags.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if !self.writer.mark(&tags, self.saved.load(Ordering::Relaxed), seq).await? {
            // Left below the checkpoint: the check at the next lead sees it.
            warn!("a Redis master's marker is behind the last checkpoint");
            return Err(ProjectorError::MasterBehind);
        }
        if !self.checkpoint.save(&self.owner, token, seq, &tags, stats).await? {
            return Err(ProjectorError::LeaseLost);
        }
        self.saved.store(seq, Ordering::Relaxed);
        Ok(())
    }

    /// Compares what Redis holds with what this leader wrote (see the
    /// module's documentation). A checkpoint older than the one saved here
    /// ends the leadership, so that the next one resumes from it.
    async fn check_durability(&self) -> Result<Durability, ProjectorError> {
        let (checkpoint, marked) = self.checkpoint.load().await?.map(|c| (c.seq, c.markers)).unwrap_or_default();
        // The first check of a leadership takes the checkpoint as saved.
        let saved = match self.saved.compare_exchange(0, checkpoint, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => checkpoint,
            Err(saved) => saved,
        };
        if checkpoint < saved {
            warn!(checkpoint, saved, "Redis holds an older checkpoint than this projector saved: resuming from it");
            return Err(ProjectorError::StateRegressed);
        }
        // The next checkpoint marks the masters there are now; this one is
        // compared with the markers written with it (a master added since
        // has none to compare).
        *self.marker_tags.lock().unwrap_or_else(|e| e.into_inner()) = self.writer.marker_tags().await?;
        if checkpoint == 0 {
            return Ok(Durability::Intact);
        }
        let markers = self.writer.markers(&marked).await?;
        if let Some((tag, marker)) = marked.iter().zip(&markers).find(|(_, m)| m.is_none_or(|m| m < checkpoint)) {
            warn!(%tag, ?marker, checkpoint, "a Redis master holds less than the checkpoint says: rebuilding the partition");
            self.checkpoint.heartbeat(&[(progress::WRITES_LOST, 1)]).await?;
            return Ok(Durability::MasterBehind);
        }
        Ok(Durability::Intact)
    }

    /// The first queued command for a tenant of this partition, taken off
    /// the queue (`LREM` of exactly it: if another leader took it first,
    /// the next one is tried). The queue is shared by every partition and
    /// read in pages, up to its first 4,096 commands, so that one
    /// partition's backlog does not hide another's commands.
    async fn take_command(&self) -> Result<Option<String>, ProjectorError> {
        const PAGE: isize = 256;
        let mut c = self.p.redis.get().await?;
        let queue = self.p.keys.commands();
        for page in 0..16 {
            let queued: Vec<String> = c.lrange(&queue, page * PAGE, (page + 1) * PAGE - 1).await?;
            let last_page = (queued.len() as isize) < PAGE;
            for raw in queued {
                let parsed = Command::parse(&raw);
                let mine = match parsed {
                    Some(Command::Warm { tenant, .. } | Command::Purge { tenant }) => self.scope.owns_tenant(tenant),
                    Some(Command::Rebuild { partition }) => {
                        partition == self.scope.partition
                            // A partition that does not exist: partition 0 drops it.
                            || (partition >= self.scope.partitioning.count() && self.scope.owns_globals())
                    }
                    // Partition 0 drops what nobody can run.
                    None => self.scope.owns_globals(),
                };
                // Rebuilds are taken with every copy queued: one does for all.
                let copies = if matches!(parsed, Some(Command::Rebuild { .. })) { 0 } else { 1 };
                if mine && c.lrem::<_, _, i64>(&queue, copies, &raw).await? >= 1 {
                    return Ok(Some(raw));
                }
            }
            if last_page {
                break;
            }
        }
        Ok(None)
    }

    /// Runs queued commands: warms (a snapshot per tenant), purges and
    /// rebuilds; after a rebuild, the stream it opened.
    async fn run_commands(
        &self,
        pending: &mut HashMap<TenantId, PendingWarm>,
    ) -> Result<Option<Source>, ProjectorError> {
        let reader = &self.p.reader;
        for _ in 0..16 {
            if self.p.stopping() {
                return Ok(None);
            }
            // Never take a command this projector might not finish.
            if !self.keeper.wait_safe().await {
                return Err(ProjectorError::LeaseLost);
            }
            let Some(raw) = self.take_command().await? else { return Ok(None) };
            match Command::parse(&raw) {
                Some(Command::Warm { tenant, epoch, job }) => {
                    self.warm(tenant, epoch, job, pending).await?;
                }
                Some(Command::Purge { tenant }) => {
                    if reader.tenant_state(tenant).await? == TenantState::Cold {
                        let removed = self.writer.purge_tenant_calls(tenant).await?;
                        // A warm under way is over: invalidated.
                        if let Some(dropped) = pending.remove(&tenant) {
                            self.job_done(dropped.job.as_deref()).await?;
                        }
                        info!(tenant = %tenant, removed, "tenant invalidated");
                    }
                }
                Some(Command::Rebuild { partition }) if partition == self.scope.partition => {
                    // Verification found shared data lost (the users, the
                    // statuses): rebuilt as after a Redis that lost writes,
                    // its warm tenants warmed again.
                    warn!("rebuilding the partition: verification found its shared data lost in Redis");
                    return match self.restart_read_model().await {
                        Ok(source) => Ok(Some(source)),
                        Err(e) => {
                            // Idempotent: the next leader runs it again.
                            let mut c = self.p.redis.get().await?;
                            let _: () = c.lpush(self.p.keys.commands(), &raw).await?;
                            Err(e)
                        }
                    };
                }
                Some(Command::Rebuild { partition }) => warn!(partition, "rebuild of a partition that does not exist"),
                None => warn!(command = %raw, "malformed command"),
            }
        }
        Ok(None)
    }

    /// Loads `tenant`'s snapshot unless its state moved on (invalidated,
    /// or a newer warm queued); it turns warm once the stream catches up.
    async fn warm(
        &self,
        tenant: TenantId,
        epoch: u64,
        job: Option<String>,
        pending: &mut HashMap<TenantId, PendingWarm>,
    ) -> Result<(), ProjectorError> {
        // The warm already pending counts its own job, whatever the state
        // says now.
        if pending.get(&tenant).is_some_and(|p| p.epoch == epoch) {
            return Ok(());
        }
        if self.p.reader.tenant_state(tenant).await? != TenantState::Warming(epoch) {
            return self.job_done(job.as_deref()).await;
        }
        // The snapshot loads in its turn, a chunk per round
        // ([`Leader::load_chunk`]).
        let seq = pending.values().map(|w| w.seq + 1).max().unwrap_or(0);
        let warm = PendingWarm { epoch, job, stage: Stage::Queued, seq, started_ms: now_ms(), snapshot_done_ms: 0 };
        if let Some(previous) = pending.insert(tenant, warm) {
            self.job_done(previous.job.as_deref()).await?;
        }
        Ok(())
    }

    /// Loads one chunk of the snapshot loading, or starts the next one in
    /// line (first come, first served); returns whether one is loading. A
    /// tenant whose state moved on (invalidated, or a newer warm) is
    /// dropped; a chunk Redis rejects quarantines its tenant.
    async fn load_chunk(&self, pending: &mut HashMap<TenantId, PendingWarm>) -> Result<bool, ProjectorError> {
        let current = pending.iter().find(|(_, w)| matches!(w.stage, Stage::Loading(_))).map(|(t, _)| *t);
        let next = || {
            pending.iter().filter(|(_, w)| matches!(w.stage, Stage::Queued)).min_by_key(|(_, w)| w.seq).map(|(t, _)| *t)
        };
        let Some(tenant) = current.or_else(next) else {
            return Ok(false);
        };
        // Like a batch, a chunk starts only with time left on the lease.
        if !self.keeper.wait_safe().await {
            return Err(ProjectorError::LeaseLost);
        }
        let warm = pending.get_mut(&tenant).expect("just found");
        if self.p.reader.tenant_state(tenant).await? != TenantState::Warming(warm.epoch) {
            let dropped = pending.remove(&tenant).expect("just found");
            self.job_done(dropped.job.as_deref()).await?;
            return Ok(true);
        }
        if matches!(warm.stage, Stage::Queued) {
            warm.stage = Stage::Loading(Box::new(warm::Load::start(&self.p.db, &self.writer, tenant).await?));
            warm.started_ms = now_ms();
        }
        let Stage::Loading(load) = &mut warm.stage else { unreachable!("loading") };
        let span = info_span!("warm_chunk", tenant = %tenant, epoch = warm.epoch, calls = load.calls());
        match load.next_chunk(&self.p.db, &self.writer).instrument(span).await {
            Ok(false) => {}
            Ok(true) => {
                let done = now_ms();
                info!(tenant = %tenant, calls = load.calls(), ms = done - warm.started_ms, "snapshot loaded");
                // Warm once the stream is past the snapshot's *end*:
                // events from during the read may be older than what it saw.
                warm.stage = Stage::Loaded;
                warm.snapshot_done_ms = done;
            }
            // A snapshot Redis rejects (in the tenant's own slot) would
            // fail again at every resume.
            Err(ProjectorError::ReadModel(ReadModelError::Rejected { tenant: t, source })) if t == tenant => {
                let dropped = pending.remove(&tenant).expect("just found");
                self.quarantine(tenant, None, &source).await?;
                self.job_done(dropped.job.as_deref()).await?;
            }
            Err(e) => return Err(e),
        }
        Ok(true)
    }

    /// Warms a previous leader left unfinished (its progress was in its
    /// memory): they are redone from their snapshot.
    async fn resume_warms(&self, pending: &mut HashMap<TenantId, PendingWarm>) -> Result<(), ProjectorError> {
        let reader = &self.p.reader;
        // One read of the queue for all of them: linear in the tenants.
        let mut queued = None;
        for (tenant, epoch, job) in reader.warming().await? {
            if self.p.stopping() {
                return Ok(());
            }
            if !self.scope.owns_tenant(tenant) {
                continue;
            }
            if pending.get(&tenant).is_some_and(|p| p.epoch == epoch) {
                continue;
            }
            // Queued warms not yet taken are left to the queue.
            if queued.is_none() {
                queued = Some(reader.queued_warms().await?);
            }
            if queued.as_ref().is_some_and(|q| q.contains(&(tenant, epoch))) {
                continue;
            }
            info!(tenant = %tenant, epoch, "resuming an unfinished warm");
            self.warm(tenant, epoch, job, pending).await?;
        }
        Ok(())
    }

    /// Marks the tenant warm and counts its job done; the poison report's
    /// removal and the warm's count come after and are best-effort, so that
    /// a failure there (the leadership ending with the tenant already warm,
    /// which no one resumes) cannot leave the job running for ever.
    async fn finish_warm(&self, tenant: TenantId, epoch: u64, job: Option<&str>) -> Result<(), ProjectorError> {
        let marked = self.writer.mark_warm(tenant, epoch).await?;
        self.job_done(job).await?;
        if marked {
            info!(tenant = %tenant, epoch, "tenant warm");
            if let Err(e) = self.writer.clear_poison(tenant).await {
                warn!(tenant = %tenant, error = %e, "could not remove the tenant's poison report");
            }
            if let Err(e) = self.checkpoint.heartbeat(&[(progress::WARMS, 1)]).await {
                warn!(tenant = %tenant, error = %e, "could not count the warm");
            }
        }
        Ok(())
    }

    async fn job_done(&self, job: Option<&str>) -> Result<(), ProjectorError> {
        if let Some(job) = job {
            self.writer.job_done(job).await?;
        }
        Ok(())
    }
}
