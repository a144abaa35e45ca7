//! callboard's configuration: `config/default.toml` (compiled in), then an
//! optional file, then `CALLBOARD_*` environment variables.
//!
//! Every environment variable is listed in [`ENV_KEYS`]; the names are a
//! public interface. An unknown key or variable is an error, and every error
//! names the key (and its variable) that is wrong. Settings build their own
//! clients ([`MongoSettings::client`], [`RedisSettings::pool`]).

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use callboard_domain::render::UserFields;
use callboard_domain::{Limit, MAX_LIMIT_CEILING};
use serde::Deserialize;

const DEFAULT_TOML: &str = include_str!("../../../config/default.toml");

/// Environment variable -> configuration key. Values are strings, except
/// those listed in [`LIST_KEYS`] (comma lists) and [`INT_KEYS`].
pub const ENV_KEYS: &[(&str, &str)] = &[
    ("CALLBOARD_HTTP_ADDR", "http.addr"),
    ("CALLBOARD_HTTP_WORKERS", "http.workers"),
    ("CALLBOARD_METRICS_ADDR", "http.metrics_addr"),
    ("CALLBOARD_MONGODB_URI", "mongodb.uri"),
    ("CALLBOARD_MONGODB_DB", "mongodb.db"),
    ("CALLBOARD_REDIS_URL", "redis.url"),
    ("CALLBOARD_REDIS_CLUSTER_NODES", "redis.cluster_nodes"),
    ("CALLBOARD_REDIS_KEY_PREFIX", "redis.key_prefix"),
    ("CALLBOARD_JWT_SECRET", "auth.jwt_secret"),
    ("CALLBOARD_ADMIN_JWT_SECRET", "auth.admin_jwt_secret"),
    ("CALLBOARD_USER_FIELDS", "query.user_fields"),
    ("CALLBOARD_PROJECTOR_PARTITIONS", "projector.partitions"),
    ("CALLBOARD_PROJECTOR_WATERMARK_COLLECTION", "projector.watermark_collection"),
    ("CALLBOARD_QUERY_MAX_STALENESS_MS", "query.max_staleness_ms"),
    ("CALLBOARD_QUERY_RESPONSE_CACHE_MB", "query.response_cache_mb"),
    ("CALLBOARD_QUERY_RESPONSE_CACHE_TRACK_MS", "query.response_cache_track_ms"),
    ("CALLBOARD_RECONCILE_INTERVAL_S", "reconcile.interval_s"),
    ("CALLBOARD_RECONCILE_MAX_QUERIES_PER_S", "reconcile.max_queries_per_s"),
    ("CALLBOARD_STREAM_MAX_EVENTS_PER_S", "stream.max_events_per_s"),
    ("CALLBOARD_STREAM_POLL_MS", "stream.poll_ms"),
    ("CALLBOARD_STREAM_MAX_CONNECTIONS", "stream.max_connections"),
    ("CALLBOARD_LOG", "log.filter"),
    ("CALLBOARD_LOG_FORMAT", "log.format"),
];
const LIST_KEYS: &[&str] = &["query.user_fields", "redis.cluster_nodes"];
const INT_KEYS: &[&str] = &[
    "http.workers",
    "projector.partitions",
    "query.max_staleness_ms",
    "query.response_cache_mb",
    "query.response_cache_track_ms",
    "reconcile.interval_s",
    "reconcile.max_queries_per_s",
    "stream.max_events_per_s",
    "stream.poll_ms",
    "stream.max_connections",
];

/// Whether a process started with `CALLBOARD_<name>` in its environment
/// accepts it: a setting ([`ENV_KEYS`]) or one of the reserved variables
/// below. Any other `CALLBOARD_*` variable fails start-up.
pub fn is_accepted_env(name: &str) -> bool {
    ENV_KEYS.iter().any(|(e, _)| *e == name) || is_reserved_env(name)
}

/// `CALLBOARD_*` variables that are not settings: the config file's path,
/// the operator commands' API and token, and the test harness's own.
fn is_reserved_env(name: &str) -> bool {
    matches!(name, "CALLBOARD_CONFIG" | "CALLBOARD_URL" | "CALLBOARD_ADMIN_TOKEN")
        || name.starts_with("CALLBOARD_TEST_")
        || name.starts_with("CALLBOARD_STANDIN_")
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("unknown environment variable {0}: not a callboard setting (see config/default.toml)")]
    UnknownEnv(String),
    #[error("{key}{}: {message}", env_hint(.key))]
    Invalid { key: &'static str, message: String },
}

