//! Self-verification: a tenant's cached answer compared with MongoDB's,
//! at one moment, and repaired when they differ. Used by
//! `POST /admin/cache/verify` and by the projectors' background verifier
//! (`reconcile.interval_s`).
//!
//! A change in flight is not drift. A round reads the versions of
//! everything the tenant's answer shows (its write version, the stamps of
//! its statuses, of the global statuses and of the users), then the cached
//! answer, runs the live query (it returns at `E`; it reads in several
//! trips without a snapshot, so it may show anything committed until
//! `E`), waits until the partition has applied everything committed
//! before `E`, and reads the versions again. Unchanged, no write landed
//! between the cached read and then, so the cached answer held everything
//! committed before `E`, and nothing later: exactly what the live query
//! could see, and any difference is drift. A round whose versions moved is
//! tried again, [`ATTEMPTS`] times; a tenant that never holds still is
//! reported as not compared (`equal: null`), not as drift.
//!
//! The cached answer is read without the process's copies of statuses and
//! users ([`ReadModel::without_local_copies`]), so a hash lost in Redis
//! under an unchanged stamp is seen. Drift invalidates the tenant and
//! queues its warm (it is answered live until the warm lands); a
//! difference in the shared data (users, statuses: [`Kind::USER`],
//! [`Kind::STATUS`]), which a tenant's warm does not store, also queues a
//! rebuild of the partitions holding it ([`Command::Rebuild`]).
//!
//! [`Command::Rebuild`]: callboard_readmodel::Command::Rebuild

mod compare;

use std::future::Future;
use std::time::Duration;

use callboard_domain::{GroupedBody, GroupedRequest, Limit, MinAsOf, TenantId, Watermark};
use callboard_readmodel::keys::Partitioning;
use callboard_readmodel::{Miss, Read, ReadModel, ReadModelError};
use serde::Serialize;
use serde_json::Value;
use tokio::time::Instant;

pub use compare::{compare, Difference, Kind};

/// Rounds tried for one in which the tenant's answer holds still.
pub const ATTEMPTS: usize = 5;
/// How long a round waits for the partition to pass the live answer.
pub const CATCH_UP: Duration = Duration::from_secs(2);

