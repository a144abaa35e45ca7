//! callboard's read model in Redis: the key schema ([`keys`]), the value
//! encodings ([`codec`]), the query side ([`ReadModel`]) and the write side
//! the projector uses ([`write`]).
//!
//! Per tenant, Redis holds each status's calls in response order (a ZSET)
//! and the pre-rendered JSON of the first calls of each status (the
//! document window). Users, global statuses and the call locators (which
//! name each call's places, making every write idempotent) are shared by
//! all tenants. docs/ARCHITECTURE.md explains the consistency argument.

pub mod codec;
pub mod keys;
mod local;
mod read;
pub mod write;

pub use keys::Keys;
pub use read::{Counters, JobStatus, Progress, ReadModel, TenantState};

pub use redis;

/// Every key matching `pattern` (SCAN, so Redis is never blocked).
pub(crate) async fn scan<C: redis::aio::ConnectionLike>(
    c: &mut C,
    pattern: &str,
) -> Result<Vec<String>, ReadModelError> {
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, chunk): (u64, Vec<String>) =
            redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000).query_async(c).await?;
        keys.extend(chunk);
        cursor = next;
        if cursor == 0 {
            return Ok(keys);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadModelError {
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("Redis pool: {0}")]
    Pool(#[from] deadpool_redis::PoolError),
    #[error("a newer projector holds the lease")]
    Fenced,
    #[error("corrupt read model value at {key}: {detail}")]
    Corrupt { key: String, detail: String },
}
