//! Verification of a tenant's cached answer against MongoDB
//! (`POST /admin/cache/verify`): every status's count, the order of its
//! first calls, and their documents, as a request with the largest
//! `limit` would show them.
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
//! reported as not compared (`equal: null`), not as drift. Drift
//! invalidates the tenant and queues its warm (it is answered live until
//! the warm lands).

use std::time::Duration;

use callboard_domain::{GroupedRequest, Limit, MinAsOf, TenantId};
use callboard_readmodel::{Miss, Read};
use serde::Serialize;
use serde_json::Value;

use crate::error::{ApiError, ErrorCode};
use crate::freshness::now_ms;
use crate::live::Joinable;
use crate::state::AppState;

/// Rounds tried for one in which the tenant's answer holds still.
const ATTEMPTS: usize = 5;
/// How long a round waits for the partition to pass the live answer.
const CATCH_UP: Duration = Duration::from_secs(2);

/// One difference between the cached and the live answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// `status` (a status shown by one side only), `count`, `order` (the
    /// first calls' ids), `document` (a call shown differently).
    pub kind: &'static str,
    pub status_id: Value,
    pub detail: String,
}

/// What a verification found.
#[derive(Debug, Serialize)]
pub struct Verdict {
    pub tenant_id: i64,
    /// `warm` (compared); not compared: why the cache does not answer
    /// (`cold`, `quarantined`, `short_window`, `format`), `changing`
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

/// Compares `tenant`'s cached answer with the live one; repairs drift.
pub async fn verify(state: &AppState, tenant: TenantId, calls: u32) -> Result<Verdict, ApiError> {
    let limit = Limit::new(i64::from(calls), calls)?;
    let request = GroupedRequest { limit, include_enrichment: true, include_calls: true };
    let verdict = |state_name, equal, differences, as_of: Option<u64>| Verdict {
        tenant_id: tenant.get(),
        state: state_name,
        equal,
        differences,
        as_of: as_of.map(callboard_domain::rfc3339_ms),
        repaired: false,
    };
    let mut behind = false;
    for _ in 0..ATTEMPTS {
        let mark = state.watermarks.of(tenant);
        let before = state.cache.answer_versions(tenant).await.map_err(unavailable)?;
        let cached = match cached(state, tenant, &request).await? {
            Ok(cached) => cached,
            Err(Miss::Raced) => continue,
            Err(miss) => return Ok(verdict(miss.name(), None, Vec::new(), None)),
        };
        let started = now_ms();
        let (live, _) = state.live.grouped(tenant, &request, Joinable::SpawnedFromMs(started)).await?;
        // The live query reads in several trips, without a snapshot: it
        // may show anything committed until it returned.
        let ended = now_ms();
        let live: Value = serde_json::from_str(&live.into_string()).map_err(internal)?;
        if caught_up(state, tenant, ended).await.is_none() {
            behind = true;
            continue;
        };
        if state.cache.answer_versions(tenant).await.map_err(unavailable)? != before {
            continue; // written meanwhile: not one moment
        }
        let differences = compare(&cached, &live);
        if differences.is_empty() {
            return Ok(verdict("warm", Some(true), differences, Some(mark.at_ms)));
        }
        for d in &differences {
            state.metrics.observe_drift(d.kind);
        }
        tracing::warn!(tenant = %tenant, differences = ?differences,
            "the cached answer differs from MongoDB's: invalidating the tenant and warming it again");
        state.cache.invalidate(tenant).await.map_err(unavailable)?;
        state.cache.request_warm(tenant).await.map_err(unavailable)?;
        let mut v = verdict("warm", Some(false), differences, Some(mark.at_ms));
        v.repaired = true;
        return Ok(v);
    }
    if behind {
        tracing::info!(tenant = %tenant, "not verified: the projector is behind");
        return Ok(verdict("projector_behind", None, Vec::new(), None));
    }
    tracing::info!(tenant = %tenant, "not verified: the tenant kept changing");
    Ok(verdict("changing", None, Vec::new(), None))
}

/// Waits (up to [`CATCH_UP`]) until the tenant's partition has applied
/// everything committed before `ms`.
async fn caught_up(state: &AppState, tenant: TenantId, ms: u64) -> Option<callboard_domain::Watermark> {
    let deadline = tokio::time::Instant::now() + CATCH_UP;
    state.watermarks.wait_for(tenant, MinAsOf::Millis(ms), deadline).await
}

/// The cached answer as JSON, or why there is none.
async fn cached(state: &AppState, tenant: TenantId, request: &GroupedRequest) -> Result<Result<Value, Miss>, ApiError> {
    match state.cache.grouped(tenant, request).await.map_err(unavailable)? {
        Read::Hit(body) => Ok(Ok(serde_json::from_str(&body.into_string()).map_err(internal)?)),
        Read::Miss(miss) => Ok(Err(miss)),
    }
}

fn unavailable(e: callboard_readmodel::ReadModelError) -> ApiError {
    tracing::warn!(error = %e, "verification: the read model is unavailable");
    ApiError::new(ErrorCode::CacheUnavailable, "the read model is unavailable; try again shortly")
}

fn internal(e: serde_json::Error) -> ApiError {
    tracing::error!(error = %e, "verification: an answer is not JSON");
    ApiError::new(ErrorCode::Internal, "internal error")
}

/// The differences between two grouped answers, status by status.
pub fn compare(cached: &Value, live: &Value) -> Vec<Difference> {
    let groups = |v: &Value| -> Vec<Value> { v["data"].as_array().cloned().unwrap_or_default() };
    let (cached, live) = (groups(cached), groups(live));
    let mut out = Vec::new();
    let find = |groups: &[Value], id: &Value| groups.iter().find(|g| g["id"] == *id).cloned();
    for g in &live {
        let Some(c) = find(&cached, &g["id"]) else {
            out.push(Difference {
                kind: "status",
                status_id: g["id"].clone(),
                detail: "missing from the cache".into(),
            });
            continue;
        };
        if c["total_calls"] != g["total_calls"] {
            out.push(Difference {
                kind: "count",
                status_id: g["id"].clone(),
                detail: format!("cached {} calls, MongoDB {}", c["total_calls"], g["total_calls"]),
            });
        }
        let ids = |g: &Value| -> Vec<Value> {
            g["calls"].as_array().map(|calls| calls.iter().map(|c| c["id"].clone()).collect()).unwrap_or_default()
        };
        if ids(&c) != ids(g) {
            out.push(Difference {
                kind: "order",
                status_id: g["id"].clone(),
                detail: format!("cached first calls {:?}, MongoDB {:?}", ids(&c), ids(g)),
            });
        } else if let (Some(cc), Some(lc)) = (c["calls"].as_array(), g["calls"].as_array()) {
            for (a, b) in cc.iter().zip(lc) {
                if a != b {
                    out.push(Difference {
                        kind: "document",
                        status_id: g["id"].clone(),
                        detail: format!("call {} differs", b["id"]),
                    });
                }
            }
        }
        if c != *g && !out.iter().any(|d| d.status_id == g["id"]) {
            out.push(Difference {
                kind: "status",
                status_id: g["id"].clone(),
                detail: "the status itself differs".into(),
            });
        }
    }
    for c in &cached {
        if find(&live, &c["id"]).is_none() {
            out.push(Difference { kind: "status", status_id: c["id"].clone(), detail: "not in MongoDB".into() });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn differences_are_named_by_kind_and_status() {
        let call = |id: i64, subject: &str| json!({"id": id, "subject": subject});
        let answer = |groups: Value| json!({"data": groups});
        let live = answer(json!([
            {"id": 1, "name": "Open", "total_calls": 2, "calls": [call(5, "a"), call(4, "b")]},
            {"id": 2, "name": "Done", "total_calls": 1, "calls": [call(3, "c")]},
        ]));
        assert!(compare(&live, &live).is_empty());
        let cached = answer(json!([
            {"id": 1, "name": "Open", "total_calls": 1, "calls": [call(5, "a")]},
            {"id": 3, "name": "Lost", "total_calls": 0, "calls": []},
        ]));
        let kinds: Vec<(&str, Value)> = compare(&cached, &live).into_iter().map(|d| (d.kind, d.status_id)).collect();
        assert_eq!(kinds, [("count", json!(1)), ("order", json!(1)), ("status", json!(2)), ("status", json!(3))]);
        let renamed = answer(json!([
            {"id": 1, "name": "Open", "total_calls": 2, "calls": [call(5, "a"), call(4, "x")]},
            {"id": 2, "name": "Finished", "total_calls": 1, "calls": [call(3, "c")]},
        ]));
        let kinds: Vec<&str> = compare(&renamed, &live).into_iter().map(|d| d.kind).collect();
        assert_eq!(kinds, ["document", "status"]);
    }
}
