use actix_web::{web, HttpResponse};
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
) -> Result<HttpResponse, ApiError> {
    span.record("tenant", caller.tenant.get());
    let response = state.live.grouped(caller.tenant, &request).await?;
    span.record("cache", "miss");
    Ok(HttpResponse::Ok().insert_header(("X-Cache", "miss")).json(response))
}
