//! One active projector: a lease in Redis (`SET NX PX`), renewed well
//! before it expires. A projector applies a batch only while its lease has
//! more than [`Lease::margin`] left, and a batch is bounded in time, so two
//! projectors never apply at once; if one dies, another takes over after
//! the TTL, from the checkpoint.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use redis::Script;

use callboard_readmodel::{Keys, ReadModelError, Redis};

const ACQUIRE: &str = include_str!("lua/lease_acquire.lua");
const RENEW: &str = include_str!("lua/lease_renew.lua");
const RELEASE: &str = include_str!("lua/lease_release.lua");

pub struct Lease {
    redis: Redis,
    key: String,
    pub id: String,
    ttl: Duration,
    valid_until: Option<Instant>,
}

impl Lease {
    pub fn new(redis: Redis, keys: &Keys, id: String, ttl: Duration) -> Self {
        Self { redis, key: keys.lease(), id, ttl, valid_until: None }
    }

    /// Time that must be left on the lease to start a batch.
    pub fn margin(&self) -> Duration {
        self.ttl / 2
    }

    /// Takes the lease if it is free (or already ours).
    pub async fn acquire(&mut self) -> Result<bool, ReadModelError> {
        static CELL: OnceLock<Script> = OnceLock::new();
        self.extend(CELL.get_or_init(|| Script::new(ACQUIRE))).await
    }

    /// Extends the lease; `false` when another projector holds it now.
    pub async fn renew(&mut self) -> Result<bool, ReadModelError> {
        static CELL: OnceLock<Script> = OnceLock::new();
        self.extend(CELL.get_or_init(|| Script::new(RENEW))).await
    }

    /// Runs a script that (re)sets the lease to this projector for a TTL
    /// and returns 1 when it did; the lease then runs from before the call.
    async fn extend(&mut self, script: &Script) -> Result<bool, ReadModelError> {
        let started = Instant::now();
        let mut c = self.redis.get().await?;
        let ok: i64 = script.key(&self.key).arg(&self.id).arg(self.ttl.as_millis() as u64).invoke_async(&mut c).await?;
        self.valid_until = (ok == 1).then(|| started + self.ttl);
        Ok(ok == 1)
    }

    /// Renews, retrying failed attempts (a dropped connection, a failover,
    /// Redis refusing writes for a moment) with backoff for as long as the
    /// lease still runs. `false` once another projector holds it, or it
    /// ran out before a renewal got through.
    async fn renew_while_it_lasts(&mut self) -> bool {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.renew().await {
                Ok(held) => return held,
                Err(e) => {
                    let left = self.valid_until.map_or(Duration::ZERO, |u| u.saturating_duration_since(Instant::now()));
                    if left.is_zero() {
                        tracing::warn!(error = %e, "lease renewal failed and the lease ran out");
                        return false;
                    }
                    tracing::warn!(error = %e, left_ms = left.as_millis() as u64, "lease renewal failed; retrying while the lease lasts");
                    tokio::time::sleep(backoff.min(left)).await;
                    backoff = (backoff * 2).min(self.ttl / 6);
                }
            }
        }
    }

    pub async fn release(&mut self) -> Result<(), ReadModelError> {
        static CELL: OnceLock<Script> = OnceLock::new();
        let mut c = self.redis.get().await?;
        let _: i64 =
            CELL.get_or_init(|| Script::new(RELEASE)).key(&self.key).arg(&self.id).invoke_async(&mut c).await?;
        self.valid_until = None;
        Ok(())
    }
}

/// The lease renewed in the background while a projector leads, so that a
/// long snapshot does not let it lapse. Work checks [`Keeper::is_safe`]
/// before each write, or waits with [`Keeper::wait_safe`].
#[derive(Clone)]
pub struct Keeper {
    valid_until: Arc<Mutex<Option<Instant>>>,
    margin: Duration,
}

impl Keeper {
    pub fn is_safe(&self) -> bool {
        let until = *self.valid_until.lock().unwrap_or_else(|e| e.into_inner());
        until.is_some_and(|u| u.saturating_duration_since(Instant::now()) > self.margin)
    }

    /// Waits, writing nothing, while renewals fail but the lease still
    /// runs: `true` once a renewal got through and it is safe to write
    /// again, `false` once the lease is lost (another holds it, or it ran
    /// out). So a Redis that refuses writes for less than the lease's TTL
    /// pauses the leader rather than ending its leadership.
    pub async fn wait_safe(&self) -> bool {
        loop {
            if self.is_safe() {
                return true;
            }
            let until = *self.valid_until.lock().unwrap_or_else(|e| e.into_inner());
            if until.is_none_or(|u| u <= Instant::now()) {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Lease {
    /// Renews every third of the TTL until the returned task is aborted or
    /// the lease is lost (held by another, or run out while renewals kept
    /// failing).
    pub fn keep_alive(&self) -> (Keeper, tokio::task::JoinHandle<()>) {
        let keeper = Keeper { valid_until: Arc::new(Mutex::new(self.valid_until)), margin: self.margin() };
        let mut lease = Lease {
            redis: self.redis.clone(),
            key: self.key.clone(),
            id: self.id.clone(),
            ttl: self.ttl,
            valid_until: self.valid_until,
        };
        let shared = keeper.valid_until.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(lease.ttl / 3).await;
                if !lease.renew_while_it_lasts().await {
                    *shared.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    return;
                }
                *shared.lock().unwrap_or_else(|e| e.into_inner()) = lease.valid_until;
            }
        });
        (keeper, task)
    }
}
