use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use tracing_actix_web::RootSpan;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::params::GroupedParams;
use crate::state::AppState;

/// `POST /crm/calls/get-grouped-by-status`
pub async fn get_grouped_by_status(
    caller: Caller,
    GroupedParams(request): GroupedParams,
    state: web::Data<AppState>,
    span: RootSpan,
    http: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    span.record("tenant", caller.tenant.get());
    // Only an operator may bypass the cache (verification, benchmarks).
    let bypass = caller.is_admin() && wants_no_cache(&http);
    let (response, outcome) = state.grouped(caller.tenant, &request, bypass).await?;
    span.record("cache", outcome.as_str());
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .insert_header(("X-Cache", outcome.as_str()))
        .body(response.into_string()))
}

fn wants_no_cache(http: &HttpRequest) -> bool {
    http.headers()
        .get_all(header::CACHE_CONTROL)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim().eq_ignore_ascii_case("no-cache"))
}
