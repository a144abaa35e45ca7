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
use callboard_domain::{Freshness, GroupedRequest, Limit, ParamValue};
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

/// A validated `get-grouped-by-status` request: what to show, and how
/// fresh.
#[derive(Debug, Clone, Copy)]
pub struct GroupedParams {
    pub request: GroupedRequest,
    pub freshness: Freshness,
}

/// Whether `name` is one of the endpoint's parameters.
fn is_parameter(name: &str) -> bool {
    GroupedRequest::is_parameter(name) || Freshness::is_parameter(name)
}

impl GroupedParams {
    fn from_params(params: Vec<(String, ParamValue)>, limits: &ParamLimits) -> Result<Self, ApiError> {
        let freshness = Freshness::from_params(&params)?;
        let request = GroupedRequest::from_params(params, limits.default_limit, limits.max_limit)?;
        Ok(Self { request, freshness })
    }
}

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
            GroupedParams::from_params(params, &limits)
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
    // A body that came with the head (a small form, nearly always) is read
    // without arming a timer.
    let mut read = std::pin::pin!(read_body_within(req, payload, max));
    if let std::task::Poll::Ready(body) = futures::poll!(read.as_mut()) {
        return body;
    }
    tokio::time::timeout(timeout, read).await.unwrap_or_else(|_| {
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

pub(crate) fn query_params(query: &str) -> Result<Vec<(String, ParamValue)>, ApiError> {
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
        if !is_parameter(&name) {
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

/// Fuzzing of the four encodings (`make fuzz` runs many more cases:
/// `CALLBOARD_FUZZ_CASES`). Arbitrary bytes must end in a 4xx, never a
/// panic; the same parameters sent in each encoding must parse the same.
#[cfg(test)]
mod fuzz {
    use super::*;
    use actix_web::http::header::HeaderValue;
    use proptest::prelude::*;

    fn parse(content_type: Option<&str>, query: &str, body: Vec<u8>) -> Result<GroupedParams, ApiError> {
        let mut headers = HeaderMap::new();
        if let Some(v) = content_type.and_then(|ct| HeaderValue::from_str(ct).ok()) {
            headers.insert(header::CONTENT_TYPE, v);
        }
        let limits = ParamLimits {
            max_body_bytes: 1 << 20,
            body_timeout: std::time::Duration::from_secs(10),
            default_limit: Limit::new(100, 1000).expect("valid"),
            max_limit: 1000,
        };
        futures::executor::block_on(async {
            let mut params = query_params(query)?;
            params.extend(body_params(&headers, Bytes::from(body)).await?);
            GroupedParams::from_params(params, &limits)
        })
    }

    /// What a parse may end in: a valid request, or a client error.
    fn sane(outcome: &Result<GroupedParams, ApiError>) -> bool {
        match outcome {
            Ok(p) => (1..=1000).contains(&p.request.limit.get()),
            Err(e) => matches!(
                e.code,
                ErrorCode::InvalidParameter | ErrorCode::MalformedBody | ErrorCode::UnsupportedMediaType
            ),
        }
    }

    fn content_type() -> impl Strategy<Value = Option<String>> {
        prop_oneof![
            Just(None),
            Just(Some("application/json".to_string())),
            Just(Some("application/x-www-form-urlencoded".to_string())),
            "[ -~]{0,40}".prop_map(|b| Some(format!("multipart/form-data; boundary={b}"))),
            "[ -~]{0,60}".prop_map(Some),
        ]
    }

    /// A parameter's value as a client might send it.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            (-5i64..1200).prop_map(|n| n.to_string()),
            Just("true".to_string()),
            Just("false".to_string()),
            "[a-zA-Z0-9 .+-]{0,12}",
            (0u32..2_000_000_000, 0u32..100).prop_map(|(s, i)| format!("{s}.{i}")),
            (0u64..4_000_000_000_000).prop_map(callboard_domain::rfc3339_ms),
            "20[0-9]{2}-[01][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-6][0-9](\\.[0-9]{1,9})?(Z|[+-][01][0-9]:[0-5][0-9])",
        ]
    }

    fn pairs() -> impl Strategy<Value = Vec<(String, String)>> {
        let name = prop_oneof![
            Just("limit".to_string()),
            Just("include_calls".to_string()),
            Just("include_enrichment".to_string()),
            Just("min_as_of".to_string()),
            Just("max_staleness_ms".to_string()),
            "[a-z_]{1,10}",
        ];
        proptest::collection::vec((name, value()), 0..5).prop_map(|mut pairs| {
            // One of each name: repeats are refused by every encoding but
            // JSON, whose objects cannot hold them.
            let mut seen = std::collections::BTreeSet::new();
            pairs.retain(|(k, _)| seen.insert(k.clone()));
            pairs
        })
    }

    /// A boundary as RFC 2046 allows (no trailing space).
    fn boundary() -> impl Strategy<Value = String> {
        "[0-9A-Za-z'()+_,./:=?-]{1,69}"
    }

    fn multipart(pairs: &[(String, String)], boundary: &str, file: bool) -> Vec<u8> {
        let mut body = String::new();
        if file {
            body.push_str(&format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"upload\"; filename=\"a.bin\"\r\nContent-Type: application/octet-stream\r\n\r\nxx\r\n"
            ));
        }
        for (k, v) in pairs {
            body.push_str(&format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"));
        }
        body.push_str(&format!("--{boundary}--\r\n"));
        body.into_bytes()
    }

    fn same(a: &Result<GroupedParams, ApiError>, b: &Result<GroupedParams, ApiError>) -> bool {
        match (a, b) {
            (Ok(a), Ok(b)) => a.request == b.request && a.freshness == b.freshness,
            (Err(a), Err(b)) => a.code == b.code,
            _ => false,
        }
    }

    proptest! {
        #![proptest_config(crate::fuzz_config())]

        #[test]
        fn arbitrary_bytes_end_in_a_client_error_or_a_valid_request(
            ct in content_type(),
            query in "[ -~]{0,40}",
            body in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            prop_assert!(sane(&parse(ct.as_deref(), &query, body)));
        }

        #[test]
        fn every_encoding_parses_the_same_parameters_alike(
            pairs in pairs(),
            boundary in boundary(),
            file in any::<bool>(),
        ) {
            let query = serde_urlencoded::to_string(&pairs).expect("encodable");
            let by_query = parse(None, &query, Vec::new());
            let form = parse(Some("application/x-www-form-urlencoded"), "", query.clone().into_bytes());
            let object: serde_json::Map<String, serde_json::Value> =
                pairs.iter().map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str()))).collect();
            let json = parse(Some("application/json"), "", serde_json::to_vec(&object).expect("JSON"));
            let ct = format!("multipart/form-data; boundary=\"{boundary}\"");
            let multi = parse(Some(&ct), "", multipart(&pairs, &boundary, file));
            prop_assert!(sane(&by_query), "{by_query:?}");
            prop_assert!(same(&by_query, &form), "form {form:?} vs query {by_query:?}");
            prop_assert!(same(&by_query, &json), "json {json:?} vs query {by_query:?}");
            prop_assert!(same(&by_query, &multi), "multipart {multi:?} vs query {by_query:?} for {pairs:?}");
            // A valid limit is the limit asked for.
            if let (Ok(r), Some((_, v))) = (&by_query, pairs.iter().find(|(k, _)| k == "limit")) {
                prop_assert_eq!(Some(i64::from(r.request.limit.get())), v.trim().parse::<i64>().ok(), "{:?}", v);
            }
            // A valid staleness bound is the one asked for.
            if let (Ok(r), Some((_, v))) = (&by_query, pairs.iter().find(|(k, _)| k == "max_staleness_ms")) {
                prop_assert_eq!(r.freshness.max_staleness_ms, v.parse::<u64>().ok(), "{:?}", v);
            }
        }

        #[test]
        fn a_damaged_multipart_body_is_a_client_error(
            pairs in pairs(),
            boundary in boundary(),
            cuts in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            truncate in any::<prop::sample::Index>(),
        ) {
            let mut body = multipart(&pairs, &boundary, false);
            for (at, byte) in cuts {
                let i = at.index(body.len());
                body[i] = byte;
            }
            body.truncate(truncate.index(body.len() + 1));
            let ct = format!("multipart/form-data; boundary={boundary}");
            prop_assert!(sane(&parse(Some(&ct), "", body)));
        }
    }
}
