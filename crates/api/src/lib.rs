//! callboard's HTTP surface.
//!
//! Handlers are short: extract typed input ([`Caller`] from the bearer
//! token, [`params::GroupedParams`] from the query string and body),
//! call the domain, render. Every error leaves through [`error::ApiError`].
//! [`create_app`] builds the actix `App`, so tests can drive it in process or
//! over a port; [`Application`] binds and runs it.

pub mod auth;
pub mod error;
pub mod freshness;
pub mod live;
pub mod metrics;
pub mod openapi;
pub mod params;
mod routes;
mod state;
pub mod stream;
pub mod verify;

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{Server, ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::{web, App, HttpServer};
use callboard_readmodel::keys::Partitioning;
use callboard_readmodel::{Keys, ReadModel};
use callboard_settings::{Settings, SettingsError};
use callboard_store::LiveQuery;
use tracing_actix_web::{DefaultRootSpanBuilder, RootSpanBuilder, TracingLogger};

pub use auth::{Caller, JwtKeys, Role, TokenRules};
pub use freshness::Watermarks;
pub use live::{LiveGate, LiveLimits};
pub use metrics::Metrics;
pub use params::ParamLimits;
pub use state::{Answer, AppState, CacheOutcome};

pub const GROUPED_PATH: &str = "/crm/calls/get-grouped-by-status";
/// The live Kanban page.
pub const BOARD_PATH: &str = "/board";
pub use stream::{Boards, StreamLimits, STREAM_PATH};

/// The fuzzing properties' cases: `CALLBOARD_FUZZ_CASES` (`make fuzz`),
/// else 500 each.
#[cfg(test)]
pub(crate) fn fuzz_config() -> proptest::test_runner::Config {
    let cases = std::env::var("CALLBOARD_FUZZ_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(500);
    proptest::test_runner::Config { cases, failure_persistence: None, ..Default::default() }
}

/// Everything the app needs, built from settings.
#[derive(Clone)]
pub struct AppParts {
    pub state: AppState,
    pub keys: JwtKeys,
    pub limits: ParamLimits,
    /// `/metrics` on the main address (false when it has its own).
    pub public_metrics: bool,
    pub boards: Boards,
}

impl AppParts {
    pub async fn from_settings(settings: &Settings) -> Result<Self, ApplicationError> {
        let db = settings.mongodb.database().await?;
        let redis = settings.redis.connect().await?;
        // A policy that may evict: the process must not start.
        callboard_readmodel::refuse_eviction(&redis).await.map_err(ApplicationError::Redis)?;
        let noeviction = Arc::new(AtomicBool::new(true));
        let metrics = Metrics::new();
        let mut cache = ReadModel::new(redis.clone(), Keys::new(&settings.redis.key_prefix))
            .with_user_fields(settings.query.user_fields()?)
            .with_answer_cache(settings.query.response_cache_mb << 20, Some(metrics.answer_lookup_observer()));
        if !settings.redis.is_cluster() {
            let client = settings.redis.client()?;
            cache = cache
                .with_tracking(&client, Duration::from_millis(settings.query.response_cache_track_ms))
                .map_err(ApplicationError::Redis)?
                .with_hot_client(client);
        }
        let limits = LiveLimits {
            max_concurrency: settings.query.max_live_concurrency,
            queue_wait: Duration::from_millis(settings.query.live_queue_wait_ms),
            timeout: Duration::from_millis(settings.query.live_timeout_ms),
        };
        let live = LiveGate::new(LiveQuery::new(db, settings.query.user_fields()?), limits, metrics.clone());
        tokio::spawn(watch_policy(redis, noeviction.clone()));
        tokio::spawn(count_tenants(cache.clone(), metrics.clone()));
        let watermarks = Watermarks::spawn(cache.clone(), Partitioning::new(settings.projector.partitions));
        let draining = Arc::new(AtomicBool::new(false));
        let boards = Boards::spawn(
            cache.clone(),
            StreamLimits {
                max_events_per_s: settings.stream.max_events_per_s,
                poll: Duration::from_millis(settings.stream.poll_ms),
                max_connections: settings.stream.max_connections,
            },
            draining.clone(),
        );
        Ok(Self {
            state: AppState {
                live,
                cache,
                metrics,
                noeviction,
                draining,
                max_response_calls: settings.query.max_response_calls,
                watermarks,
                max_wait: Duration::from_millis(settings.query.max_wait_ms),
                max_staleness_ms: settings.query.max_staleness_ms,
                partitions: settings.projector.partitions,
                history_warn_share: settings.projector.history_warn_share,
                verify_calls: settings
                    .query
                    .max_limit()?
                    .min(settings.projector.doc_window.min(u64::from(u32::MAX)) as u32),
            },
            keys: jwt_keys(settings)?,
            limits: ParamLimits {
                max_body_bytes: settings.http.max_body_bytes,
                body_timeout: Duration::from_millis(settings.http.body_timeout_ms),
                default_limit: settings.query.default_limit()?,
                max_limit: settings.query.max_limit()?,
            },
            public_metrics: settings.http.metrics_addr.is_none(),
            boards,
        })
    }
}

/// The token keys and rules the settings describe.
pub fn jwt_keys(settings: &Settings) -> Result<JwtKeys, SettingsError> {
    let rules = auth::TokenRules {
        audience: settings.auth.audience.clone(),
        issuer: settings.auth.issuer.clone(),
        leeway: Duration::from_secs(settings.auth.leeway_s),
    };
    let admin = settings.auth.admin_jwt_secret.as_ref().map(|s| s.expose().as_bytes());
    Ok(JwtKeys::with_rules(settings.jwt_secret()?.expose().as_bytes(), admin, &rules))
}

/// How often an API process re-reads Redis's `maxmemory-policy`.
const POLICY_CHECK: Duration = Duration::from_secs(5);

/// Recounts the tenants by state every [`metrics::TENANT_COUNT_EVERY`], so
/// that a scrape does no per-tenant work on Redis.
async fn count_tenants(cache: ReadModel, metrics: Metrics) {
    loop {
        metrics.refresh_tenant_counts(&cache).await;
        tokio::time::sleep(metrics::TENANT_COUNT_EVERY).await;
    }
}

/// Re-reads the policy every [`POLICY_CHECK`]. While it reads anything but
/// `noeviction`, hits are not served and `/readyz` fails; a check that
/// cannot read it keeps the last verdict.
async fn watch_policy(redis: callboard_readmodel::Redis, noeviction: Arc<AtomicBool>) {
    loop {
        tokio::time::sleep(POLICY_CHECK).await;
        match callboard_readmodel::require_noeviction(&redis).await {
            Ok(()) => {
                if !noeviction.swap(true, Ordering::Relaxed) {
                    tracing::info!("Redis's maxmemory-policy is noeviction again: serving from the cache");
                }
            }
            Err(e @ callboard_readmodel::ReadModelError::MayEvict { .. }) => {
                if noeviction.swap(false, Ordering::Relaxed) {
                    tracing::error!(error = %e, "Redis may drop keys: answering live, not ready");
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot read Redis's maxmemory-policy; keeping the last verdict"),
        }
    }
}

/// Request spans carry the route, the tenant and whether the cache served.
pub struct CallboardSpan;

impl RootSpanBuilder for CallboardSpan {
    fn on_request_start(request: &ServiceRequest) -> tracing::Span {
        // `root_span!` reads the connection's info, the route, the user
        // agent and the request id before it asks whether the span is
        // wanted: 3.5% of the samples of `serve` answering kept counts
        // (ADR 0016). With no
        // subscriber taking spans at INFO (`CALLBOARD_LOG=warn`), it would
        // be a disabled span anyway.
        if tracing::level_filters::LevelFilter::current() < tracing::Level::INFO {
            return tracing::Span::none();
        }
        tracing_actix_web::root_span!(
            request,
            tenant = tracing::field::Empty,
            cache = tracing::field::Empty,
            miss_reason = tracing::field::Empty
        )
    }

    fn on_request_end<B: MessageBody>(span: tracing::Span, outcome: &Result<ServiceResponse<B>, actix_web::Error>) {
        DefaultRootSpanBuilder::on_request_end(span, outcome);
    }
}

pub fn create_app(
    parts: AppParts,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let public_metrics = parts.public_metrics;
    App::new()
        .wrap(TracingLogger::<CallboardSpan>::new())
        // Outermost: the token leaves the URI before the logger sees it.
        .wrap(actix_web::middleware::from_fn(stream::token_from_query))
        .app_data(web::Data::new(parts.state))
        .app_data(web::Data::new(parts.boards))
        .app_data(web::Data::new(parts.keys))
        .app_data(web::Data::new(parts.limits))
        .app_data(web::QueryConfig::default().error_handler(|e, _| {
            error::ApiError::new(error::ErrorCode::InvalidParameter, format!("bad query string: {e}")).into()
        }))
        .configure(|c| {
            for (path, method, handler) in routes() {
                if path == METRICS_PATH && !public_metrics {
                    continue;
                }
                let resource = route(path, handler.method(method));
                if path == GROUPED_PATH {
                    // Errors are answered without the cache, so they say miss too.
                    c.service(resource.wrap(
                        actix_web::middleware::DefaultHeaders::new().add((routes::grouped::CACHE_HEADER, "miss")),
                    ));
                } else {
                    c.service(resource);
                }
            }
        })
        .default_service(web::to(error::not_found))
}

const METRICS_PATH: &str = "/metrics";

/// Every route the app serves: its path, method and handler (`/metrics`
/// only when it has no address of its own). The API document lists the
/// same (checked by `openapi`'s tests).
fn routes() -> Vec<(&'static str, Method, actix_web::Route)> {
    vec![
        (GROUPED_PATH, Method::POST, web::to(routes::grouped::get_grouped_by_status)),
        (STREAM_PATH, Method::GET, web::to(stream::stream)),
        (BOARD_PATH, Method::GET, web::to(routes::board::page)),
        ("/openapi.json", Method::GET, web::to(openapi::openapi_json)),
        ("/healthz", Method::GET, web::to(routes::health::healthz)),
        ("/readyz", Method::GET, web::to(routes::health::readyz)),
        ("/projectorz", Method::GET, web::to(routes::health::projectorz)),
        (METRICS_PATH, Method::GET, web::to(routes::health::metrics)),
        ("/admin/cache/warm", Method::POST, web::to(routes::admin::warm)),
        ("/admin/cache/warm/{job_id}", Method::GET, web::to(routes::admin::warm_job)),
        ("/admin/cache/status", Method::GET, web::to(routes::admin::status)),
        ("/admin/cache/invalidate", Method::POST, web::to(routes::admin::invalidate)),
        ("/admin/cache/verify", Method::POST, web::to(routes::admin::verify)),
    ]
}

/// Every (path, method) the app serves.
pub fn route_list() -> Vec<(&'static str, Method)> {
    routes().into_iter().map(|(path, method, _)| (path, method)).collect()
}

/// A path served by one method; other methods get a 405 in the envelope.
fn route(path: &str, handler: actix_web::Route) -> actix_web::Resource {
    web::resource(path).route(handler).default_service(web::to(error::method_not_allowed))
}

/// The API bound to its port (and `/metrics` to its own, if configured),
/// ready to run.
pub struct Application {
    port: u16,
    server: Server,
    metrics: Option<(u16, Server)>,
    draining: Arc<AtomicBool>,
    shutdown_delay: Duration,
}

/// Stops an [`Application`] without dropping requests: `/readyz` fails at
/// once, requests go on being served for the shutdown delay (so that load
/// balancers stop routing here first), then the listener closes and the
/// requests in flight get the shutdown timeout to finish.
#[derive(Clone)]
pub struct Stopper {
    handle: actix_web::dev::ServerHandle,
    draining: Arc<AtomicBool>,
    delay: Duration,
}

impl Stopper {
    /// Stops the API; `hurry` completing (a second signal) cuts the delay
    /// short.
    pub async fn stop(&self, hurry: impl std::future::Future<Output = ()>) {
        self.draining.store(true, Ordering::Relaxed);
        tracing::info!(delay_ms = self.delay.as_millis() as u64, "shutting down: not ready, still serving");
        tokio::select! {
            _ = tokio::time::sleep(self.delay) => {}
            _ = hurry => tracing::info!("second signal: stopping now"),
        }
        tracing::info!("no longer accepting connections; draining requests in flight");
        self.handle.stop(true).await;
    }
}

impl Application {
    pub async fn build(settings: &Settings) -> Result<Self, ApplicationError> {
        let addr = settings.http.socket_addr()?;
        let listener = TcpListener::bind(addr).map_err(|e| ApplicationError::Bind(addr.to_string(), e))?;
        Self::with_listener(settings, listener).await
    }

    pub async fn with_listener(settings: &Settings, listener: TcpListener) -> Result<Self, ApplicationError> {
        let port = listener.local_addr().map_err(|e| ApplicationError::Bind("listener".into(), e))?.port();
        let parts = AppParts::from_settings(settings).await?;
        let metrics_state = parts.state.clone();
        let draining = parts.state.draining.clone();
        let mut server = HttpServer::new(move || create_app(parts.clone()))
            .disable_signals()
            .shutdown_timeout(settings.http.shutdown_timeout_s)
            .max_connections(settings.http.max_connections_per_worker);
        if settings.http.workers > 0 {
            server = server.workers(settings.http.workers);
        }
        let metrics = match settings.http.metrics_socket_addr()? {
            Some(addr) => {
                let state = metrics_state;
                // `/metrics` alone.
                let bound = HttpServer::new(move || {
                    App::new()
                        .app_data(web::Data::new(state.clone()))
                        .service(route("/metrics", web::get().to(routes::health::metrics)))
                        .default_service(web::to(error::not_found))
                })
                .disable_signals()
                .shutdown_timeout(settings.http.shutdown_timeout_s)
                .workers(1)
                .bind(addr)
                .map_err(|e| ApplicationError::Bind(addr.to_string(), e))?;
                let port = bound.addrs().first().map_or(addr.port(), |a| a.port());
                Some((port, bound.run()))
            }
            None => None,
        };
        let server = server.listen(listener).map_err(|e| ApplicationError::Bind("listener".into(), e))?.run();
        Ok(Self {
            port,
            server,
            metrics,
            draining,
            shutdown_delay: Duration::from_millis(settings.http.shutdown_delay_ms),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The port `/metrics` has to itself, if it has one.
    pub fn metrics_port(&self) -> Option<u16> {
        self.metrics.as_ref().map(|(port, _)| *port)
    }

    /// A handle that stops the server gracefully, at once.
    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    /// What stops the server the way a load balancer needs ([`Stopper`]).
    pub fn stopper(&self) -> Stopper {
        Stopper { handle: self.server.handle(), draining: self.draining.clone(), delay: self.shutdown_delay }
    }

    /// Runs until the API is stopped (through [`Application::handle`]);
    /// the metrics server stops with it.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let Some((_, metrics)) = self.metrics else { return self.server.await };
        let metrics_handle = metrics.handle();
        let metrics_task = tokio::spawn(metrics);
        let outcome = self.server.await;
        metrics_handle.stop(true).await;
        let _ = metrics_task.await;
        outcome
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplicationError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(transparent)]
    Redis(callboard_readmodel::ReadModelError),
    #[error("cannot listen on {0}: {1}")]
    Bind(String, std::io::Error),
}

#[cfg(test)]
mod root_span_tests {
    use super::*;
    use actix_web::test;

    /// What the logger's root span is for one request through the app's
    /// logger under `filter`: disabled or not, and its fields' names.
    async fn root_span_under(filter: &str) -> (bool, Vec<String>) {
        let subscriber = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::sink).finish();
        let _default = tracing::subscriber::set_default(subscriber);
        let app = test::init_service(App::new().wrap(TracingLogger::<CallboardSpan>::new()).route(
            "/",
            web::get().to(|span: tracing_actix_web::RootSpan| async move {
                let fields: Option<Vec<String>> =
                    span.metadata().map(|m| m.fields().iter().map(|f| f.name().to_string()).collect());
                web::Json((span.is_disabled(), fields.unwrap_or_default()))
            }),
        ))
        .await;
        test::call_and_read_body_json(&app, test::TestRequest::get().uri("/").to_request()).await
    }

    /// Logging at INFO: every request has its span, with the fields the
    /// handlers record. Logging at WARN (the bench's and a quiet
    /// deployment's): no span, and none of its fields read. One test, the
    /// two filters one after the other: the level the check reads is the
    /// process's (the most verbose of every live subscriber), so two tests
    /// on two threads would see each other's.
    #[actix_web::test]
    async fn a_span_per_request_exactly_when_info_is_logged() {
        let (disabled, fields) = root_span_under("info").await;
        assert!(!disabled);
        for name in ["tenant", "cache", "miss_reason", "request_id", "http.client_ip"] {
            assert!(fields.iter().any(|f| f == name), "{name} in {fields:?}");
        }
        let (disabled, fields) = root_span_under("warn").await;
        assert!(disabled);
        assert!(fields.is_empty(), "{fields:?}");
    }
}