fn env_hint(key: &str) -> String {
    ENV_KEYS.iter().find(|(_, k)| *k == key).map(|(e, _)| format!(" ({e})")).unwrap_or_default()
}

fn invalid(key: &'static str, message: impl Into<String>) -> SettingsError {
    SettingsError::Invalid { key, message: message.into() }
}

/// A value that must not reach logs: `Debug` and `Display` print `[redacted]`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub http: HttpSettings,
    pub mongodb: MongoSettings,
    pub redis: RedisSettings,
    pub auth: AuthSettings,
    pub projector: ProjectorSettings,
    pub query: QuerySettings,
    pub reconcile: ReconcileSettings,
    pub stream: StreamSettings,
    pub log: LogSettings,
}

/// `GET /crm/calls/stream`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSettings {
    /// Board events one connection gets a second at most (changes in
    /// between are coalesced into the next).
    pub max_events_per_s: u32,
    /// How often each API process reads the versions of the boards its
    /// connections watch.
    pub poll_ms: u64,
    /// Connections one API process holds at most; more get 503.
    pub max_connections: usize,
}

/// The projectors' background verifier.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileSettings {
    /// Every warm tenant is compared with MongoDB at least once per this
    /// many seconds; 0: no background verification.
    pub interval_s: u64,
    /// Live queries a second one projector process may run for it.
    pub max_queries_per_s: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectorSettings {
    pub batch_max: usize,
    pub lease_ttl_ms: u64,
    /// Documents kept per status (the first ranks); at least `query.max_limit`
    /// for every read to be served from Redis.
    pub doc_window: u64,
    /// Partitions the tenants are spread over; every projector process of
    /// a deployment must have the same count.
    pub partitions: u32,
    /// The collection watermarks are written to; empty: none are written,
    /// and answers' `as_of` is coarser.
    pub watermark_collection: String,
    pub watermark_interval_ms: u64,
    /// Warn when the oldest checkpoint's age passes this share of
    /// MongoDB's history window.
    pub history_warn_share: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub addr: String,
    pub max_body_bytes: usize,
    /// A request body must arrive within this, in ms; else 408.
    pub body_timeout_ms: u64,
    pub workers: usize,
    /// Connections each worker holds at once; past it, new ones wait in
    /// the accept queue until one closes.
    pub max_connections_per_worker: usize,
    /// When set, `/metrics` is served here only, not on `addr`.
    pub metrics_addr: Option<String>,
    /// On SIGTERM, how long (ms) the API keeps serving with `/readyz`
    /// failing, so that load balancers stop sending it requests first.
    pub shutdown_delay_ms: u64,
    /// Then how long (s) requests in flight get to finish.
    pub shutdown_timeout_s: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MongoSettings {
    /// May carry credentials, hence a secret.
    pub uri: Secret,
    pub db: String,
    pub server_selection_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// One node; [`RedisSettings::DEFAULT_URL`] when neither this nor
    /// `cluster_nodes` is set. May carry a password, hence a secret.
    pub url: Option<Secret>,
    /// Seed nodes of a Redis Cluster.
    #[serde(default)]
    pub cluster_nodes: Vec<Secret>,
    pub pool_size: usize,
    pub key_prefix: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub jwt_secret: Option<Secret>,
    /// The operator plane's own secret: when set, only tokens signed with
    /// it act as admin.
    pub admin_jwt_secret: Option<Secret>,
    /// When set, a token's `aud` must include it; when not, any `aud`.
    pub audience: Option<String>,
    /// When set, a token's `iss` must equal it; when not, any `iss`.
    pub issuer: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_s: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuerySettings {
    pub default_limit: u32,
    pub max_limit: u32,
    pub user_fields: Vec<String>,
    /// Live aggregations running at once per API process at most.
    pub max_live_concurrency: usize,
    /// How long a live query waits for a slot before `database_busy`.
    pub live_queue_wait_ms: u64,
    /// Deadline of a live query, here and as MongoDB's `maxTimeMS`.
    pub live_timeout_ms: u64,
    /// The most calls one answer may show, over all its statuses.
    pub max_response_calls: usize,
    /// How long a `min_as_of` request waits for the projector, in ms.
    pub max_wait_ms: u64,
    /// `max_staleness_ms` for requests that give none; unset: unbounded.
    #[serde(default)]
    pub max_staleness_ms: Option<u64>,
    /// MiB of rendered answers each API process keeps for reuse; 0: none.
    pub response_cache_mb: u64,
    /// On a single node, a kept answer is reused with no round trip while
    /// Redis's tracking vouches for it at most this many ms behind; 0:
    /// every reuse reads its label (one `MGET`).
    pub response_cache_track_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub filter: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Settings {
    /// Loads the layers: defaults, `file` if given, then `env`.
    pub fn load<I>(file: Option<&Path>, env: I) -> Result<Self, SettingsError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut tree = parse_toml("config/default.toml (built in)", DEFAULT_TOML)?;
        if let Some(path) = file {
            let shown = path.display().to_string();
            let text =
                std::fs::read_to_string(path).map_err(|source| SettingsError::Read { path: shown.clone(), source })?;
            merge(&mut tree, parse_toml(&shown, &text)?);
        }
        for (name, value) in env {
            if !name.starts_with("CALLBOARD_") || is_reserved_env(&name) {
                continue;
            }
            let Some((_, key)) = ENV_KEYS.iter().find(|(e, _)| *e == name) else {
                return Err(SettingsError::UnknownEnv(name));
            };
            set(&mut tree, key, env_value(key, &value)?);
        }
        // Through text, so that a type error points at the offending key.
        let merged = toml::to_string(&tree)
            .map_err(|e| SettingsError::Parse { path: "configuration".into(), message: e.to_string() })?;
        let settings: Settings = toml::from_str(&merged).map_err(|e| SettingsError::Parse {
            path: "configuration".into(),
            message: e.to_string().trim_end().to_string(),
        })?;
        settings.validate()?;
        Ok(settings)
    }

    /// Loads from the process environment.
    pub fn from_env(file: Option<&Path>) -> Result<Self, SettingsError> {
        let file = file.map(Path::to_path_buf).or_else(|| std::env::var_os("CALLBOARD_CONFIG").map(Into::into));
        // A variable that is not UTF-8 cannot be a setting; a CALLBOARD_ one
        // still fails as unknown rather than being skipped.
        let env =
            std::env::vars_os().map(|(k, v)| (k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned()));
        Self::load(file.as_deref(), env)
    }

    fn validate(&self) -> Result<(), SettingsError> {
        self.http.socket_addr()?;
        self.http.metrics_socket_addr()?;
        if self.http.max_body_bytes == 0 {
            return Err(invalid("http.max_body_bytes", "must be positive"));
        }
        if self.http.max_connections_per_worker == 0 {
            return Err(invalid("http.max_connections_per_worker", "must be positive"));
        }
        if self.http.body_timeout_ms < 100 || self.http.body_timeout_ms > 600_000 {
            return Err(invalid("http.body_timeout_ms", "must be between 100 and 600000"));
        }
        if self.http.shutdown_delay_ms > 600_000 {
            return Err(invalid("http.shutdown_delay_ms", "must be at most 600000"));
        }
        if self.http.shutdown_timeout_s > 600 {
            return Err(invalid("http.shutdown_timeout_s", "must be at most 600"));
        }
        let uri = self.mongodb.uri.expose();
        if !(uri.starts_with("mongodb://") || uri.starts_with("mongodb+srv://")) {
            return Err(invalid("mongodb.uri", "must start with mongodb:// or mongodb+srv://"));
        }
        if self.mongodb.db.is_empty() || self.mongodb.db.contains(['/', '\\', '.', ' ', '"', '$']) {
            return Err(invalid("mongodb.db", format!("{:?} is not a valid database name", self.mongodb.db)));
        }
        if self.redis.url.is_some() && !self.redis.cluster_nodes.is_empty() {
            return Err(invalid(
                "redis.cluster_nodes",
                "and redis.url (CALLBOARD_REDIS_URL) are both set: give one Redis node or a cluster's seed nodes, not both",
            ));
        }
        let url = self.redis.url();
        if !(url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://")) {
            return Err(invalid("redis.url", "must start with redis://, rediss:// or unix://"));
        }
        for node in &self.redis.cluster_nodes {
            if !(node.expose().starts_with("redis://") || node.expose().starts_with("rediss://")) {
                return Err(invalid("redis.cluster_nodes", "each node must start with redis:// or rediss://"));
            }
        }
        if self.redis.pool_size == 0 {
            return Err(invalid("redis.pool_size", "must be positive"));
        }
        if self.redis.key_prefix.is_empty() || self.redis.key_prefix.contains(['{', '}', ':', ' ']) {
            return Err(invalid("redis.key_prefix", "must be non-empty, without braces, colons or spaces"));
        }
        if let Some(secret) = &self.auth.jwt_secret {
            check_jwt_secret("auth.jwt_secret", secret)?;
        }
        if let Some(admin) = &self.auth.admin_jwt_secret {
            check_jwt_secret("auth.admin_jwt_secret", admin)?;
            if self.auth.jwt_secret.as_ref().is_some_and(|s| s.expose() == admin.expose()) {
                return Err(invalid(
                    "auth.admin_jwt_secret",
                    "must differ from auth.jwt_secret (CALLBOARD_JWT_SECRET)",
                ));
            }
        }
        if self.auth.leeway_s > 300 {
            return Err(invalid("auth.leeway_s", "must be at most 300"));
        }
        for (key, value) in [("auth.audience", &self.auth.audience), ("auth.issuer", &self.auth.issuer)] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(invalid(key, "must not be empty (leave it unset to accept any)"));
            }
        }
        if self.projector.batch_max == 0 {
            return Err(invalid("projector.batch_max", "must be positive"));
        }
        if self.projector.lease_ttl_ms < 1000 {
            return Err(invalid("projector.lease_ttl_ms", "must be at least 1000"));
        }
        if self.projector.partitions == 0 || self.projector.partitions > 1024 {
            return Err(invalid("projector.partitions", "must be between 1 and 1024"));
        }
        if self.projector.doc_window == 0 || self.projector.doc_window > 100_000 {
            return Err(invalid("projector.doc_window", "must be between 1 and 100000"));
        }
        if self.query.max_live_concurrency == 0 || self.query.max_live_concurrency > 10_000 {
            return Err(invalid("query.max_live_concurrency", "must be between 1 and 10000"));
        }
        if self.query.live_timeout_ms < 100 || self.query.live_timeout_ms > 600_000 {
            return Err(invalid("query.live_timeout_ms", "must be between 100 and 600000"));
        }
        if self.query.max_response_calls < self.query.max_limit as usize {
            return Err(invalid("query.max_response_calls", "must be at least query.max_limit"));
        }
        if self.query.live_queue_wait_ms > 600_000 {
            return Err(invalid("query.live_queue_wait_ms", "must be at most 600000"));
        }
        if self.query.max_wait_ms > 60_000 {
            return Err(invalid("query.max_wait_ms", "must be at most 60000"));
        }
        if self.query.response_cache_mb > 1 << 20 {
            return Err(invalid("query.response_cache_mb", "must be at most 1048576 (1 TiB)"));
        }
        if self.query.response_cache_track_ms == 1 || self.query.response_cache_track_ms > 1_000 {
            return Err(invalid(
                "query.response_cache_track_ms",
                "must be 0 (off) or from 2 to 1000 (a heartbeat every half of it)",
            ));
        }
        let coll = &self.projector.watermark_collection;
        if coll.starts_with("system.") || coll.contains(['$', '\0']) || coll.len() > 120 {
            return Err(invalid(
                "projector.watermark_collection",
                format!("{coll:?} is not a collection name callboard can write to (or leave it empty for none)"),
            ));
        }
        if ["calls", "users", "call_status"].contains(&coll.as_str()) {
            return Err(invalid(
                "projector.watermark_collection",
                format!("must not be one of the CRM's collections ({coll})"),
            ));
        }
        if !(self.projector.history_warn_share > 0.0 && self.projector.history_warn_share <= 1.0) {
            return Err(invalid("projector.history_warn_share", "must be above 0 and at most 1"));
        }
        if self.projector.watermark_interval_ms < 10 || self.projector.watermark_interval_ms > 60_000 {
            return Err(invalid("projector.watermark_interval_ms", "must be between 10 and 60000"));
        }
        if self.stream.max_events_per_s == 0 || self.stream.max_events_per_s > 100 {
            return Err(invalid("stream.max_events_per_s", "must be between 1 and 100"));
        }
        if !(10..=10_000).contains(&self.stream.poll_ms) {
            return Err(invalid("stream.poll_ms", "must be between 10 and 10000"));
        }
        if self.stream.max_connections == 0 {
            return Err(invalid("stream.max_connections", "must be at least 1"));
        }
        if self.reconcile.interval_s > 86_400 {
            return Err(invalid("reconcile.interval_s", "must be at most 86400 (0: off)"));
        }
        if self.reconcile.max_queries_per_s == 0 || self.reconcile.max_queries_per_s > 1000 {
            return Err(invalid("reconcile.max_queries_per_s", "must be between 1 and 1000"));
        }
        self.query.max_limit()?;
        self.query.default_limit()?;
        self.query.user_fields()?;
        Ok(())
    }

    /// The token secret; commands that verify or sign tokens need it.
    pub fn jwt_secret(&self) -> Result<&Secret, SettingsError> {
        self.auth.jwt_secret.as_ref().ok_or_else(|| invalid("auth.jwt_secret", "is not set"))
    }
}

