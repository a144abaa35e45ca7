use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::state::AppState;

/// A projector that has not reported for this long is considered gone.
const PROJECTOR_STALE_MS: i64 = 15_000;

/// `GET /healthz`: the process answers.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// `GET /readyz`: Redis and MongoDB answer, Redis keeps every key
/// (`maxmemory-policy noeviction`), and a projector is alive.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let (mongodb, redis) =
        tokio::join!(state.live.query().database().run_command(bson::doc! {"ping": 1}), state.cache.ping());
    let (mongodb, redis) = (mongodb.is_ok(), redis.is_ok());
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    let projector = redis
        && state
            .cache
            .progress()
            .await
            .ok()
            .and_then(|p| p.heartbeat_ms)
            .is_some_and(|beat| now - beat < PROJECTOR_STALE_MS);
    let noeviction = state.noeviction.load(std::sync::atomic::Ordering::Relaxed);
    let ready = mongodb && redis && noeviction && projector;
    let body = json!({"status": if ready { "ready" } else { "unavailable" },
        "checks": {"mongodb": mongodb, "redis": redis, "redis_noeviction": noeviction, "projector": projector}});
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let noeviction = state.noeviction.load(std::sync::atomic::Ordering::Relaxed);
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render(&state.cache, noeviction).await)
}
