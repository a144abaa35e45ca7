//! The background verifier: each partition's leader checks the
//! partition's warm tenants against MongoDB ([`callboard_reconcile`]),
//! every one at least once per `reconcile.interval_s`, spread over the
//! interval, with at most `reconcile.max_queries_per_s` live queries a
//! second from this process. Drift is counted, logged and repaired by the
//! verification itself. It runs beside the leader's loop, not in it: a
//! verification waits for the partition to apply what its live query saw.

use std::sync::Arc;
use std::time::Duration;

use callboard_domain::{GroupedBody, GroupedRequest, Limit, MinAsOf, TenantId, Watermark};
use callboard_readmodel::keys::Partitioning;
use callboard_readmodel::{ReadModel, TenantState};
use callboard_reconcile::{RedisMarks, Source, Verifier};
use callboard_store::{LiveQuery, StoreError};
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// How the background verifier runs (`[reconcile]`).
#[derive(Debug, Clone)]
pub struct ReconcileConfig {
    /// Every warm tenant is checked at least once per interval (if the
    /// query cap allows).
    pub interval: Duration,
    /// Live queries a second this process may run for it.
    pub max_queries_per_s: f64,
    /// Calls a status compared ([`Verifier::new`]).
    pub calls: Limit,
    /// `maxTimeMS` of its live queries.
    pub live_timeout: Duration,
}

/// The process's query budget: one query per `gap`, shared by every
/// partition it leads.
pub(crate) struct Pace {
    gap: Duration,
    next: tokio::sync::Mutex<Instant>,
}

impl Pace {
    pub(crate) fn new(per_s: f64) -> Self {
        Self { gap: Duration::from_secs_f64(1.0 / per_s.max(0.001)), next: tokio::sync::Mutex::new(Instant::now()) }
    }

    /// Waits for the next free slot.
    async fn take(&self) {
        let mut next = self.next.lock().await;
        tokio::time::sleep_until(*next).await;
        *next = Instant::now().max(*next) + self.gap;
    }
}

/// MongoDB within the budget; the projector's progress from Redis.
struct Mongo {
    live: LiveQuery,
    marks: RedisMarks,
    pace: Arc<Pace>,
}

impl Source for Mongo {
    type Error = StoreError;

    /// A round's slot in the budget, before it reads anything: a wait
    /// between the cached read and the live query would widen the round
    /// and make busy tenants come out `changing`.
    async fn round(&self) {
        self.pace.take().await;
    }

    async fn live(
        &self,
        tenant: TenantId,
        request: &GroupedRequest,
        _started_ms: u64,
    ) -> Result<GroupedBody, StoreError> {
        self.live.grouped(tenant, request).await
    }

    async fn mark(&self, tenant: TenantId) -> Watermark {
        self.marks.of(tenant).await
    }

    async fn wait_for(&self, tenant: TenantId, min: MinAsOf, deadline: Instant) -> Option<Watermark> {
        self.marks.wait_for(tenant, min, deadline).await
    }
}

/// Checks `partition`'s warm tenants until aborted (with the leadership).
pub(crate) async fn run(
    cache: ReadModel,
    live: LiveQuery,
    partitioning: Partitioning,
    partition: u32,
    config: ReconcileConfig,
    pace: Arc<Pace>,
) {
    let source = Mongo {
        live: live.with_max_time(config.live_timeout),
        marks: RedisMarks { cache: cache.clone(), partitioning },
        pace,
    };
    let verifier = Verifier::new(&cache, &source, partitioning, config.calls);
    let mut late = false;
    loop {
        let cycle = Instant::now();
        let tenants: Vec<TenantId> = match cache.tenant_states().await {
            Ok(states) => states
                .into_iter()
                .filter(|(t, s)| matches!(s, TenantState::Warm(_)) && partitioning.of(*t) == partition)
                .map(|(t, _)| t)
                .collect(),
            Err(e) => {
                warn!(error = %e, "verifier: cannot list the warm tenants");
                Vec::new()
            }
        };
        let n = tenants.len() as u32;
        for (i, tenant) in tenants.into_iter().enumerate() {
            // Spread over the interval: tenant i at i/n of it.
            tokio::time::sleep_until(cycle + config.interval * i as u32 / n).await;
            match verifier.verify(tenant).await {
                Ok(v) if v.equal == Some(true) => debug!(tenant = %tenant, "verified: equal to MongoDB"),
                // Drift is logged (and repaired) by the verification.
                Ok(v) if v.equal == Some(false) => {}
                Ok(v) => debug!(tenant = %tenant, state = v.state, "not verified"),
                Err(e) => warn!(tenant = %tenant, error = %e, "verification failed"),
            }
        }
        let took = cycle.elapsed();
        if took > config.interval && !late {
            warn!(tenants = n, took_s = took.as_secs(), interval_s = config.interval.as_secs(),
                "verifier: checking every warm tenant takes longer than reconcile.interval_s at reconcile.max_queries_per_s");
        } else if late && took <= config.interval {
            info!(tenants = n, "verifier: back within reconcile.interval_s");
        }
        late = took > config.interval;
        // With nothing warm, look again soon: a tenant warmed meanwhile is
        // then first checked within about an interval, not two.
        let pause = if n == 0 { config.interval.min(Duration::from_secs(10)) } else { config.interval };
        tokio::time::sleep_until(cycle + pause).await;
    }
}