/// What the placeholder secrets in `deploy/` contain.
pub const PLACEHOLDER: &str = "REPLACE-ME";

fn check_jwt_secret(key: &'static str, secret: &Secret) -> Result<(), SettingsError> {
    if secret.expose().len() < 32 {
        return Err(invalid(key, "must be at least 32 bytes"));
    }
    // deploy/'s placeholders: a known secret signs anyone's tokens.
    if secret.expose().to_ascii_uppercase().contains(PLACEHOLDER) {
        return Err(invalid(key, format!("is still a placeholder ({PLACEHOLDER}...): set a secret of your own")));
    }
    Ok(())
}

impl HttpSettings {
    pub fn socket_addr(&self) -> Result<SocketAddr, SettingsError> {
        self.addr
            .parse()
            .map_err(|_| invalid("http.addr", format!("{:?} is not an address like 0.0.0.0:8006", self.addr)))
    }

    /// Where `/metrics` is served on its own, if anywhere.
    pub fn metrics_socket_addr(&self) -> Result<Option<SocketAddr>, SettingsError> {
        self.metrics_addr
            .as_deref()
            .map(|a| {
                a.parse()
                    .map_err(|_| invalid("http.metrics_addr", format!("{a:?} is not an address like 127.0.0.1:9006")))
            })
            .transpose()
    }
}

