use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::state::AppState;

/// `GET /healthz`: the process answers.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// `GET /readyz`: the dependencies answer too.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let mongodb = state.live.database().run_command(bson::doc! {"ping": 1}).await.is_ok();
    let body = json!({"status": if mongodb { "ready" } else { "unavailable" }, "checks": {"mongodb": mongodb}});
    if mongodb {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}