/// What a verification needs besides Redis: MongoDB's answer, and how far
/// the projector has come.
pub trait Source: Sync {
    type Error: Send;
    /// Called before each round reads anything (a budget may wait here,
    /// rather than between the cached read and the live query).
    fn round(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// The live answer, from a query that started at `started_ms` or later.
    fn live(
        &self,
        tenant: TenantId,
        request: &GroupedRequest,
        started_ms: u64,
    ) -> impl Future<Output = Result<GroupedBody, Self::Error>> + Send;
    /// What `tenant`'s cached answers can claim now.
    fn mark(&self, tenant: TenantId) -> impl Future<Output = Watermark> + Send;
    /// Waits until `tenant`'s partition covers `min`, until `deadline` at
    /// most: the covering watermark, or `None` when time ran out.
    fn wait_for(
        &self,
        tenant: TenantId,
        min: MinAsOf,
        deadline: Instant,
    ) -> impl Future<Output = Option<Watermark>> + Send;
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError<E> {
    #[error("the read model is unavailable: {0}")]
    ReadModel(#[from] ReadModelError),
    #[error("the live answer failed")]
    Live(E),
    #[error("an answer is not JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// What a verification found.
#[derive(Debug, Serialize)]
pub struct Verdict {
    pub tenant_id: i64,
    /// `warm` (compared); not compared: why the cache does not answer
    /// (`cold`, `quarantined`, `short_window`, `format`, `rebuilding`),
    /// `changing`
    /// (written to in every round) or `projector_behind` (the partition
    /// did not pass the live answer in time).
    pub state: &'static str,
    /// Whether the cached answer equals MongoDB's; none when not compared.
    pub equal: Option<bool>,
    pub differences: Vec<Difference>,
    /// The cached answer's `as_of` (RFC 3339), if one was compared.
    pub as_of: Option<String>,
    /// A repair (invalidation and warm) was started.
    pub repaired: bool,
}

/// Verifies tenants against MongoDB through `source`.
pub struct Verifier<'a, S> {
    cache: ReadModel,
    source: &'a S,
    partitioning: Partitioning,
    request: GroupedRequest,
}

impl<'a, S: Source> Verifier<'a, S> {
    /// Compares `calls` calls a status (the most a request can be served
    /// from the cache: `query.max_limit`, or `projector.doc_window` if
    /// smaller), with their details.
    pub fn new(cache: &ReadModel, source: &'a S, partitioning: Partitioning, calls: Limit) -> Self {
        Self {
            cache: cache.clone(),
            source,
            partitioning,
            request: GroupedRequest { limit: calls, include_enrichment: true, include_calls: true },
        }
    }

    /// Compares `tenant`'s cached answer with the live one; repairs drift.
    pub async fn verify(&self, tenant: TenantId) -> Result<Verdict, VerifyError<S::Error>> {
        let verdict = |state, equal, differences, as_of: Option<u64>| Verdict {
            tenant_id: tenant.get(),
            state,
            equal,
            differences,
            as_of: as_of.map(callboard_domain::rfc3339_ms),
            repaired: false,
        };
        // Copies of statuses and users last only one verification.
        let cache = self.cache.without_local_copies();
        for _ in 0..ATTEMPTS {
            self.source.round().await;
            let mark = self.source.mark(tenant).await;
            let before = cache.answer_versions(tenant).await?;
            let cached = match cache.grouped(tenant, &self.request).await {
                Ok(Read::Hit(body)) => Ok(serde_json::from_str::<Value>(body.as_str())?),
                Ok(Read::Miss(Miss::Raced)) => continue,
                Ok(Read::Miss(miss)) => return Ok(verdict(miss.name(), None, Vec::new(), None)),
                // A value Redis holds but that cannot be read (a document
                // missing from its window): drift, if it holds still.
                Err(ReadModelError::Corrupt { key, detail }) => Err((key, detail)),
                Err(e) => return Err(e.into()),
            };
            let started = now_ms();
            let live = self.source.live(tenant, &self.request, started).await.map_err(VerifyError::Live)?;
            // The live query reads in several trips, without a snapshot:
            // it may show anything committed until it returned.
            let ended = now_ms();
            let live: Value = serde_json::from_str(live.as_str())?;
            let deadline = Instant::now() + CATCH_UP;
            if self.source.wait_for(tenant, MinAsOf::Millis(ended), deadline).await.is_none() {
                // Another round would only query MongoDB again while the
                // projector is behind.
                tracing::info!(tenant = %tenant, "not verified: the projector is behind");
                return Ok(verdict("projector_behind", None, Vec::new(), None));
            }
            if cache.answer_versions(tenant).await? != before {
                continue; // written meanwhile: not one moment
            }
            let differences = match &cached {
                Ok(cached) => compare(cached, &live),
                Err((key, detail)) => vec![Difference {
                    // The statuses (shared or the tenant's), or a call.
                    kind: if key == "statuses" { Kind::STATUS } else { Kind::DOCUMENT },
                    status_id: Value::Null,
                    detail: format!("the cached answer cannot be read: {key}: {detail}"),
                }],
            };
            if !differences.is_empty() {
                self.repair(tenant, &differences).await?;
            }
            // Counted after the repair, which must not wait on it.
            if let Err(e) = cache.record_verification(differences.iter().map(|d| d.kind)).await {
                tracing::warn!(error = %e, "verification: could not count it");
            }
            if differences.is_empty() {
                return Ok(verdict("warm", Some(true), differences, Some(mark.at_ms)));
            }
            let mut v = verdict("warm", Some(false), differences, Some(mark.at_ms));
            v.repaired = true;
            return Ok(v);
        }
        tracing::info!(tenant = %tenant, "not verified: the tenant kept changing");
        Ok(verdict("changing", None, Vec::new(), None))
    }

    /// Answers `tenant` live until it is warm again; stores the shared data
    /// again when it may be what differs.
    async fn repair(&self, tenant: TenantId, differences: &[Difference]) -> Result<(), ReadModelError> {
        tracing::warn!(tenant = %tenant, differences = ?differences,
            "the cached answer differs from MongoDB's: invalidating the tenant and warming it again");
        // Shared data differs: the partitions holding it are rebuilt (the
        // users and global statuses are partition 0's, a tenant's own
        // statuses its partition's). Queued before the tenant's warm; a
        // rebuild restores the warms queued meanwhile.
        let mut rebuild = std::collections::BTreeSet::new();
        for d in differences {
            match d.kind {
                Kind::USER => rebuild.insert(0),
                Kind::STATUS => rebuild.insert(self.partitioning.of(tenant)) | rebuild.insert(0),
                _ => false,
            };
        }
        for p in &rebuild {
            self.cache.request_rebuild(*p).await?;
        }
        if !rebuild.is_empty() {
            tracing::warn!(tenant = %tenant, partitions = ?rebuild, "shared data differs from MongoDB's: rebuilding");
        }
        self.cache.invalidate(tenant).await?;
        self.cache.request_warm(tenant).await?;
        Ok(())
    }
}

/// Watermarks read from Redis at each call (for a process that keeps no
/// copy of its own, such as a projector).
pub struct RedisMarks {
    pub cache: ReadModel,
    pub partitioning: Partitioning,
}

impl RedisMarks {
    /// What `tenant`'s answers can claim now (the zero watermark when
    /// Redis cannot be read: it vouches for nothing).
    pub async fn of(&self, tenant: TenantId) -> Watermark {
        match self.cache.watermarks(self.partitioning.count()).await {
            Ok(marks) => self.partitioning.claim(tenant, &marks),
            Err(_) => Watermark::default(),
        }
    }

    /// Polls every 20 ms until `tenant`'s claim covers `min`, until `deadline`.
    pub async fn wait_for(&self, tenant: TenantId, min: MinAsOf, deadline: Instant) -> Option<Watermark> {
        loop {
            let w = self.of(tenant).await;
            if w.covers(min) {
                return Some(w);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Now, in ms since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
