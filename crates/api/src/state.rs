use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::error::{ApiError, ErrorCode};
use crate::live::LiveGate;
use crate::metrics::Metrics;
use callboard_domain::{GroupedBody, GroupedRequest, TenantId};
use callboard_readmodel::{Miss, Read, ReadModel};

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    pub live: LiveGate,
    pub cache: ReadModel,
    pub metrics: Metrics,
    /// Redis was last seen with `maxmemory-policy noeviction` everywhere.
    /// While not, the cache is not trusted: every answer is live.
    pub noeviction: Arc<AtomicBool>,
    /// Set on SIGTERM: `/readyz` fails while requests are still served.
    pub draining: Arc<AtomicBool>,
    /// The most calls one answer may show (`query.max_response_calls`).
    pub max_response_calls: usize,
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    Miss,
}

impl CacheOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Miss => "miss",
        }
    }
}

impl AppState {
    /// The grouped response: from Redis when the tenant is warm; otherwise
    /// live from MongoDB, after queueing a warm of the tenant (once, however
    /// many requests see it cold). `bypass_cache` forces the live answer.
    /// A Redis failure degrades to the live answer rather than an error.
    pub async fn grouped(
        &self,
        tenant: TenantId,
        request: &GroupedRequest,
        bypass_cache: bool,
    ) -> Result<(GroupedBody, CacheOutcome), ApiError> {
        let (body, outcome) = self.answer(tenant, request, bypass_cache).await?;
        if body.calls() > self.max_response_calls {
            return Err(ApiError::new(
                ErrorCode::ResponseTooLarge,
                format!(
                    "this answer would show {} calls, more than the {} allowed (query.max_response_calls): ask for \
                     a lower limit, or include_calls=false for counts only",
                    body.calls(),
                    self.max_response_calls
                ),
            ));
        }
        Ok((body, outcome))
    }

    async fn answer(
        &self,
        tenant: TenantId,
        request: &GroupedRequest,
        bypass_cache: bool,
    ) -> Result<(GroupedBody, CacheOutcome), ApiError> {
        let started = Instant::now();
        let reason = if bypass_cache {
            "bypass"
        } else if !self.noeviction.load(Ordering::Relaxed) {
            "redis_may_evict"
        } else {
            match self.cache.grouped(tenant, request).await {
                Ok(Read::Hit(response)) => {
                    self.metrics.observe_grouped(CacheOutcome::Hit, started.elapsed());
                    return Ok((response, CacheOutcome::Hit));
                }
                Ok(Read::Miss(miss)) => {
                    // A state of another format is replaced by a warm too.
                    if matches!(miss, Miss::Cold | Miss::Format) {
                        match self.cache.request_warm(tenant).await {
                            Ok(Some(epoch)) => tracing::info!(tenant = %tenant, epoch, "tenant cold: warm queued"),
                            Ok(None) => {}
                            Err(e) => tracing::warn!(error = %e, "could not queue a warm"),
                        }
                    }
                    miss.name()
                }
                Err(e) => {
                    tracing::warn!(error = %e, "read model unavailable; answering live");
                    "redis_error"
                }
            }
        };
        tracing::debug!(tenant = %tenant, reason, "answering live");
        tracing::Span::current().record("miss_reason", reason);
        self.metrics.observe_miss(reason);
        let response = self.live.grouped(tenant, request).await?;
        self.metrics.observe_grouped(CacheOutcome::Miss, started.elapsed());
        Ok((response, CacheOutcome::Miss))
    }
}