impl QuerySettings {
    pub fn max_limit(&self) -> Result<u32, SettingsError> {
        if self.max_limit == 0 || self.max_limit > MAX_LIMIT_CEILING {
            return Err(invalid("query.max_limit", format!("must be between 1 and {MAX_LIMIT_CEILING}")));
        }
        Ok(self.max_limit)
    }

    pub fn default_limit(&self) -> Result<Limit, SettingsError> {
        let max = self.max_limit()?;
        Limit::new(i64::from(self.default_limit), max)
            .map_err(|_| invalid("query.default_limit", format!("must be between 1 and query.max_limit ({max})")))
    }

    pub fn user_fields(&self) -> Result<UserFields, SettingsError> {
        UserFields::new(self.user_fields.clone()).map_err(|e| invalid("query.user_fields", e.to_string()))
    }
}

impl MongoSettings {
    /// A client for the configured deployment. Connecting is lazy; the first
    /// operation reports an unreachable server.
    pub async fn client(&self) -> Result<mongodb::Client, SettingsError> {
        let mut options = mongodb::options::ClientOptions::parse(self.uri.expose())
            .await
            .map_err(|e| invalid("mongodb.uri", e.to_string()))?;
        options.app_name.get_or_insert_with(|| "callboard".into());
        let timeout = std::time::Duration::from_millis(self.server_selection_timeout_ms);
        options.server_selection_timeout = Some(timeout);
        options.connect_timeout.get_or_insert(timeout);
        mongodb::Client::with_options(options).map_err(|e| invalid("mongodb.uri", e.to_string()))
    }

