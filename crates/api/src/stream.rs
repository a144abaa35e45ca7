//! `GET /crm/calls/stream`: a tenant's board as Server-Sent Events.
//!
//! Each connection gets the board at once (event `board`, data exactly the
//! JSON `get-grouped-by-status` returns), then again whenever it changes,
//! at most `stream.max_events_per_s` a second: changes in between are
//! coalesced into the next event. An event's `id:` is
//! `<as_of_ms>-<board version>`; a client that reconnects with
//! `Last-Event-ID` gets the board at once only if it changed since.
//!
//! The fan-out costs one poll per process, not one per connection: a
//! [`Boards`] task reads, every `stream.poll_ms`, the [`BoardVersion`] of
//! every tenant some connection watches (one pipeline on a single node,
//! one small transaction per tenant's slot on a cluster) and wakes that
//! tenant's connections when it changed. Connections asking for the same
//! board share one render per version. See ADR 0010 for why polling
//! rather than pub/sub.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::Uri;
use actix_web::middleware::Next;
use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};
use callboard_domain::{Freshness, GroupedRequest, TenantId};
use callboard_readmodel::{BoardVersion, ReadModel};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::{ApiError, ErrorCode};
use crate::state::{AppState, CacheOutcome, Serve};

pub const STREAM_PATH: &str = "/crm/calls/stream";
/// The query parameter that carries a token where a header cannot
/// (browsers' `EventSource`).
pub const TOKEN_PARAM: &str = "access_token";
/// A comment goes out when nothing else did for this long, so that
/// proxies keep the connection and clients notice a dead one.
pub const HEARTBEAT: Duration = Duration::from_secs(15);
/// An answer that was not a hit (a cold tenant, Redis unreadable) is
/// rendered again this often even if no version changed: a cold tenant's
/// writes bump no version until it is warm.
const LIVE_RETRY: Duration = Duration::from_secs(1);
/// A stream lasts at most this long (a year), whatever its token's `exp`.
const MAX_STREAM_S: u64 = 365 * 24 * 3600;
/// What `EventSource` waits before reconnecting after the stream ends.
const RETRY_MS: u64 = 1000;

/// The stream's settings.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    pub max_events_per_s: u32,
    pub poll: Duration,
    pub max_connections: usize,
}

/// This process's watched boards, kept fresh by one task. Cheap to clone.
#[derive(Clone)]
pub struct Boards {
    inner: Arc<Hub>,
}

struct Hub {
    tenants: Mutex<HashMap<TenantId, Arc<Watched>>>,
    connections: AtomicUsize,
    limits: StreamLimits,
    /// Becomes true when the process starts draining: every stream ends,
    /// so that its client reconnects to another process.
    closing: watch::Receiver<bool>,
}

/// One tenant's board version as last read, and its renders.
struct Watched {
    version: watch::Sender<Option<BoardVersion>>,
    /// One render per distinct request, shared by every connection asking
    /// for it (at most the few thousand distinct requests there are).
    renders: Mutex<HashMap<GroupedRequest, RenderSlot>>,
}

/// The last render of one board, shared by the connections that show it
/// (each holds a clone, so a slot no connection holds is dropped).
type RenderSlot = Arc<tokio::sync::Mutex<SlotState>>;

/// A board's last render, and its last failed one.
#[derive(Default)]
struct SlotState {
    last: Option<Rendered>,
    /// When the last failed render began, and its error.
    failed: Option<(Instant, ErrorCode, String)>,
}

/// One board event, ready to send.
#[derive(Clone)]
struct Rendered {
    /// The version read before the render, or [`BoardVersion::UNKNOWN`]
    /// for an answer that was not a hit (a cold tenant's writes move no
    /// version, so no reconnect may take it as current).
    version: BoardVersion,
    /// When the render started.
    at: Instant,
    frame: Bytes,
    /// Of the data alone, to skip an event that would repeat the last.
    digest: u64,
    outcome: CacheOutcome,
}

