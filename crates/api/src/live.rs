//! The live path's guard: MongoDB must survive its own cache going cold
//! (a Redis restart, a lost history, an invalidate-all send every tenant
//! live at once).
//!
//! - Identical concurrent live queries (same tenant, same parameters) share
//!   one aggregation. The first request starts it as a task of its own, so
//!   it completes however many of the waiting clients go away; the task
//!   removes itself from the table when it ends, so a request that arrives
//!   after that runs a new query and never gets an older answer than one
//!   started after it arrived, except by joining one already running. A
//!   request that must see writes up to some instant (`min_as_of`) joins
//!   only a query started after it; otherwise it starts one of its own,
//!   which later requests join.
//! - Every answer carries the time its query started (its `as_of`).
//! - At most `max_concurrency` aggregations run at once per process. A
//!   query waits at most `queue_wait` for a slot, then fails as
//!   `database_busy` (503 with `Retry-After`).
//! - Every query has a deadline: MongoDB's `maxTimeMS`, and a timer here
//!   half a second later for a MongoDB that does not answer at all; past
//!   it the answer is `database_timeout` (504).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use callboard_domain::{GroupedBody, GroupedRequest, TenantId};
use callboard_store::LiveQuery;
use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::Semaphore;

use crate::error::{ApiError, ErrorCode};
use crate::metrics::Metrics;

/// How a shared live query failed, as every request that waited on it
/// reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Busy,
    Timeout,
    Unavailable,
    Internal,
}

impl From<Failure> for ApiError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Busy => {
                ApiError::new(ErrorCode::DatabaseBusy, "too many live queries are running; try again shortly")
            }
            Failure::Timeout => ApiError::new(ErrorCode::DatabaseTimeout, "the live query ran out of time"),
            Failure::Unavailable => {
                ApiError::new(ErrorCode::DatabaseUnavailable, "the database is unavailable; try again shortly")
            }
            Failure::Internal => ApiError::new(ErrorCode::Internal, "internal error"),
        }
    }
}

/// How long after `maxTimeMS` callboard's own timer gives up.
const TIMER_GRACE: Duration = Duration::from_millis(500);

/// A query under way, in the table.
#[derive(Clone)]
struct Running {
    id: u64,
    /// When its task was spawned (ms): the query starts no earlier.
    spawned_ms: u64,
    answer: Shared<BoxFuture<'static, Answer>>,
}

type Table = Arc<Mutex<HashMap<Key, Running>>>;

/// Removes a running query from the table when dropped (unless a newer
/// query for the same key has taken its place).
struct Leave {
    running: Table,
    key: Key,
    id: u64,
}

impl Drop for Leave {
    fn drop(&mut self) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if running.get(&self.key).is_some_and(|r| r.id == self.id) {
            running.remove(&self.key);
        }
    }
}

/// Which running query a request may join.
#[derive(Debug, Clone, Copy)]
pub enum Joinable {
    Any,
    /// One spawned at this ms or later (so it started after a write
    /// committed before then).
    SpawnedFromMs(u64),
    /// One spawned since [`LiveGate::now`] said this (after the request
    /// arrived, so after every write acknowledged before it was sent).
    SpawnedSince(u64),
}

impl Joinable {
    fn allows(self, r: &Running) -> bool {
        match self {
            Joinable::Any => true,
            Joinable::SpawnedFromMs(ms) => r.spawned_ms >= ms,
            Joinable::SpawnedSince(id) => r.id >= id,
        }
    }
}

/// The body, and when its query started (ms since the epoch).
type Answer = Result<(GroupedBody, u64), Failure>;
type Key = (TenantId, GroupedRequest);

/// The bounds of the live path.
#[derive(Debug, Clone, Copy)]
pub struct LiveLimits {
    pub max_concurrency: usize,
    pub queue_wait: Duration,
    pub timeout: Duration,
}

/// Live queries, coalesced and bounded. Cheap to clone (shared state).
#[derive(Clone)]
pub struct LiveGate {
    live: LiveQuery,
    limits: LiveLimits,
    slots: Arc<Semaphore>,
    running: Table,
    ids: Arc<std::sync::atomic::AtomicU64>,
    metrics: Metrics,
}

impl LiveGate {
    pub fn new(live: LiveQuery, limits: LiveLimits, metrics: Metrics) -> Self {
        let live = live.with_max_time(limits.timeout);
        Self {
            slots: Arc::new(Semaphore::new(limits.max_concurrency)),
            live,
            limits,
            running: Arc::default(),
            ids: Arc::default(),
            metrics,
        }
    }

    pub fn query(&self) -> &LiveQuery {
        &self.live
    }

    /// Where the queries stand now: one spawned later has an id at least
    /// this ([`Joinable::SpawnedSince`]).
    pub fn now(&self) -> u64 {
        self.ids.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The live answer for `tenant`, and when its query started: the
    /// running one for the same parameters if `join` allows it, else a
    /// new one.
    pub async fn grouped(
        &self,
        tenant: TenantId,
        request: &GroupedRequest,
        join: Joinable,
    ) -> Result<(GroupedBody, u64), ApiError> {
        let key = (tenant, *request);
        let answer = {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            match running.get(&key) {
                Some(r) if join.allows(r) => {
                    self.metrics.observe_live_coalesced();
                    r.answer.clone()
                }
                _ => {
                    // Spawned while the table is locked: the task's own
                    // removal waits for this insert.
                    let gate = self.clone();
                    let id = self.ids.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let spawned_ms = crate::freshness::now_ms();
                    let task = tokio::spawn(async move {
                        // Leaves the table however the task ends (done,
                        // panicked, or cancelled with its runtime), so no
                        // finished answer is ever joined.
                        let _leave = Leave { running: gate.running.clone(), key, id };
                        gate.run(key).await
                    });
                    let answer = async move { task.await.unwrap_or(Err(Failure::Internal)) }.boxed().shared();
                    running.insert(key, Running { id, spawned_ms, answer: answer.clone() });
                    answer
                }
            }
        };
        Ok(answer.await?)
    }

    async fn run(&self, (tenant, request): Key) -> Answer {
        let Ok(Ok(_slot)) = tokio::time::timeout(self.limits.queue_wait, self.slots.acquire()).await else {
            self.metrics.observe_live_rejected("busy");
            tracing::warn!(tenant = %tenant, "live query refused: every slot busy");
            return Err(Failure::Busy);
        };
        self.metrics.observe_live_started();
        let started_ms = crate::freshness::now_ms();
        // MongoDB's own limit (`maxTimeMS`) fires first and stops the
        // server's work; the timer, a little later, holds when MongoDB does
        // not answer at all.
        match tokio::time::timeout(self.limits.timeout + TIMER_GRACE, self.live.grouped(tenant, &request)).await {
            Ok(Ok(body)) => Ok((body, started_ms)),
            Ok(Err(e)) if e.is_time_limit() => {
                self.metrics.observe_live_rejected("timeout");
                tracing::warn!(tenant = %tenant, "live query exceeded maxTimeMS");
                Err(Failure::Timeout)
            }
            Err(_) => {
                self.metrics.observe_live_rejected("timeout");
                tracing::warn!(tenant = %tenant, timeout_ms = self.limits.timeout.as_millis() as u64, "live query timed out");
                Err(Failure::Timeout)
            }
            Ok(Err(e)) if e.is_unavailable() => {
                tracing::warn!(error = %e, "MongoDB unavailable");
                Err(Failure::Unavailable)
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "live query failed");
                Err(Failure::Internal)
            }
        }
    }
}
