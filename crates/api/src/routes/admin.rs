//! Operators' endpoints; every one needs a token with `role: "admin"`.

use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::{web, FromRequest, HttpRequest, HttpResponse};
use callboard_domain::TenantId;
use serde::Deserialize;
use serde_json::json;

use crate::auth::Caller;
use crate::error::{ApiError, ErrorCode};
use crate::params::read_body;
use crate::state::AppState;

/// Proof that the caller holds an admin token.
pub struct Admin;

impl FromRequest for Admin {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let caller = Caller::from_request(req, payload);
        Box::pin(async move {
            let caller = caller.await?;
            if !caller.is_admin() {
                return Err(ApiError::new(ErrorCode::Forbidden, "this endpoint needs an admin token"));
            }
            tracing::info!(tenant = %caller.tenant, "admin request");
            Ok(Admin)
        })
    }
}

/// `{"tenant_id": 6}` or `{"all": true}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Tenant(TenantId),
    All,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetBody {
    tenant_id: Option<i64>,
    all: Option<bool>,
}

impl FromRequest for Target {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let req = req.clone();
        let payload = payload.take();
        Box::pin(async move { Target::parse(&read_body(&req, payload, 4096).await?) })
    }
}

impl Target {
    /// `{"tenant_id": N}` or `{"all": true}` (`"all": false` beside a
    /// tenant is allowed); anything else is 422.
    fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let parsed: TargetBody = serde_json::from_slice(body).map_err(|e| {
            ApiError::new(
                ErrorCode::InvalidParameter,
                format!("expected {{\"tenant_id\": N}} or {{\"all\": true}}: {e}"),
            )
        })?;
        match (parsed.tenant_id, parsed.all) {
            (Some(t), None | Some(false)) => TenantId::new(t)
                .map(Target::Tenant)
                .map_err(|e| ApiError::new(ErrorCode::InvalidParameter, e.to_string())),
            (None, Some(true)) => Ok(Target::All),
            _ => Err(ApiError::new(ErrorCode::InvalidParameter, "give exactly one of tenant_id or \"all\": true")),
        }
    }
}

/// `POST /admin/cache/warm`: 202 with a job id to follow.
#[utoipa::path(post, path = "/admin/cache/warm", tag = "admin",
    description = "Queues a warm (a full load from MongoDB) of one tenant or of every tenant with calls.",
    request_body = crate::openapi::Target,
    responses(
        (status = 202, description = "Queued", body = crate::openapi::WarmAccepted),
        (status = 401, description = "No token, or a bad or expired one (`missing_token`, `invalid_token`, `token_expired`); with `WWW-Authenticate`", body = crate::openapi::ErrorEnvelope), (status = 403, description = "Not an admin token (`forbidden`)", body = crate::openapi::ErrorEnvelope), (status = 422, description = "A bad parameter (`invalid_parameter`)", body = crate::openapi::ErrorEnvelope), (status = 503, description = "Redis is unavailable (`cache_unavailable`)", body = crate::openapi::ErrorEnvelope),
    ),
    security(("bearer" = [])))]
pub async fn warm(_: Admin, target: Target, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let tenants = match target {
        Target::Tenant(t) => vec![t],
        Target::All => state.live.query().tenants().await?,
    };
    let job = state.cache.create_job(tenants.len()).await.map_err(cache_error)?;
    for t in &tenants {
        state.cache.force_warm(*t, &job).await.map_err(cache_error)?;
    }
    Ok(HttpResponse::Accepted().json(json!({"job_id": job, "tenants": tenants.len()})))
}

/// `GET /admin/cache/warm/{job_id}`
#[utoipa::path(get, path = "/admin/cache/warm/{job_id}", tag = "admin",
    params(("job_id" = String, Path, description = "As `POST /admin/cache/warm` returned it")),
    responses(
        (status = 200, description = "The job's progress", body = crate::openapi::WarmJob),
        (status = 401, description = "No token, or a bad or expired one (`missing_token`, `invalid_token`, `token_expired`); with `WWW-Authenticate`", body = crate::openapi::ErrorEnvelope), (status = 403, description = "Not an admin token (`forbidden`)", body = crate::openapi::ErrorEnvelope),
        (status = 404, description = "No such job (`not_found`)", body = crate::openapi::ErrorEnvelope),
        (status = 503, description = "Redis is unavailable (`cache_unavailable`)", body = crate::openapi::ErrorEnvelope),
    ),
    security(("bearer" = [])))]