impl Boards {
    /// Starts the poller; it stops when the last clone is dropped. It ends
    /// every stream once `draining` is set.
    pub fn spawn(cache: ReadModel, limits: StreamLimits, draining: Arc<AtomicBool>) -> Self {
        let (closing_tx, closing) = watch::channel(false);
        let inner = Arc::new(Hub { tenants: Mutex::default(), connections: AtomicUsize::new(0), limits, closing });
        tokio::spawn(poll(cache, Arc::downgrade(&inner), draining, closing_tx));
        Self { inner }
    }

    fn watch(&self, tenant: TenantId) -> (Arc<Watched>, watch::Receiver<Option<BoardVersion>>) {
        let mut tenants = self.inner.tenants.lock().unwrap_or_else(|e| e.into_inner());
        let watched = tenants
            .entry(tenant)
            .or_insert_with(|| Arc::new(Watched { version: watch::channel(None).0, renders: Mutex::default() }))
            .clone();
        let rx = watched.version.subscribe();
        (watched, rx)
    }

    /// A connection's slot, or `stream_busy` past `stream.max_connections`.
    fn open(&self, state: &AppState) -> Result<Slot, ApiError> {
        let hub = &self.inner;
        let n = hub.connections.fetch_add(1, Ordering::AcqRel);
        let slot = Slot { hub: self.inner.clone(), metrics: state.metrics.clone() };
        state.metrics.stream_opened();
        if n >= hub.limits.max_connections {
            return Err(ApiError::new(
                ErrorCode::StreamBusy,
                format!(
                    "this process holds {} stream connections (stream.max_connections); try again shortly",
                    hub.limits.max_connections
                ),
            ));
        }
        Ok(slot)
    }
}

/// Counts a connection while it lives.
struct Slot {
    hub: Arc<Hub>,
    metrics: crate::Metrics,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.hub.connections.fetch_sub(1, Ordering::AcqRel);
        self.metrics.stream_closed();
    }
}

/// Reads the watched tenants' versions every `stream.poll_ms`.
async fn poll(cache: ReadModel, hub: Weak<Hub>, draining: Arc<AtomicBool>, closing: watch::Sender<bool>) {
    let mut failing = false;
    loop {
        let Some(interval) = hub.upgrade().map(|h| h.limits.poll) else { return };
        tokio::time::sleep(interval).await;
        let Some(hub) = hub.upgrade() else { return };
        if draining.load(Ordering::Relaxed) {
            closing.send_replace(true);
        }
        let watched: Vec<(TenantId, Arc<Watched>)> = {
            let mut tenants = hub.tenants.lock().unwrap_or_else(|e| e.into_inner());
            tenants.retain(|_, w| w.version.receiver_count() > 0);
            for w in tenants.values() {
                w.renders.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, slot| Arc::strong_count(slot) > 1);
            }
            tenants.iter().map(|(t, w)| (*t, w.clone())).collect()
        };
        if watched.is_empty() {
            continue;
        }
        let ids: Vec<TenantId> = watched.iter().map(|(t, _)| *t).collect();
        match cache.board_versions(&ids).await {
            Ok(versions) => {
                if failing {
                    tracing::info!("board versions readable again");
                    failing = false;
                }
                for ((_, w), v) in watched.iter().zip(versions) {
                    w.version.send_if_modified(|current| {
                        let changed = *current != Some(v);
                        *current = Some(v);
                        changed
                    });
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot read board versions; streams wait");
                    failing = true;
                }
            }
        }
    }
}

