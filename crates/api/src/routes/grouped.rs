use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use tracing_actix_web::RootSpan;

use callboard_domain::rfc3339_ms;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::freshness::now_ms;
use crate::params::GroupedParams;
use crate::state::AppState;

/// Every change committed in MongoDB before this instant is in the answer.
pub const AS_OF_HEADER: &str = "X-Callboard-As-Of";
/// How long before the answer was sent that instant was, in ms.
pub const LAG_HEADER: &str = "X-Callboard-Lag-Ms";

/// `POST /crm/calls/get-grouped-by-status`
pub async fn get_grouped_by_status(
    caller: Caller,
    GroupedParams { request, freshness }: GroupedParams,
    state: web::Data<AppState>,
    span: RootSpan,
    http: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    span.record("tenant", caller.tenant.get());
    // Only an operator may bypass the cache (verification, benchmarks).
    let bypass = caller.is_admin() && wants_no_cache(&http);
    let answer = state.grouped(caller.tenant, &request, &freshness, bypass).await?;
    span.record("cache", answer.outcome.as_str());
    let lag_ms = now_ms().saturating_sub(answer.as_of_ms);
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .insert_header(("X-Cache", answer.outcome.as_str()))
        .insert_header((AS_OF_HEADER, rfc3339_ms(answer.as_of_ms)))
        .insert_header((LAG_HEADER, lag_ms.to_string()))
        .body(answer.body.into_string()))
}

fn wants_no_cache(http: &HttpRequest) -> bool {
    http.headers()
        .get_all(header::CACHE_CONTROL)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim().eq_ignore_ascii_case("no-cache"))
}