pub async fn warm_job(_: Admin, path: web::Path<String>, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    match state.cache.job(&path).await.map_err(cache_error)? {
        Some(job) => Ok(HttpResponse::Ok().json(job)),
        None => Err(ApiError::new(ErrorCode::NotFound, format!("no warm job {}", path.as_str()))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusQuery {
    tenant_id: Option<i64>,
}

/// `GET /admin/cache/status[?tenant_id=N]`
#[utoipa::path(get, path = "/admin/cache/status", tag = "admin",
    params(("tenant_id" = Option<i64>, Query, description = "One tenant; without it, every tenant not cold")),
    responses(
        (status = 200, description = "The read model's state", body = crate::openapi::CacheStatus),
        (status = 401, description = "No token, or a bad or expired one (`missing_token`, `invalid_token`, `token_expired`); with `WWW-Authenticate`", body = crate::openapi::ErrorEnvelope), (status = 403, description = "Not an admin token (`forbidden`)", body = crate::openapi::ErrorEnvelope), (status = 422, description = "A bad parameter (`invalid_parameter`)", body = crate::openapi::ErrorEnvelope), (status = 503, description = "Redis is unavailable (`cache_unavailable`)", body = crate::openapi::ErrorEnvelope),
    ),
    security(("bearer" = [])))]
pub async fn status(
    _: Admin,
    query: web::Query<StatusQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let states = state.cache.tenant_states().await.map_err(cache_error)?;
    let tenants: Vec<TenantId> = match query.tenant_id {
        Some(t) => vec![TenantId::new(t).map_err(|e| ApiError::new(ErrorCode::InvalidParameter, e.to_string()))?],
        None => states.keys().copied().collect(),
    };
    let progress = state.cache.progress().await.map_err(cache_error)?;
    let mut rows = Vec::with_capacity(tenants.len());
    for t in tenants {
        let s = states.get(&t).copied().unwrap_or(callboard_readmodel::TenantState::Cold);
        rows.push(json!({
            "tenant_id": t.get(),
            "state": s.name(),
            "calls": state.cache.tenant_calls(t).await.map_err(cache_error)?,
            "last_event_ms": state.cache.tenant_last_event_ms(t).await.map_err(cache_error)?,
            "lag_ms": progress.lag_ms,
        }));
    }
    let poison = state.cache.poison_events().await.map_err(cache_error)?;
    let poison: Vec<_> = poison.into_iter().filter(|p| query.tenant_id.is_none_or(|t| t == p.tenant_id)).collect();
    let history = state.cache.history_window(state.partitions, state.history_warn_share).await.map_err(cache_error)?;
    Ok(HttpResponse::Ok()
        .json(json!({"tenants": rows, "projector": progress, "poison_events": poison, "history": history})))
}

/// `POST /admin/cache/verify` with `{"tenant_id": N}`: compares the
/// tenant's cached answer with MongoDB's now, and repairs drift.
#[utoipa::path(post, path = "/admin/cache/verify", tag = "admin",
    description = "Compares the tenant's cached answer with MongoDB's at one moment; drift is counted and repaired.",
    request_body = crate::openapi::TenantTarget,
    responses(
        (status = 200, description = "The verdict", body = crate::openapi::Verdict),
        (status = 401, description = "No token, or a bad or expired one (`missing_token`, `invalid_token`, `token_expired`); with `WWW-Authenticate`", body = crate::openapi::ErrorEnvelope), (status = 403, description = "Not an admin token (`forbidden`)", body = crate::openapi::ErrorEnvelope), (status = 422, description = "A bad parameter (`invalid_parameter`)", body = crate::openapi::ErrorEnvelope), (status = 503, description = "Redis or MongoDB is unavailable (`cache_unavailable`, `database_unavailable`, `database_busy`)", body = crate::openapi::ErrorEnvelope),
        (status = 504, description = "The live query ran out of time (`database_timeout`)", body = crate::openapi::ErrorEnvelope),
    ),
    security(("bearer" = [])))]
pub async fn verify(_: Admin, target: Target, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let Target::Tenant(tenant) = target else {
        return Err(ApiError::new(ErrorCode::InvalidParameter, "verify one tenant at a time: {\"tenant_id\": N}"));
    };
    let verdict = crate::verify::verify(&state, tenant).await?;
    Ok(HttpResponse::Ok().json(verdict))
}