/// Takes an `access_token` query parameter out of the URI of every
/// request, before anything logs it: on the stream and the board page it
/// becomes an `Authorization: Bearer` header (a token given twice, both
/// ways or twice in the query, becomes two headers, which authentication
/// refuses); anywhere else it is dropped, as the endpoint ignores
/// parameters it does not know. Paths are compared as the router sees
/// them (percent-decoded).
pub async fn token_from_query(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    // Most requests (the endpoint's, with its parameters in the body)
    // have no query string: nothing to parse.
    if req.query_string().is_empty() {
        return next.call(req).await;
    }
    let pairs = match serde_urlencoded::from_str::<Vec<(String, String)>>(req.query_string()) {
        Ok(pairs) if pairs.iter().any(|(k, _)| k == TOKEN_PARAM) => pairs,
        // A malformed query string is the handler's to refuse.
        _ => return next.call(req).await,
    };
    let routed = req.match_info().as_str().to_owned();
    let accepts = routed == STREAM_PATH || routed == crate::BOARD_PATH;
    let (tokens, rest): (Vec<_>, Vec<_>) = pairs.into_iter().partition(|(k, _)| k == TOKEN_PARAM);
    let path = req.path().to_owned();
    let rest = serde_urlencoded::to_string(&rest).unwrap_or_default();
    let path_and_query = if rest.is_empty() { path } else { format!("{path}?{rest}") };
    let mut parts = req.head().uri.clone().into_parts();
    parts.path_and_query = path_and_query.parse().ok();
    if let Ok(uri) = Uri::from_parts(parts) {
        req.match_info_mut().get_mut().update(&uri);
        req.head_mut().uri = uri;
    }
    if accepts {
        for (_, token) in tokens {
            let value = HeaderValue::from_str(&format!("Bearer {token}"))
                .unwrap_or_else(|_| HeaderValue::from_static("Bearer not-a-token"));
            req.headers_mut().append(header::AUTHORIZATION, value);
        }
    }
    next.call(req).await
}

/// One connection's place in the stream.
struct Connection {
    state: web::Data<AppState>,
    tenant: TenantId,
    request: GroupedRequest,
    /// This board's shared render.
    render_slot: RenderSlot,
    versions: watch::Receiver<Option<BoardVersion>>,
    closing: watch::Receiver<bool>,
    /// What the client has: the version and data of its last event.
    sent: Option<(BoardVersion, u64)>,
    /// The last render was not a hit: render again after [`LIVE_RETRY`].
    retry_at: Option<Instant>,
    next_event_at: Instant,
    heartbeat_at: Instant,
    expires_at: Instant,
    /// Frames to send before anything else (the first event).
    pending: Option<Bytes>,
    ended: bool,
    max_events_per_s: u32,
    _slot: Slot,
}