    pub async fn database(&self) -> Result<mongodb::Database, SettingsError> {
        Ok(self.client().await?.database(&self.db))
    }
}

impl RedisSettings {
    pub const DEFAULT_URL: &'static str = "redis://127.0.0.1:6379";

    /// The single node's URL.
    pub fn url(&self) -> &str {
        self.url.as_ref().map(Secret::expose).unwrap_or(Self::DEFAULT_URL)
    }

    pub fn is_cluster(&self) -> bool {
        !self.cluster_nodes.is_empty()
    }

    /// A client for connections outside the pool (the API's hot path on
    /// a single node).
    pub fn client(&self) -> Result<deadpool_redis::redis::Client, SettingsError> {
        deadpool_redis::redis::Client::open(self.url()).map_err(|e| invalid("redis.url", e.to_string()))
    }

    /// The read model's Redis: a pool on one node, or the cluster client
    /// (which connects now, so an unreachable cluster fails here).
    pub async fn connect(&self) -> Result<callboard_readmodel::Redis, SettingsError> {
        if self.is_cluster() {
            let seeds: Vec<String> = self.cluster_nodes.iter().map(|n| n.expose().to_string()).collect();
            callboard_readmodel::Redis::cluster(&seeds).await.map_err(|e| invalid("redis.cluster_nodes", e.to_string()))
        } else {
            callboard_readmodel::Redis::single_url(self.url(), self.pool_size)
                .map_err(|e| invalid("redis.url", e.to_string()))
        }
    }
}

