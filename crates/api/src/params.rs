//! Request parameters, however a client sends them: the query string, and a
//! body that is `multipart/form-data` (the specification's `curl -F`),
//! `application/x-www-form-urlencoded` or JSON. The body is read up to the
//! configured limit and no further.

use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::http::header::{self, HeaderMap};
use actix_web::web::{Bytes, BytesMut};
use actix_web::{web, FromRequest, HttpRequest};
use callboard_domain::{GroupedRequest, Limit, ParamValue};
use futures::StreamExt;

use crate::error::{ApiError, ErrorCode};

/// Limits for reading parameters, from the settings.
#[derive(Debug, Clone, Copy)]
pub struct ParamLimits {
    pub max_body_bytes: usize,
    /// The whole body must arrive within this; else 408 `request_timeout`.
    pub body_timeout: std::time::Duration,
    pub default_limit: Limit,
    pub max_limit: u32,
}

/// A validated `get-grouped-by-status` request.
#[derive(Debug, Clone, Copy)]
pub struct GroupedParams(pub GroupedRequest);

impl FromRequest for GroupedParams {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let req = req.clone();
        let payload = payload.take();
        Box::pin(async move {
            let limits = *req
                .app_data::<web::Data<ParamLimits>>()
                .ok_or_else(|| ApiError::new(ErrorCode::Internal, "parameter limits are not configured"))?
                .get_ref();
            let body = read_body(&req, payload, limits.max_body_bytes).await?;
            let mut params = query_params(req.query_string())?;
            params.extend(body_params(req.headers(), body).await?);
            Ok(GroupedParams(GroupedRequest::from_params(params, limits.default_limit, limits.max_limit)?))
        })
    }
}

fn too_large(max: usize) -> ApiError {
    ApiError::new(ErrorCode::PayloadTooLarge, format!("the request body is larger than {max} bytes"))
}

/// The body, up to `max` bytes, within the configured body timeout (10 s
/// where none is configured): a client that trickles its body in gets 408
/// and no more of the handler's time. actix then closes a connection whose
/// `Content-Length` body was left unread; a chunked body it drains.
pub(crate) async fn read_body(req: &HttpRequest, payload: Payload, max: usize) -> Result<Bytes, ApiError> {
    let timeout =
        req.app_data::<web::Data<ParamLimits>>().map_or(std::time::Duration::from_secs(10), |l| l.body_timeout);
    tokio::time::timeout(timeout, read_body_within(req, payload, max)).await.unwrap_or_else(|_| {
        Err(ApiError::new(
            ErrorCode::RequestTimeout,
            format!("the request body did not arrive within {} ms", timeout.as_millis()),
        ))
    })
}

async fn read_body_within(req: &HttpRequest, mut payload: Payload, max: usize) -> Result<Bytes, ApiError> {
    let declared =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(too_large(max));
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::new(ErrorCode::MalformedBody, format!("could not read the request body: {e}")))?;
        if body.len() + chunk.len() > max {
            return Err(too_large(max));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

fn query_params(query: &str) -> Result<Vec<(String, ParamValue)>, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query)
        .map_err(|e| ApiError::new(ErrorCode::InvalidParameter, format!("the query string is malformed: {e}")))?;
    Ok(pairs.into_iter().map(|(k, v)| (k, ParamValue::Text(v))).collect())
}

async fn body_params(headers: &HeaderMap, body: Bytes) -> Result<Vec<(String, ParamValue)>, ApiError> {
    // Two Content-Types would leave the body's meaning to whichever is read.
    if headers.get_all(header::CONTENT_TYPE).count() > 1 {
        return Err(ApiError::new(ErrorCode::UnsupportedMediaType, "give the Content-Type header once"));
    }
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if body.is_empty() {
        return Ok(Vec::new());
    }
    match mime.as_str() {
        "multipart/form-data" => multipart_params(headers, body).await,
        "application/x-www-form-urlencoded" => {
            let pairs: Vec<(String, String)> =
                serde_urlencoded::from_bytes(&body).map_err(|e| ApiError::new(ErrorCode::MalformedBody, format!("the form body is malformed: {e}")))?;
            Ok(pairs.into_iter().map(|(k, v)| (k, ParamValue::Text(v))).collect())
        }
        "application/json" => json_params(&body),
        "" => Err(ApiError::new(ErrorCode::UnsupportedMediaType, "a request body needs a Content-Type")),
        other => Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            format!("Content-Type {other} is not supported; use multipart/form-data, application/x-www-form-urlencoded or application/json"),
        )),
    }
}

fn json_params(body: &[u8]) -> Result<Vec<(String, ParamValue)>, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(ErrorCode::MalformedBody, format!("the JSON body is malformed: {e}")))?;
    let serde_json::Value::Object(map) = value else {
        return Err(ApiError::new(ErrorCode::MalformedBody, "the JSON body must be an object"));
    };
    Ok(map
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                serde_json::Value::String(s) => ParamValue::Text(s),
                serde_json::Value::Bool(b) => ParamValue::Bool(b),
                serde_json::Value::Number(n) => {
                    n.as_i64().map(ParamValue::Int).unwrap_or_else(|| ParamValue::Float(n.as_f64().unwrap_or(f64::NAN)))
                }
                serde_json::Value::Null => ParamValue::Other("null"),
                serde_json::Value::Array(_) => ParamValue::Other("an array"),
                serde_json::Value::Object(_) => ParamValue::Other("an object"),
            };
            (k, v)
        })
        .collect())
}

/// The known parameters among a multipart body's fields; other fields
/// (a file, say) are read past and ignored.
async fn multipart_params(headers: &HeaderMap, body: Bytes) -> Result<Vec<(String, ParamValue)>, ApiError> {
    if is_empty_multipart(headers, &body) {
        return Ok(Vec::new());
    }
    let malformed = |e: actix_multipart::MultipartError| {
        ApiError::new(ErrorCode::MalformedBody, format!("the multipart body is malformed: {e}"))
    };
    let stream = futures::stream::once(async move { Ok::<_, actix_web::error::PayloadError>(body) });
    let mut multipart = actix_multipart::Multipart::new(headers, stream);
    let mut params = Vec::new();
    while let Some(field) = multipart.next().await {
        let mut field = field.map_err(malformed)?;
        let name = field.content_disposition().and_then(|cd| cd.get_name()).unwrap_or("").to_string();
        let mut value = Vec::new();
        while let Some(chunk) = field.next().await {
            value.extend_from_slice(&chunk.map_err(malformed)?);
        }
        if !GroupedRequest::is_parameter(&name) {
            continue;
        }
        let text = String::from_utf8(value)
            .map_err(|_| ApiError::new(ErrorCode::InvalidParameter, format!("{name} must be UTF-8 text")))?;
        params.push((name, ParamValue::Text(text)));
    }
    Ok(params)
}

/// A form with no fields is just the close delimiter, `--BOUNDARY--`, which
/// actix-multipart reports as an incomplete stream.
fn is_empty_multipart(headers: &HeaderMap, body: &[u8]) -> bool {
    let boundary = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| ct.split(';').map(str::trim).find_map(|p| p.strip_prefix("boundary=")))
        .map(|b| b.trim_matches('"'));
    match boundary {
        Some(b) => body.trim_ascii() == format!("--{b}--").as_bytes(),
        None => false,
    }
}