/// `GET /crm/calls/stream`
#[utoipa::path(
    get,
    path = "/crm/calls/stream",
    tag = "calls",
    description = "The board as Server-Sent Events. First `retry: 1000`, then event `board` at once (data: exactly \
        the JSON of get-grouped-by-status for these parameters), then one whenever the board changes, at most \
        `stream.max_events_per_s` a second (changes in between are coalesced). Each event's `id:` is \
        `<as_of_ms>-<board version>`; reconnecting with `Last-Event-ID` sends the board at once only if it changed. \
        A `: heartbeat` comment follows 15 s of silence. When the token expires, an event `error` carries the \
        `token_expired` envelope and the stream ends; it also ends when the process shuts down.",
    params(
        crate::openapi::StreamParameters,
        ("Last-Event-ID" = Option<String>, Header, description = "The id of the last event received"),
    ),
    responses(
        (status = 200, description = "The stream", content_type = "text/event-stream", body = String),
        (status = 401, description = "No token, or a bad or expired one (`missing_token`, `invalid_token`, `token_expired`); with `WWW-Authenticate`", body = crate::openapi::ErrorEnvelope),
        (status = 422, description = "A bad parameter (`invalid_parameter`), or a first board showing too many calls (`response_too_large`)", body = crate::openapi::ErrorEnvelope),
        (status = 500, description = "`internal`", body = crate::openapi::ErrorEnvelope),
        (status = 503, description = "Too many streams on this process (`stream_busy`), or MongoDB unavailable or busy for a first board answered live (`database_unavailable`, `database_busy`); with `Retry-After`", body = crate::openapi::ErrorEnvelope),
        (status = 504, description = "The first board's live query ran out of time (`database_timeout`)", body = crate::openapi::ErrorEnvelope),
    ),
    security(("bearer" = []), ("access_token" = []))
)]
pub async fn stream(
    caller: crate::Caller,
    state: web::Data<AppState>,
    boards: web::Data<Boards>,
    limits: web::Data<crate::ParamLimits>,
    http: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let params = crate::params::query_params(http.query_string())?;
    if let Some((name, _)) = params.iter().find(|(name, _)| !GroupedRequest::is_parameter(name)) {
        return Err(ApiError::new(
            ErrorCode::InvalidParameter,
            format!("{name} is not a parameter of the stream (limit, include_enrichment, include_calls)"),
        ));
    }
    let request = GroupedRequest::from_params(params, limits.default_limit, limits.max_limit)?;
    let last_seen = http
        .headers()
        .get("Last-Event-ID")
        .and_then(|v| v.to_str().ok())
        .and_then(|id| id.rsplit_once('-'))
        .and_then(|(_, version)| version.parse::<BoardVersion>().ok());
    // Draining: no board, only when to come back (to another process,
    // once the load balancer has taken this one out).
    if state.draining.load(Ordering::Relaxed) {
        return Ok(HttpResponse::Ok()
            .content_type("text/event-stream")
            .insert_header((header::CACHE_CONTROL, "no-cache"))
            .force_close()
            .body(format!("retry: {RETRY_MS}\n\n")));
    }
    let slot = boards.open(&state)?;
    let (watched, versions) = boards.watch(caller.tenant);
    let render_slot = watched.renders.lock().unwrap_or_else(|e| e.into_inner()).entry(request).or_default().clone();
    let now_s = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    // Capped, so that no `exp` overflows the clock.
    let remaining = Duration::from_secs(caller.expires_at_s.saturating_sub(now_s).min(MAX_STREAM_S));
    let expires_at = Instant::now() + remaining;
    let mut conn = Connection {
        state,
        tenant: caller.tenant,
        request,
        render_slot,
        versions,
        closing: boards.inner.closing.clone(),
        sent: None,
        retry_at: None,
        next_event_at: Instant::now(),
        heartbeat_at: Instant::now() + HEARTBEAT,
        expires_at,
        pending: None,
        ended: false,
        max_events_per_s: boards.inner.limits.max_events_per_s.max(1),
        _slot: slot,
    };
    // The first board, before the stream starts: an error here is the
    // answer's status, in the envelope.
    let version = conn.state.cache.board_versions(&[conn.tenant]).await.ok().and_then(|v| v.first().copied());
    let mut first = format!("retry: {RETRY_MS}\n\n").into_bytes();
    match version {
        Some(v) if last_seen == Some(v) => conn.sent = Some((v, 0)),
        _ => {
            let rendered = conn.render(version).await?;
            // The first render can outlast the token (a live query).
            if Instant::now() >= conn.expires_at {
                return Err(ApiError::new(ErrorCode::TokenExpired, "the token has expired"));
            }
            first.extend_from_slice(&rendered.frame);
            conn.note_sent(&rendered);
        }
    }
    conn.pending = Some(Bytes::from(first));
    tracing::info!(tenant = %conn.tenant, resumed = last_seen.is_some(), "stream opened");
    let body = futures::stream::unfold(conn, |mut conn| async move {
        let frame = conn.next_frame().await?;
        Some((Ok::<_, std::convert::Infallible>(frame), conn))
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        // Proxies that buffer (nginx) pass events on at once.
        .insert_header(("X-Accel-Buffering", "no"))
        // Its own connection: when it ends (draining), the client's
        // reconnect opens a new one, which the load balancer can route
        // elsewhere.
        .force_close()
        .streaming(body))
}

impl Connection {
    /// The next bytes to send; `None` ends the stream.
    async fn next_frame(&mut self) -> Option<Bytes> {
        if let Some(frame) = self.pending.take() {
            return Some(frame);
        }
        if self.ended {
            return None;
        }
        loop {
            let retry = self.retry_at;
            tokio::select! {
                // Expiry and draining before any render.
                biased;
                _ = tokio::time::sleep_until(self.expires_at) => return Some(self.expired()),
                changed = self.closing.changed() => {
                    if changed.is_err() || *self.closing.borrow() {
                        tracing::info!(tenant = %self.tenant, "stream ended: the process is draining");
                        return None;
                    }
                }
                _ = tokio::time::sleep_until(self.heartbeat_at) => {
                    self.heartbeat_at = Instant::now() + HEARTBEAT;
                    return Some(Bytes::from_static(b": heartbeat\n\n"));
                }
                changed = self.versions.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                    if let Some(frame) = self.on_change(false).await {
                        return Some(self.unless_expired(frame));
                    }
                }
                _ = tokio::time::sleep_until(retry.unwrap_or_else(Instant::now)), if retry.is_some() => {
                    self.retry_at = None;
                    if let Some(frame) = self.on_change(true).await {
                        return Some(self.unless_expired(frame));
                    }
                }
            }
        }
    }

    /// The stream's last frame: its token expired.
    fn expired(&mut self) -> Bytes {
        self.ended = true;
        tracing::info!(tenant = %self.tenant, "stream ended: the token expired");
        let envelope = serde_json::json!({"status": 401, "message": "the token has expired", "error": "token_expired"});
        Bytes::from(format!("event: error\ndata: {envelope}\n\n"))
    }

    /// `frame`, unless the token expired while it was made (a render can
    /// outlast it): then the expiry instead.
    fn unless_expired(&mut self, frame: Bytes) -> Bytes {
        if Instant::now() >= self.expires_at {
            self.expired()
        } else {
            frame
        }
    }

    /// The board's version changed (or a live answer is due again): its
    /// event, unless the client has it already.
    async fn on_change(&mut self, retry: bool) -> Option<Bytes> {
        // At most `max_events_per_s`: what changes meanwhile is in the
        // version read after the wait.
        tokio::time::sleep_until(self.next_event_at).await;
        let version = *self.versions.borrow_and_update();
        if !retry && version.is_some() && self.sent.map(|(v, _)| v) == version {
            return None;
        }
        match self.render(version).await {
            Ok(rendered) => {
                if self.sent.map(|(_, digest)| digest) == Some(rendered.digest) {
                    self.note_rendered(&rendered);
                    return None;
                }
                self.note_sent(&rendered);
                self.state.metrics.observe_stream_event();
                Some(rendered.frame)
            }
            Err(e) => {
                tracing::warn!(tenant = %self.tenant, error = %e, "could not render the board; retrying");
                self.retry_at = Some(Instant::now() + LIVE_RETRY);
                None
            }
        }
    }

    /// The client has `rendered`'s data (sent now, or the same as sent
    /// before). Not a hit: rendered again after [`LIVE_RETRY`].
    fn note_rendered(&mut self, rendered: &Rendered) {
        self.sent = Some((rendered.version, rendered.digest));
        self.retry_at = (rendered.outcome != CacheOutcome::Hit).then(|| Instant::now() + LIVE_RETRY);
    }

    /// `rendered` was sent: the rate gap and the heartbeat start again.
    fn note_sent(&mut self, rendered: &Rendered) {
        self.note_rendered(rendered);
        self.next_event_at = Instant::now() + Duration::from_secs(1) / self.max_events_per_s;
        self.heartbeat_at = Instant::now() + HEARTBEAT;
    }

    /// The board at `version` (read before it), shared by every
    /// connection showing it. One render runs at a time per board; a
    /// connection reuses the last one when it was a hit at this version
    /// (its data is at least that new), or when it was not a hit, or
    /// failed, and began less than [`LIVE_RETRY`] before this connection
    /// asked: a thousand connections on a cold board wait for one live
    /// query, however long it takes, instead of running a thousand.
    async fn render(&self, version: Option<BoardVersion>) -> Result<Rendered, ApiError> {
        let asked = Instant::now();
        let recent = |at: Instant| at + LIVE_RETRY > asked;
        let mut slot = self.render_slot.lock().await;
        if let Some(done) = slot.last.as_ref() {
            let same_hit = done.outcome == CacheOutcome::Hit && Some(done.version) == version;
            if same_hit || (done.outcome != CacheOutcome::Hit && recent(done.at)) {
                return Ok(done.clone());
            }
        }
        if let Some((at, code, message)) = slot.failed.as_ref() {
            if recent(*at) {
                return Err(ApiError::new(*code, message.clone()));
            }
        }
        let at = Instant::now();
        let answer = match self.state.grouped(self.tenant, &self.request, &Freshness::default(), Serve::CachedNow).await
        {
            Ok(answer) => answer,
            Err(e) => {
                slot.failed = Some((at, e.code, e.message.clone()));
                return Err(e);
            }
        };
        let json = answer.body.as_str();
        let mut hasher = DefaultHasher::new();
        json.hash(&mut hasher);
        let version = match (version, answer.outcome) {
            (Some(v), CacheOutcome::Hit) => v,
            _ => BoardVersion::UNKNOWN,
        };
        let frame = Bytes::from(format!("id: {}-{version}\nevent: board\ndata: {json}\n\n", answer.as_of_ms));
        let rendered = Rendered { version, at, frame, digest: hasher.finish(), outcome: answer.outcome };
        slot.last = Some(rendered.clone());
        slot.failed = None;
        Ok(rendered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::{test, App};

    /// What the handler behind the middleware saw: its URI and its
    /// Authorization headers.
    async fn seen(uri: &str, header: Option<&str>) -> String {
        let app =
            test::init_service(App::new().wrap(actix_web::middleware::from_fn(token_from_query)).default_service(
                web::to(|req: HttpRequest| async move {
                    let auth: Vec<&str> =
                        req.headers().get_all(header::AUTHORIZATION).filter_map(|v| v.to_str().ok()).collect();
                    format!("{} {}", req.uri(), auth.join(" | "))
                }),
            ))
            .await;
        let mut req = test::TestRequest::get().uri(uri);
        if let Some(h) = header {
            req = req.insert_header((header::AUTHORIZATION, h));
        }
        let body = test::call_and_read_body(&app, req.to_request()).await;
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[actix_web::test]
    async fn the_query_token_leaves_the_uri_for_the_header() {
        assert_eq!(
            seen("/crm/calls/stream?limit=5&access_token=abc.def", None).await,
            "/crm/calls/stream?limit=5 Bearer abc.def"
        );
        assert_eq!(seen("/board?access_token=abc", None).await, "/board Bearer abc");
        // Percent-encoded names are the same parameter.
        assert_eq!(seen("/crm/calls/stream?access%5Ftoken=x%2By", None).await, "/crm/calls/stream Bearer x+y");
        // Twice, or both ways: two headers, which authentication refuses.
        assert_eq!(seen("/board?access_token=a&access_token=b", None).await, "/board Bearer a | Bearer b");
        assert_eq!(seen("/board?access_token=a", Some("Bearer h")).await, "/board Bearer h | Bearer a");
        // Other paths lose it too, without a header: it is never logged.
        assert_eq!(
            seen("/crm/calls/get-grouped-by-status?limit=2&access_token=a", None).await,
            "/crm/calls/get-grouped-by-status?limit=2 "
        );
        // A percent-encoded path is the path the router matches.
        assert_eq!(seen("/crm/calls/%73tream?access_token=t", None).await, "/crm/calls/%73tream Bearer t");
    }
}
