use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::{web, HttpRequest, HttpResponse};
use tracing_actix_web::RootSpan;

use callboard_domain::rfc3339_ms;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::freshness::now_ms;
use crate::params::GroupedParams;
use crate::state::{AppState, Serve};

/// Every change committed in MongoDB before this instant is in the answer.
pub const AS_OF_HEADER: &str = "x-callboard-as-of";
/// How long before the answer was sent that instant was, in ms.
pub const LAG_HEADER: &str = "x-callboard-lag-ms";
/// `hit` or `miss`.
pub const CACHE_HEADER: &str = "x-cache";

/// `POST /crm/calls/get-grouped-by-status`
#[utoipa::path(
    post,
    path = "/crm/calls/get-grouped-by-status",
    tag = "calls",
    description = "Every call status the tenant sees, with its call count and its most recent calls, enriched with \
                   owner, user and assignee details. From the Redis read model when the tenant is warm \
                   (`X-Cache: hit`), else live from MongoDB (`miss`, and a warm is queued). Parameters may come in \
                   the query string or the body, in any of its three encodings.",
    params(
        crate::openapi::GroupedParameters,
        ("Cache-Control" = Option<String>, Header, description = "`no-cache` with an admin token: answer live"),
    ),
    request_body(
        description = "The parameters, if not in the query string (an empty body is fine)",
        content(
            (crate::openapi::GroupedParameters = "multipart/form-data"),
            (crate::openapi::GroupedParameters = "application/x-www-form-urlencoded"),
            (crate::openapi::GroupedParameters = "application/json"),
        )
    ),
    responses(
        (status = 200, description = "The grouped calls", body = crate::openapi::GroupedResponse, headers(
            ("X-Cache" = String, description = "`hit`: from the read model; `miss`: live from MongoDB"),
            ("X-Callboard-As-Of" = String, description = "RFC 3339 (ms): every change committed in MongoDB before \
                this instant is in the answer"),
            ("X-Callboard-Lag-Ms" = u64, description = "How long before the answer was sent that instant was, in ms"),
        )),
        (status = 400, description = "A body that does not parse (`malformed_body`)", body = crate::openapi::ErrorEnvelope),
        (status = 401, description = "No token, or a bad or expired one (`missing_token`, `invalid_token`, `token_expired`); with `WWW-Authenticate`", body = crate::openapi::ErrorEnvelope),
        (status = 408, description = "The body did not arrive in time (`request_timeout`)", body = crate::openapi::ErrorEnvelope),
        (status = 413, description = "The body is too large (`payload_too_large`)", body = crate::openapi::ErrorEnvelope),
        (status = 415, description = "Another body encoding (`unsupported_media_type`)", body = crate::openapi::ErrorEnvelope),
        (status = 422, description = "A bad parameter (`invalid_parameter`), or too many calls in one answer \
            (`response_too_large`)", body = crate::openapi::ErrorEnvelope),
        (status = 500, description = "`internal`", body = crate::openapi::ErrorEnvelope),
        (status = 503, description = "MongoDB unavailable or busy for a live answer (`database_unavailable`, \
            `database_busy`; with `Retry-After`)", body = crate::openapi::ErrorEnvelope, headers(("Retry-After" = u32))),
        (status = 504, description = "The live query ran out of time (`database_timeout`)", body = crate::openapi::ErrorEnvelope),
    ),
    security(("bearer" = []))
)]
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
    let serve = if bypass { Serve::Live } else { Serve::Cached };
    let answer = state.grouped(caller.tenant, &request, &freshness, serve).await?;
    span.record("cache", answer.outcome.as_str());
    let lag_ms = now_ms().saturating_sub(answer.as_of_ms);
    let mut response = HttpResponse::Ok().body(shared_bytes(answer.body.shared()));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(HeaderName::from_static(CACHE_HEADER), HeaderValue::from_static(answer.outcome.as_str()));
    headers.insert(HeaderName::from_static(AS_OF_HEADER), as_of_value(answer.as_of_ms));
    headers.insert(HeaderName::from_static(LAG_HEADER), HeaderValue::from(lag_ms));
    Ok(response)
}

/// `as_of_ms` in RFC 3339, formatted once per watermark and thread: every
/// hit between two watermarks carries the same one.
fn as_of_value(as_of_ms: u64) -> HeaderValue {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(u64, HeaderValue)>> = const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((ms, value)) if *ms == as_of_ms => value.clone(),
            _ => {
                let value = HeaderValue::from_str(&rfc3339_ms(as_of_ms)).expect("RFC 3339 is header-safe");
                *last = Some((as_of_ms, value.clone()));
                value
            }
        }
    })
}

/// The body as actix's bytes without copying it: a reused answer is
/// handed to every request that reuses it.
fn shared_bytes(text: std::sync::Arc<str>) -> actix_web::web::Bytes {
    struct Shared(std::sync::Arc<str>);
    impl AsRef<[u8]> for Shared {
        fn as_ref(&self) -> &[u8] {
            self.0.as_bytes()
        }
    }
    actix_web::web::Bytes::from_owner(Shared(text))
}

fn wants_no_cache(http: &HttpRequest) -> bool {
    http.headers()
        .get_all(header::CACHE_CONTROL)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim().eq_ignore_ascii_case("no-cache"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn as_of_is_formatted_for_each_watermark() {
        assert_eq!(as_of_value(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(as_of_value(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(as_of_value(1_700_000_000_124), "2023-11-14T22:13:20.124Z");
    }
}
