//! `POST /admin/cache/verify`: one verification now
//! ([`callboard_reconcile`]), with this process's live gate and watermarks.

use callboard_domain::{GroupedBody, GroupedRequest, Limit, MinAsOf, TenantId, Watermark};
use callboard_readmodel::keys::Partitioning;
use callboard_reconcile::{Source, Verdict, Verifier, VerifyError};
use tokio::time::Instant;

use crate::error::{ApiError, ErrorCode};
use crate::live::Joinable;
use crate::state::AppState;

/// MongoDB through the live gate (its concurrency limit and deadline), the
/// projector's progress through the process's watermarks.
struct Api<'a>(&'a AppState);

impl Source for Api<'_> {
    type Error = ApiError;

    async fn live(&self, tenant: TenantId, request: &GroupedRequest, started_ms: u64) -> Result<GroupedBody, ApiError> {
        Ok(self.0.live.grouped(tenant, request, Joinable::SpawnedFromMs(started_ms)).await?.0)
    }

    async fn mark(&self, tenant: TenantId) -> Watermark {
        self.0.watermarks.of(tenant)
    }

    async fn wait_for(&self, tenant: TenantId, min: MinAsOf, deadline: Instant) -> Option<Watermark> {
        self.0.watermarks.wait_for(tenant, min, deadline).await
    }
}

/// Compares `tenant`'s cached answer with the live one; repairs drift.
pub async fn verify(state: &AppState, tenant: TenantId) -> Result<Verdict, ApiError> {
    let calls = Limit::new(i64::from(state.verify_calls), state.verify_calls)?;
    let source = Api(state);
    let verifier = Verifier::new(&state.cache, &source, Partitioning::new(state.partitions), calls);
    verifier.verify(tenant).await.map_err(|e| match e {
        VerifyError::Live(e) => e,
        VerifyError::ReadModel(e) => {
            tracing::warn!(error = %e, "verification: the read model is unavailable");
            ApiError::new(ErrorCode::CacheUnavailable, "the read model is unavailable; try again shortly")
        }
        VerifyError::Json(e) => {
            tracing::error!(error = %e, "verification: an answer is not JSON");
            ApiError::new(ErrorCode::Internal, "internal error")
        }
    })
}
