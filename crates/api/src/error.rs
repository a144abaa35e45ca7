//! The one place errors become HTTP: every error code, its status and its
//! snake_case name in one table, one JSON envelope
//! `{"status": 422, "message": "...", "error": "invalid_parameter"}`.

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

/// What went wrong, as a client can act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidParameter,
    MalformedBody,
    UnsupportedMediaType,
    PayloadTooLarge,
    RequestTimeout,
    MissingToken,
    InvalidToken,
    TokenExpired,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    DatabaseUnavailable,
    DatabaseBusy,
    DatabaseTimeout,
    CacheUnavailable,
    ResponseTooLarge,
    StreamBusy,
    Internal,
}

impl ErrorCode {
    /// Every code, for the API document and the tests.
    pub const ALL: [ErrorCode; 18] = [
        ErrorCode::InvalidParameter,
        ErrorCode::MalformedBody,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::PayloadTooLarge,
        ErrorCode::RequestTimeout,
        ErrorCode::MissingToken,
        ErrorCode::InvalidToken,
        ErrorCode::TokenExpired,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::DatabaseUnavailable,
        ErrorCode::DatabaseBusy,
        ErrorCode::DatabaseTimeout,
        ErrorCode::CacheUnavailable,
        ErrorCode::ResponseTooLarge,
        ErrorCode::StreamBusy,
        ErrorCode::Internal,
    ];

    /// The table: HTTP status and machine name of each code.
    pub const fn meta(self) -> (StatusCode, &'static str) {
        match self {
            ErrorCode::InvalidParameter => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_parameter"),
            ErrorCode::MalformedBody => (StatusCode::BAD_REQUEST, "malformed_body"),
            ErrorCode::UnsupportedMediaType => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            ErrorCode::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ErrorCode::RequestTimeout => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ErrorCode::MissingToken => (StatusCode::UNAUTHORIZED, "missing_token"),
            ErrorCode::InvalidToken => (StatusCode::UNAUTHORIZED, "invalid_token"),
            ErrorCode::TokenExpired => (StatusCode::UNAUTHORIZED, "token_expired"),
            ErrorCode::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            ErrorCode::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ErrorCode::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ErrorCode::DatabaseUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable"),
            ErrorCode::DatabaseBusy => (StatusCode::SERVICE_UNAVAILABLE, "database_busy"),
            ErrorCode::DatabaseTimeout => (StatusCode::GATEWAY_TIMEOUT, "database_timeout"),
            ErrorCode::CacheUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "cache_unavailable"),
            ErrorCode::ResponseTooLarge => (StatusCode::UNPROCESSABLE_ENTITY, "response_too_large"),
            ErrorCode::StreamBusy => (StatusCode::SERVICE_UNAVAILABLE, "stream_busy"),
            ErrorCode::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

/// Seconds a client is told to wait after a 503.
const RETRY_AFTER_S: &str = "1";

/// An error on its way to the client.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    status: u16,
    message: &'a str,
    error: &'static str,
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.code.meta().0
    }

    fn error_response(&self) -> HttpResponse {
        let (status, name) = self.code.meta();
        let mut response =
            HttpResponse::build(status).json(Envelope { status: status.as_u16(), message: &self.message, error: name });
        if matches!(self.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseUnavailable | ErrorCode::StreamBusy) {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_S));
        }
        if status == StatusCode::UNAUTHORIZED {
            let challenge = format!(
                "Bearer error=\"{}\"",
                if self.code == ErrorCode::MissingToken { "invalid_request" } else { "invalid_token" }
            );
            if let Ok(v) = HeaderValue::from_str(&challenge) {
                response.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
        }
        response
    }
}

impl From<callboard_domain::ParamError> for ApiError {
    fn from(e: callboard_domain::ParamError) -> Self {
        ApiError::new(ErrorCode::InvalidParameter, e.message)
    }
}

impl From<callboard_store::StoreError> for ApiError {
    fn from(e: callboard_store::StoreError) -> Self {
        if e.is_unavailable() {
            tracing::warn!(error = %e, "MongoDB unavailable");
            ApiError::new(ErrorCode::DatabaseUnavailable, "the database is unavailable; try again shortly")
        } else {
            tracing::error!(error = %e, "store error");
            ApiError::new(ErrorCode::Internal, "internal error")
        }
    }
}

/// Routes no other route matched.
pub async fn not_found() -> HttpResponse {
    ApiError::new(ErrorCode::NotFound, "no such route").error_response()
}

pub async fn method_not_allowed() -> HttpResponse {
    ApiError::new(ErrorCode::MethodNotAllowed, "method not allowed on this route").error_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_a_distinct_name_and_an_error_status() {
        let all = ErrorCode::ALL;
        let mut names: Vec<&str> = all.iter().map(|c| c.meta().1).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len());
        assert!(all.iter().all(|c| c.meta().0.is_client_error() || c.meta().0.is_server_error()));
    }
}
