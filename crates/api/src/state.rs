use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{ApiError, ErrorCode};
use crate::freshness::{now_ms, Watermarks};
use crate::live::{Joinable, LiveGate};
use crate::metrics::Metrics;
use callboard_domain::{Freshness, GroupedBody, GroupedRequest, MinAsOf, TenantId, Watermark};
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
    pub watermarks: Watermarks,
    /// How long a request waits for its `min_as_of` (`query.max_wait_ms`).
    pub max_wait: Duration,
    /// `max_staleness_ms` for requests that give none
    /// (`query.max_staleness_ms`; none: unbounded).
    pub max_staleness_ms: Option<u64>,
    /// `projector.partitions` and `projector.history_warn_share`, for the
    /// history window's report.
    pub partitions: u32,
    pub history_warn_share: f64,
    /// Verification compares this many calls a status: `query.max_limit`,
    /// or `projector.doc_window` if smaller (what the cache can show).
    pub verify_calls: u32,
}

/// An answer, where it came from, and how fresh it is: every change
/// committed before `as_of_ms` is reflected.
#[derive(Debug)]
pub struct Answer {
    pub body: GroupedBody,
    pub outcome: CacheOutcome,
    pub as_of_ms: u64,
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

/// Where a grouped answer may come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serve {
    /// The cache when it is fresh enough (an answer Redis's tracking
    /// vouches for with no round trip), else live.
    Cached,
    /// The cache as Redis is after this call began, else live: for a
    /// board that has just seen its version move, whose answer must show
    /// that version's data at least.
    CachedNow,
    /// Live, always (`Cache-Control: no-cache` from an operator).
    Live,
}

impl AppState {
    /// The grouped response: from Redis when the tenant is warm and the
    /// cache is as fresh as `freshness` asks; otherwise live from MongoDB,
    /// after queueing a warm of a cold tenant (once, however many requests
    /// see it cold). `serve` says whether the cache may answer. A Redis failure
    /// degrades to the live answer rather than an error.
    pub async fn grouped(
        &self,
        tenant: TenantId,
        request: &GroupedRequest,
        freshness: &Freshness,
        serve: Serve,
    ) -> Result<Answer, ApiError> {
        let answer = self.answer(tenant, request, freshness, serve).await?;
        if answer.body.calls() > self.max_response_calls {
            return Err(ApiError::new(
                ErrorCode::ResponseTooLarge,
                format!(
                    "this answer would show {} calls, more than the {} allowed (query.max_response_calls): ask for \
                     a lower limit, or include_calls=false for counts only",
                    answer.body.calls(),
                    self.max_response_calls
                ),
            ));
        }
        Ok(answer)
    }

    async fn answer(
        &self,
        tenant: TenantId,
        request: &GroupedRequest,
        freshness: &Freshness,
        serve: Serve,
    ) -> Result<Answer, ApiError> {
        let started = Instant::now();
        let arrived_ms = now_ms();
        let arrived_query = self.live.now();
        if let Some(MinAsOf::Millis(t)) = freshness.min_as_of {
            let ahead = t.saturating_sub(arrived_ms);
            if ahead > self.max_wait.as_millis() as u64 {
                return Err(ApiError::new(
                    ErrorCode::InvalidParameter,
                    format!(
                        "min_as_of is {ahead} ms in the future; it may be at most query.max_wait_ms ({} ms) ahead",
                        self.max_wait.as_millis()
                    ),
                ));
            }
        }
        let reason = if serve == Serve::Live {
            "bypass"
        } else if !self.noeviction.load(Ordering::Relaxed) {
            "redis_may_evict"
        } else {
            // Read before the data: a lower bound of what the data reflects
            // (an answer reused with no round trip reflects Redis at a
            // moment after the copy was read: `grouped_not_before`). A
            // `min_as_of` request reads the label, so that it sees every
            // write acknowledged before it arrived.
            let (mark, read) = self.watermarks.read_of(tenant);
            let not_before = (freshness.min_as_of.is_none() && serve == Serve::Cached).then_some(read);
            match self.cache.grouped_not_before(tenant, request, not_before).await {
                Ok(Read::Hit(body)) => match self.fresh_hit(tenant, request, freshness, mark, body, started).await {
                    Ok(answer) => {
                        self.metrics.observe_grouped(CacheOutcome::Hit, started.elapsed());
                        return Ok(answer);
                    }
                    Err(reason) => reason,
                },
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
        // A live answer reflects what was committed before its query
        // started: for `min_as_of`, one that started after the instant
        // asked for (waited for when it is just ahead), or after this
        // request arrived (an operationTime: the write was acknowledged
        // before the request was sent).
        let join = match freshness.min_as_of {
            Some(MinAsOf::Millis(t)) => {
                let ahead = (t + 1).saturating_sub(now_ms());
                if ahead > 0 {
                    tokio::time::sleep(Duration::from_millis(ahead)).await;
                }
                Joinable::SpawnedFromMs(t + 1)
            }
            Some(MinAsOf::ClusterTime(_)) => Joinable::SpawnedSince(arrived_query),
            None => Joinable::Any,
        };
        let (body, as_of_ms) = self.live.grouped(tenant, request, join).await?;
        self.metrics.observe_grouped(CacheOutcome::Miss, started.elapsed());
        Ok(Answer { body, outcome: CacheOutcome::Miss, as_of_ms })
    }

    /// A hit, if it is as fresh as `freshness` asks (waiting, up to
    /// `query.max_wait_ms` from `started`, for the projector to pass
    /// `min_as_of`, then reading again); else why it is not served.
    async fn fresh_hit(
        &self,
        tenant: TenantId,
        request: &GroupedRequest,
        freshness: &Freshness,
        mut mark: Watermark,
        mut body: GroupedBody,
        started: Instant,
    ) -> Result<Answer, &'static str> {
        if let Some(min) = freshness.min_as_of.filter(|min| !mark.covers(*min)) {
            let deadline = tokio::time::Instant::from_std(started + self.max_wait);
            let waited = Instant::now();
            let covered = self.watermarks.wait_for(tenant, min, deadline).await;
            self.metrics.observe_freshness_wait(covered.is_some(), waited.elapsed());
            mark = covered.ok_or("min_as_of")?;
            body = match self.cache.grouped(tenant, request).await {
                Ok(Read::Hit(body)) => body,
                // Gone cold meanwhile (an invalidation): its next request
                // queues the warm.
                Ok(Read::Miss(miss)) => return Err(miss.name()),
                Err(e) => {
                    tracing::warn!(error = %e, "read model unavailable; answering live");
                    return Err("redis_error");
                }
            };
        }
        let bound = freshness.max_staleness_ms.or(self.max_staleness_ms);
        if bound.is_some_and(|max| now_ms().saturating_sub(mark.at_ms) > max) {
            return Err("stale");
        }
        Ok(Answer { body, outcome: CacheOutcome::Hit, as_of_ms: mark.at_ms })
    }
}
