//! This process's view of how far each projector partition has come (the
//! watermarks the projector publishes, `P:{g}:asof:<p>`), for answers'
//! `as_of` and for requests that wait for their own writes (`min_as_of`).
//!
//! A background task reads every partition's watermark in one pipeline:
//! every [`IDLE_POLL`], and every [`BUSY_POLL`] while a request waits. A
//! copy read before a hit's data is a lower bound of what the data
//! reflects, since the projector publishes a watermark only after the
//! events it stands for are applied; so it may understate freshness by up
//! to a poll, never overstate it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use callboard_domain::{MinAsOf, TenantId, Watermark};
use callboard_readmodel::keys::Partitioning;
use callboard_readmodel::ReadModel;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// How often the watermarks are read while no request waits.
pub const IDLE_POLL: Duration = Duration::from_millis(100);
/// ...and while one does.
pub const BUSY_POLL: Duration = Duration::from_millis(5);

/// The watermarks as read, and the instant the read that first returned
/// them ended: every write they stand for landed in Redis before it.
#[derive(Debug, Clone, PartialEq)]
struct MarksCopy {
    marks: Vec<Watermark>,
    read: Instant,
}

/// The partitions' watermarks, kept fresh. Cheap to clone.
#[derive(Clone)]
pub struct Watermarks {
    inner: Arc<Inner>,
}

struct Inner {
    partitioning: Partitioning,
    /// The copy, and when it was first read back (a read that began
    /// before it and ended after the projector published it).
    latest: watch::Receiver<MarksCopy>,
    /// Requests waiting for a watermark: the poll quickens while any do.
    waiting: AtomicUsize,
    wake: Notify,
}

impl Watermarks {
    /// Starts the refresher; it stops when the last clone is dropped.
    pub fn spawn(cache: ReadModel, partitioning: Partitioning) -> Self {
        let zero = vec![Watermark::default(); partitioning.count() as usize];
        let (tx, latest) = watch::channel(MarksCopy { marks: zero, read: Instant::now() });
        let inner = Arc::new(Inner { partitioning, latest, waiting: AtomicUsize::new(0), wake: Notify::new() });
        tokio::spawn(refresh(cache, partitioning, Arc::downgrade(&inner), tx));
        Self { inner }
    }

    /// What `tenant`'s answers can claim, as last read (the zero
    /// watermark, which vouches for nothing, before the first read).
    pub fn of(&self, tenant: TenantId) -> Watermark {
        self.read_of(tenant).0
    }

    /// [`Self::of`], and the instant its copy was read by: data read
    /// from Redis at a later moment reflects every write it stands for.
    pub fn read_of(&self, tenant: TenantId) -> (Watermark, std::time::Instant) {
        let copy = self.inner.latest.borrow();
        (self.inner.partitioning.claim(tenant, &copy.marks), copy.read.into_std())
    }

    /// Waits until `tenant`'s partition covers `min`, until `deadline` at
    /// most: the covering watermark, or `None` when time ran out.
    pub async fn wait_for(&self, tenant: TenantId, min: MinAsOf, deadline: Instant) -> Option<Watermark> {
        let mut latest = self.inner.latest.clone();
        let _waiting = Waiting::new(&self.inner);
        loop {
            let w = self.inner.partitioning.claim(tenant, &latest.borrow_and_update().marks);
            if w.covers(min) {
                return Some(w);
            }
            match tokio::time::timeout_at(deadline, latest.changed()).await {
                Ok(Ok(())) => {}
                // Timed out, or the refresher is gone.
                _ => return None,
            }
        }
    }
}

/// Counts a waiting request while it lives, and wakes the refresher.
struct Waiting<'a>(&'a Inner);

impl<'a> Waiting<'a> {
    fn new(inner: &'a Inner) -> Self {
        inner.waiting.fetch_add(1, Ordering::SeqCst);
        inner.wake.notify_one();
        Self(inner)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn refresh(cache: ReadModel, partitioning: Partitioning, inner: Weak<Inner>, tx: watch::Sender<MarksCopy>) {
    let mut failing = false;
    loop {
        match cache.watermarks(partitioning.count()).await {
            Ok(marks) => {
                failing = false;
                let read = Instant::now();
                tx.send_if_modified(|current| {
                    // The first read of a copy keeps its instant: the
                    // earliest that vouches for it.
                    let changed = current.marks != marks;
                    if changed {
                        *current = MarksCopy { marks, read };
                    }
                    changed
                });
            }
            // The last copy stays: still a true lower bound.
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "could not read the projector's watermarks");
                }
                failing = true;
            }
        }
        let Some(inner) = inner.upgrade() else { return };
        let pause = if inner.waiting.load(Ordering::SeqCst) > 0 { BUSY_POLL } else { IDLE_POLL };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = inner.wake.notified() => {}
        }
    }
}

/// Now, in ms since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