/// `POST /admin/cache/invalidate`
#[utoipa::path(post, path = "/admin/cache/invalidate", tag = "admin",
    description = "Drops one tenant's cached data, or every tenant's: answered live until warmed again.",
    request_body = crate::openapi::Target,
    responses(
        (status = 200, description = "The tenants invalidated", body = crate::openapi::Invalidated),
        (status = 401, description = "No token, or a bad or expired one (`missing_token`, `invalid_token`, `token_expired`); with `WWW-Authenticate`", body = crate::openapi::ErrorEnvelope), (status = 403, description = "Not an admin token (`forbidden`)", body = crate::openapi::ErrorEnvelope), (status = 422, description = "A bad parameter (`invalid_parameter`)", body = crate::openapi::ErrorEnvelope), (status = 503, description = "Redis is unavailable (`cache_unavailable`)", body = crate::openapi::ErrorEnvelope),
    ),
    security(("bearer" = [])))]
pub async fn invalidate(_: Admin, target: Target, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let tenants = match target {
        Target::Tenant(t) => {
            state.cache.invalidate(t).await.map_err(cache_error)?;
            vec![t]
        }
        Target::All => state.cache.invalidate_all().await.map_err(cache_error)?,
    };
    Ok(HttpResponse::Ok().json(json!({"invalidated": tenants.iter().map(|t| t.get()).collect::<Vec<_>>()})))
}

fn cache_error(e: callboard_readmodel::ReadModelError) -> ApiError {
    tracing::warn!(error = %e, "read model unavailable");
    ApiError::new(ErrorCode::CacheUnavailable, "the cache is unavailable; try again shortly")
}

/// Fuzzing of the admin bodies (`make fuzz` runs many more cases).
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    fn member() -> impl Strategy<Value = Option<Value>> {
        prop_oneof![
            Just(None),
            any::<i64>().prop_map(|n| Some(Value::from(n))),
            (-2i64..4).prop_map(|n| Some(Value::from(n))),
            any::<bool>().prop_map(|b| Some(Value::from(b))),
            Just(Some(Value::from(1e30))),
            Just(Some(Value::from(1.0))),
            "[ -~]{0,6}".prop_map(|s| Some(Value::from(s))),
            Just(Some(Value::Null)),
        ]
    }

    proptest! {
        #![proptest_config(crate::fuzz_config())]

        #[test]
        fn arbitrary_bytes_are_a_target_or_a_422(body in proptest::collection::vec(any::<u8>(), 0..100)) {
            if let Err(e) = Target::parse(&body) {
                prop_assert_eq!(e.code, ErrorCode::InvalidParameter);
            }
        }

        #[test]
        fn an_object_is_a_target_exactly_when_it_names_one(
            tenant in member(), all in member(), extra in proptest::option::of("[a-z]{1,5}"),
        ) {
            let mut object = serde_json::Map::new();
            if let Some(t) = tenant.clone() { object.insert("tenant_id".into(), t); }
            if let Some(a) = all.clone() { object.insert("all".into(), a); }
            if let Some(x) = &extra { object.insert(x.clone(), Value::from(1)); }
            let known = extra.as_deref().is_none_or(|x| x == "all" || x == "tenant_id");
            let expected = match (tenant.as_ref().map(|t| (t.as_i64(), t.is_null())), all.as_ref().map(|a| (a.as_bool(), a.is_null()))) {
                _ if !known => None,
                (Some((Some(t), _)), None | Some((Some(false), _)) | Some((None, true))) if t >= 0 => Some(Target::Tenant(TenantId::new(t).unwrap())),
                (None | Some((None, true)), Some((Some(true), _))) => Some(Target::All),
                _ => None,
            };
            let got = Target::parse(&serde_json::to_vec(&Value::Object(object.clone())).unwrap());
            match (got, expected) {
                (Ok(got), Some(expected)) => prop_assert_eq!(got, expected, "{:?}", object),
                (Err(e), None) => prop_assert_eq!(e.code, ErrorCode::InvalidParameter),
                (got, expected) => prop_assert!(false, "{object:?}: got {got:?}, expected {expected:?}"),
            }
        }
    }
}
