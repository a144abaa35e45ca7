//! callboard's read model in Redis: the key schema ([`keys`]), the value
//! encodings ([`codec`]), the query side ([`ReadModel`]) and the write side
//! the projector uses ([`write`]).
//!
//! Per tenant, Redis holds each status's calls in response order (a ZSET)
//! and the pre-rendered JSON of the first calls of each status (the
//! document window). Users and global statuses are shared by all tenants;
//! the call locators (which name each call's places, making every write
//! idempotent) are spread over shards. [`Redis`] hides whether this is one
//! node or a Redis Cluster. docs/ARCHITECTURE.md explains the consistency argument.

mod answers;
pub mod codec;
pub mod conn;
pub mod keys;
mod local;
mod read;
pub mod state;
pub mod tracking;
pub mod write;

pub use answers::{Lookup, LookupObserver};
pub use conn::{Conn, Redis};
pub use keys::Keys;
pub use read::{BoardVersion, Counters, HistoryWindow, JobStatus, Miss, Progress, Read, ReadModel};
pub use state::{Command, Fingerprint, PoisonEvent, TenantState};

pub use redis;

#[derive(Debug, thiserror::Error)]
pub enum ReadModelError {
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("Redis pool: {0}")]
    Pool(#[from] deadpool_redis::PoolError),
    #[error("a newer projector holds the lease")]
    Fenced,
    /// Redis answered one tenant's write with an error that retrying does
    /// not change (a key of the wrong type, a script error): see
    /// [`is_rejection`].
    #[error("Redis rejected the write of tenant {tenant}: {source}")]
    Rejected { tenant: callboard_domain::TenantId, source: redis::RedisError },
    #[error("Redis configuration: {0}")]
    Config(String),
    /// A read shared by several callers failed (its error, as text).
    #[error("{0}")]
    Shared(std::sync::Arc<str>),
    #[error("corrupt read model value at {key}: {detail}")]
    Corrupt { key: String, detail: String },
    #[error(
        "Redis maxmemory-policy is {found}: callboard requires noeviction, because a read-model key that Redis \
         evicts would be served as a confident wrong answer (set `maxmemory-policy noeviction`, and size maxmemory \
         for the read model)"
    )]
    MayEvict { found: String },
}

/// Whether Redis's answer to one of callboard's write scripts says
/// something about the write itself, so that it would fail the same way
/// again: a key of the wrong type (`WRONGTYPE`), an operation or guard the
/// script refuses (`BADOP`, `BADGUARD`), or a Lua runtime error (`ERR ...
/// user_script ...`). An allow-list: anything else (I/O, time-outs, cluster
/// moves, `OOM`, `LOADING`, `BUSY`, a failover, the fence, an error inside
/// a pipeline, which carries no code) is taken as passing. Redis 7 or
/// later keeps a script's inner error code (6.2 wraps an `OOM` as `ERR`).
pub fn is_rejection(e: &redis::RedisError) -> bool {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_cluster_error() {
        return false;
    }
    match e.code() {
        Some("WRONGTYPE" | "BADOP" | "BADGUARD") => true,
        Some("ERR") => e.detail().is_some_and(|d| d.contains("user_script")) && !e.to_string().contains("OOM"),
        _ => false,
    }
}

impl ReadModelError {
    /// Whether Redis answered that it cannot take the write *now*, with a
    /// server's code for a passing condition on the same, intact node
    /// (writes refused for want of replicas, memory full, a busy script, a
    /// resharding under way): the same write may succeed a moment later.
    /// For a pipeline or transaction, every failed command must carry such
    /// a code. Not a lost or refused connection, a time-out, `LOADING`,
    /// `READONLY` or `MASTERDOWN`: the node may have restarted from older
    /// data or been replaced, which a new leadership checks (a retried
    /// checkpoint could otherwise be saved over it). Never the fence, nor a
    /// rejection.
    pub fn is_passing(&self) -> bool {
        const PASSING: &[&str] = &["NOREPLICAS", "OOM", "BUSY", "TRYAGAIN", "CLUSTERDOWN"];
        let ReadModelError::Redis(e) = self else { return false };
        if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() {
            return false;
        }
        match e.clone().into_server_errors() {
            Some(items) => !items.is_empty() && items.iter().all(|(_, item)| PASSING.contains(&item.code())),
            None => e.code().is_some_and(|c| PASSING.contains(&c)),
        }
    }
}

/// Refuses a Redis that may drop keys on its own: every master's
/// `maxmemory-policy` must be `noeviction`.
pub async fn require_noeviction(redis: &Redis) -> Result<(), ReadModelError> {
    let bad: Vec<String> = redis
        .eviction_policies()
        .await?
        .into_iter()
        .filter(|(_, policy)| policy != "noeviction")
        .map(|(node, policy)| format!("{policy} on {node}"))
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(ReadModelError::MayEvict { found: bad.join(", ") })
    }
}

/// The start-up check of every process: [`require_noeviction`], where only
/// a policy read as something else is an error; one that cannot be read
/// (Redis unreachable, `CONFIG` disabled) is logged and let through, to be
/// checked again later.
pub async fn refuse_eviction(redis: &Redis) -> Result<(), ReadModelError> {
    match require_noeviction(redis).await {
        Err(e @ ReadModelError::MayEvict { .. }) => Err(e),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read Redis's maxmemory-policy; it will be checked again");
            Ok(())
        }
        Ok(()) => Ok(()),
    }
}

impl From<redis::ParsingError> for ReadModelError {
    fn from(e: redis::ParsingError) -> Self {
        ReadModelError::Corrupt { key: "reply".into(), detail: e.to_string() }
    }
}