fn parse_toml(path: &str, text: &str) -> Result<toml::Table, SettingsError> {
    text.parse::<toml::Table>()
        .map_err(|e| SettingsError::Parse { path: path.into(), message: e.message().to_string() })
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn set(tree: &mut toml::Table, key: &str, value: toml::Value) {
    let (section, field) = key.split_once('.').expect("ENV_KEYS are section.field");
    let table = tree.entry(section).or_insert_with(|| toml::Value::Table(Default::default()));
    if let toml::Value::Table(t) = table {
        t.insert(field.to_string(), value);
    }
}

fn env_value(key: &'static str, raw: &str) -> Result<toml::Value, SettingsError> {
    if LIST_KEYS.contains(&key) {
        let items = raw.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| toml::Value::String(s.into()));
        return Ok(toml::Value::Array(items.collect()));
    }
    if INT_KEYS.contains(&key) {
        return raw
            .trim()
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .map(toml::Value::Integer)
            .ok_or_else(|| invalid(key, format!("{raw:?} is not a non-negative integer")));
    }
    Ok(toml::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(env: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        Settings::load(None, env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn defaults_load_and_env_overrides_apply() {
        let s = load(&[]).unwrap();
        assert_eq!(s.http.addr, "0.0.0.0:8006");
        assert_eq!(s.mongodb.db, "crm");
        assert!(s.auth.jwt_secret.is_none());
        let s = load(&[
            ("CALLBOARD_MONGODB_URI", "mongodb://db:27017"),
            ("CALLBOARD_MONGODB_DB", "other"),
            ("CALLBOARD_REDIS_URL", "redis://r:6380"),
            ("CALLBOARD_HTTP_ADDR", "127.0.0.1:9000"),
            ("CALLBOARD_JWT_SECRET", "0123456789abcdef0123456789abcdef"),
            ("CALLBOARD_LOG", "debug"),
            ("CALLBOARD_USER_FIELDS", "id, name"),
            ("CALLBOARD_TEST_MONGODB_URI", "ignored"),
            ("PATH", "/bin"),
        ])
        .unwrap();
        assert_eq!(s.mongodb.uri.expose(), "mongodb://db:27017");
        assert_eq!(s.mongodb.db, "other");
        assert_eq!(s.redis.url(), "redis://r:6380");
        assert!(!s.redis.is_cluster());
        assert_eq!(s.http.socket_addr().unwrap().port(), 9000);
        assert_eq!(s.jwt_secret().unwrap().expose().len(), 32);
        assert_eq!(s.log.filter, "debug");
        assert_eq!(s.query.user_fields().unwrap().names(), ["id", "name"]);
        let s = load(&[("CALLBOARD_REDIS_CLUSTER_NODES", "redis://a:7000, redis://b:7001")]).unwrap();
        assert!(s.redis.is_cluster());
        assert_eq!(s.redis.cluster_nodes, [Secret::new("redis://a:7000"), Secret::new("redis://b:7001")]);
        assert_eq!(load(&[]).unwrap().redis.url(), RedisSettings::DEFAULT_URL);
        assert_eq!(load(&[]).unwrap().query.response_cache_track_ms, 10);
        let s = load(&[("CALLBOARD_QUERY_RESPONSE_CACHE_TRACK_MS", "0")]).unwrap();
        assert_eq!(s.query.response_cache_track_ms, 0);
    }

    #[test]
    fn errors_name_the_key_and_variable() {
        let cases: &[(&str, &str, &str)] = &[
            ("CALLBOARD_HTTP_ADDR", "nonsense", "http.addr (CALLBOARD_HTTP_ADDR)"),
            ("CALLBOARD_MONGODB_URI", "http://x", "mongodb.uri (CALLBOARD_MONGODB_URI)"),
            ("CALLBOARD_MONGODB_DB", "a.b", "mongodb.db (CALLBOARD_MONGODB_DB)"),
            ("CALLBOARD_REDIS_URL", "localhost", "redis.url (CALLBOARD_REDIS_URL)"),
            ("CALLBOARD_JWT_SECRET", "short", "auth.jwt_secret (CALLBOARD_JWT_SECRET)"),
            ("CALLBOARD_USER_FIELDS", "_id,name", "query.user_fields (CALLBOARD_USER_FIELDS)"),
            ("CALLBOARD_HTTP_WORKERS", "-2", "http.workers (CALLBOARD_HTTP_WORKERS)"),
            ("CALLBOARD_PROJECTOR_PARTITIONS", "0", "projector.partitions (CALLBOARD_PROJECTOR_PARTITIONS)"),
            ("CALLBOARD_MONGO_URI", "mongodb://x", "CALLBOARD_MONGO_URI"),
            ("CALLBOARD_REDIS_CLUSTER_NODES", "localhost:7000", "redis.cluster_nodes (CALLBOARD_REDIS_CLUSTER_NODES)"),
            (
                "CALLBOARD_QUERY_RESPONSE_CACHE_TRACK_MS",
                "1",
                "query.response_cache_track_ms (CALLBOARD_QUERY_RESPONSE_CACHE_TRACK_MS)",
            ),
            (
                "CALLBOARD_QUERY_RESPONSE_CACHE_TRACK_MS",
                "1001",
                "query.response_cache_track_ms (CALLBOARD_QUERY_RESPONSE_CACHE_TRACK_MS)",
            ),
        ];
        for (var, value, expected) in cases {
            let err = load(&[(var, value)]).unwrap_err().to_string();
            assert!(err.contains(expected), "{var}={value}: {err}");
        }
    }

    #[test]
    fn a_node_and_a_cluster_together_fail_naming_both() {
        let err =
            load(&[("CALLBOARD_REDIS_URL", "redis://r:6380"), ("CALLBOARD_REDIS_CLUSTER_NODES", "redis://a:7000")])
                .unwrap_err()
                .to_string();
        assert!(err.contains("CALLBOARD_REDIS_CLUSTER_NODES") && err.contains("CALLBOARD_REDIS_URL"), "{err}");
    }

    #[test]
    fn unknown_file_keys_fail_and_secrets_are_redacted() {
        let dir = std::env::temp_dir().join(format!("cb-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, "[http]\nadress = \"x\"\n").unwrap();
        let err = Settings::load(Some(&path), std::iter::empty()).unwrap_err().to_string();
        assert!(err.contains("adress"), "{err}");
        std::fs::write(&path, "[query]\nmax_limit = 50\ndefault_limit = 60\n").unwrap();
        let err = Settings::load(Some(&path), std::iter::empty()).unwrap_err().to_string();
        assert!(err.contains("query.default_limit"), "{err}");
        std::fs::write(&path, "[query]\nmax_limit = \"many\"\n").unwrap();
        let err = Settings::load(Some(&path), std::iter::empty()).unwrap_err().to_string();
        assert!(err.contains("max_limit"), "{err}");
        let s = load(&[("CALLBOARD_JWT_SECRET", "0123456789abcdef0123456789abcdef")]).unwrap();
        assert!(!format!("{s:?}").contains("0123456789abcdef"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
