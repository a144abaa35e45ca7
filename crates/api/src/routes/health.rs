use std::sync::atomic::Ordering;
use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::state::AppState;

/// A projector that has not reported for this long is considered gone.
const PROJECTOR_STALE_MS: i64 = 15_000;

/// `GET /healthz`: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "The process answers", body = crate::openapi::Health)))]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// How long a readiness probe waits for each dependency.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// `GET /readyz`: can this process serve? Redis answers and keeps every
/// key (`maxmemory-policy noeviction`), and the process is not shutting
/// down. MongoDB and the projector are reported under `dependencies` but do
/// not decide: every API process shares them, so taking processes out of
/// rotation for them would only turn a degraded service (cold tenants
/// failing, or answers going stale) into no service. The projector's own
/// health is `GET /projectorz`.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "Ready: Redis answers with noeviction, not shutting down", body = crate::openapi::Readiness),
        (status = 503, description = "Not ready", body = crate::openapi::Readiness),
    ))]
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let draining = state.draining.load(Ordering::Relaxed);
    let ping = state.live.query().database().run_command(bson::doc! {"ping": 1});
    let (mongodb, redis, projector) = tokio::join!(
        tokio::time::timeout(PROBE_TIMEOUT, ping),
        tokio::time::timeout(PROBE_TIMEOUT, state.cache.ping()),
        tokio::time::timeout(PROBE_TIMEOUT, projector_health(&state)),
    );
    let mongodb = mongodb.is_ok_and(|r| r.is_ok());
    let redis = redis.is_ok_and(|r| r.is_ok());
    let projector = projector.ok().flatten().is_some_and(|p| p.up);
    let noeviction = state.noeviction.load(Ordering::Relaxed);
    let ready = redis && noeviction && !draining;
    let status = match (ready, draining) {
        (true, _) => "ready",
        (false, true) => "shutting_down",
        (false, false) => "unavailable",
    };
    let body = json!({"status": status,
        "checks": {"redis": redis, "redis_noeviction": noeviction, "shutting_down": draining},
        "dependencies": {"mongodb": mongodb, "projector": projector}});
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// What the projectors last reported.
struct ProjectorHealth {
    up: bool,
    heartbeat_age_ms: Option<i64>,
    lag_ms: Option<i64>,
}

/// `None`: Redis cannot be read.
async fn projector_health(state: &AppState) -> Option<ProjectorHealth> {
    let progress = state.cache.progress().await.ok()?;
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    let heartbeat_age_ms = progress.heartbeat_ms.map(|beat| now - beat);
    Some(ProjectorHealth {
        up: heartbeat_age_ms.is_some_and(|age| age < PROJECTOR_STALE_MS),
        heartbeat_age_ms,
        lag_ms: progress.lag_ms,
    })
}

/// `GET /projectorz`: 200 while a projector reported within 15 s, 503
/// otherwise (or when Redis cannot be read), with the heartbeat's age and
/// the last batch's lag. For alerting on the projector, not for an API
/// process's rotation.
#[utoipa::path(get, path = "/projectorz", tag = "health",
    responses(
        (status = 200, description = "A projector reported within 15 s", body = crate::openapi::ProjectorHealth),
        (status = 503, description = "No projector reported within 15 s, or Redis cannot be read", body = crate::openapi::ProjectorHealth),
    ))]
pub async fn projectorz(state: web::Data<AppState>) -> HttpResponse {
    let Ok(Some(health)) = tokio::time::timeout(PROBE_TIMEOUT, projector_health(&state)).await else {
        return HttpResponse::ServiceUnavailable().json(json!({"status": "unknown", "redis": false}));
    };
    let body = json!({"status": if health.up { "up" } else { "down" },
        "heartbeat_age_ms": health.heartbeat_age_ms, "lag_ms": health.lag_ms});
    if health.up {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// `GET /metrics`: Prometheus text.
#[utoipa::path(get, path = "/metrics", tag = "health",
    description = "Prometheus text (on `http.metrics_addr` instead when that is set).",
    responses((status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain", body = String)))]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let noeviction = state.noeviction.load(Ordering::Relaxed);
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render(&state.cache, noeviction, (state.partitions, state.history_warn_share)).await)
}
