//! How far a partition has applied the stream, for answers' `as_of`
//! (docs/ARCHITECTURE.md, "Freshness"; ADR 0008).
//!
//! Two sources, the better one winning:
//! - **Watermark documents.** Partition 0's leader inserts `{_id: t, at_ms:
//!   t}` into `projector.watermark_collection` every
//!   `projector.watermark_interval_ms`, `t` read from the clock just
//!   before the insert is sent. A change committed before `t` committed
//!   before the insert did, so its event comes before the insert's on the
//!   stream (events arrive in commit order). Once a partition has applied
//!   every event up to the insert's, everything committed before `t` is in
//!   Redis. An insert's event carries the inserted document as is (an
//!   update's `fullDocument` would be looked up later, and could be a
//!   newer one's), which is why each mark is a new document.
//! - **A drained stream.** When a getMore sent at `s` comes back empty,
//!   every event committed (majority) before `s` has been returned. Less
//!   sure (delivery to change streams is not instantaneous everywhere), so
//!   it counts for `s - DRAIN_MARGIN`. This is what a deployment without
//!   write permission on the collection gets.
//!
//! The cluster time `through` comes from the events: after applying an
//! event of cluster time `c`, everything before `c` is applied (the events
//! of one transaction share it), and after a drain, everything at `c`.

use std::time::Duration;

use bson::doc;
use callboard_domain::{ClusterTime, Watermark};
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType};
use mongodb::Database;
use tracing::{info, warn};

use crate::checkpoint::now_ms;

/// What a drained stream's getMore vouches for: its send time less this.
pub const DRAIN_MARGIN_MS: i64 = 1000;

/// How long watermark documents are kept (older ones are deleted).
const KEEP_MS: i64 = 60_000;

/// Inserts a watermark document every `interval` until aborted (the
/// leadership's end). A permission error stops it for good: the service
/// goes on with drained-stream watermarks only.
pub async fn write_marks(db: Database, collection: String, interval: Duration) {
    let coll = db.collection::<bson::Document>(&collection);
    let mut failing = false;
    let mut written: u64 = 0;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let at = now_ms();
        match coll.insert_one(doc! {"_id": at, "at_ms": at}).await {
            Ok(_) => {
                if failing {
                    info!(collection, "watermark writes succeed again");
                }
                failing = false;
                written += 1;
            }
            Err(e) if is_unauthorized(&e) => {
                warn!(collection, error = %e,
                    "not allowed to write watermarks: answers' as_of comes from the stream alone and is coarser \
                     (grant insert and remove on this collection, or set projector.watermark_collection empty)");
                return;
            }
            // The same millisecond written by another leader: as good.
            Err(e) if is_duplicate_key(&e) => {}
            Err(e) => {
                if !failing {
                    warn!(collection, error = %e, "could not write a watermark; retrying");
                }
                failing = true;
            }
        }
        if written % 100 == 1 {
            if let Err(e) = coll.delete_many(doc! {"_id": {"$lt": at - KEEP_MS}}).await {
                warn!(collection, error = %e, "could not delete old watermarks");
            }
        }
    }
}

fn code_of(e: &mongodb::error::Error) -> Option<i32> {
    match &*e.kind {
        mongodb::error::ErrorKind::Command(c) => Some(c.code),
        mongodb::error::ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => Some(w.code),
        _ => None,
    }
}

/// Unauthorized (13), or Atlas's AtlasError (8000).
fn is_unauthorized(e: &mongodb::error::Error) -> bool {
    matches!(code_of(e), Some(13 | 8000))
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    code_of(e) == Some(11000)
}

/// The mark an event carries: the `at_ms` of an insert into the watermark
/// collection.
pub fn mark_of(event: &ChangeStreamEvent<bson::Document>, collection: &str) -> Option<i64> {
    let coll = event.ns.as_ref().and_then(|ns| ns.coll.as_deref());
    if coll != Some(collection) || event.operation_type != OperationType::Insert {
        return None;
    }
    let at = event.full_document.as_ref()?.get("at_ms")?;
    at.as_i64().or_else(|| at.as_i32().map(i64::from))
}

/// An event's cluster time.
pub fn cluster_time(event: &ChangeStreamEvent<bson::Document>) -> Option<ClusterTime> {
    event.cluster_time.map(|ts| ClusterTime { seconds: ts.time, increment: ts.increment })
}

/// How the last batch's reads ended ([`crate::source::Source`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Drained {
    /// When the last getMore that came back empty was sent (ms).
    pub drained: Option<i64>,
    /// The batch ended on an empty getMore.
    pub dry: bool,
}

/// Where a partition stands, carried from batch to batch.
#[derive(Debug, Default)]
pub struct Tracker {
    /// The cluster time of the last applied event.
    last: Option<ClusterTime>,
    /// The best mark applied.
    mark_ms: i64,
}

impl Tracker {
    /// Forgets the position (a rebuild opened a new stream).
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// What the partition vouches for once `applied` (the batch just
    /// applied, in order) are in Redis, the stream having drained at
    /// `source.drained` (a getMore sent then came back empty), if it did,
    /// and the batch having ended on an empty getMore (`source.dry`), if
    /// it did. `now_ms` is this process's clock, which no claim passes.
    pub fn applied(
        &mut self,
        applied: &[ChangeStreamEvent<bson::Document>],
        collection: Option<&str>,
        source: Drained,
        now_ms: i64,
    ) -> Watermark {
        for event in applied {
            if let Some(c) = cluster_time(event) {
                self.last = Some(c);
            }
            // A mark from the future (another writer's clock, a hand-made
            // document) is not believed: the watermark never comes down.
            if let Some(at) = collection.and_then(|coll| mark_of(event, coll)).filter(|at| *at <= now_ms) {
                self.mark_ms = self.mark_ms.max(at);
            }
        }
        // Every event before the last one's cluster time is applied; the
        // rest of its transaction may still be to come, unless the batch
        // ended on an empty getMore.
        let through = if source.dry { self.last } else { self.last.map(ClusterTime::pred) };
        let drained = source.drained.map_or(0, |s| s - DRAIN_MARGIN_MS);
        // A cluster time's seconds are the primary's clock: everything
        // committed before second `s` has a cluster time below `(s, 0)`.
        // Capped by this process's clock, should the primary's run ahead.
        let by_clock = through.map_or(0, |t| i64::from(t.seconds) * 1000).min(now_ms - DRAIN_MARGIN_MS);
        let at_ms = self.mark_ms.max(drained).max(by_clock).max(0) as u64;
        Watermark { at_ms, through }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(
        coll: &str,
        op: OperationType,
        secs: u32,
        inc: u32,
        full: Option<bson::Document>,
    ) -> ChangeStreamEvent<bson::Document> {
        let mut e: ChangeStreamEvent<bson::Document> = bson::from_document(doc! {
            "_id": {"_data": "00"},
            "operationType": "insert",
            "ns": {"db": "crm", "coll": coll},
            "clusterTime": bson::Timestamp { time: secs, increment: inc },
        })
        .expect("an event");
        e.operation_type = op;
        e.full_document = full;
        e
    }

    #[test]
    fn marks_count_only_from_inserts_into_the_collection() {
        let mark = Some(doc! {"_id": 5_000i64, "at_ms": 5_000i64});
        assert_eq!(mark_of(&event("wm", OperationType::Insert, 1, 0, mark.clone()), "wm"), Some(5_000));
        assert_eq!(mark_of(&event("wm", OperationType::Update, 1, 0, mark.clone()), "wm"), None);
        assert_eq!(mark_of(&event("calls", OperationType::Insert, 1, 0, mark), "wm"), None);
    }

    #[test]
    fn the_watermark_is_the_best_of_marks_drains_and_cluster_times() {
        let now = 20_000;
        let busy = Drained::default();
        let mut t = Tracker::default();
        let w = t.applied(&[event("calls", OperationType::Insert, 10, 3, None)], Some("wm"), busy, now);
        assert_eq!(w.through, Some(ClusterTime { seconds: 10, increment: 2 }));
        assert_eq!(w.at_ms, 10_000);
        let mark = Some(doc! {"_id": 10_500i64, "at_ms": 10_500i64});
        let w = t.applied(&[event("wm", OperationType::Insert, 10, 4, mark)], Some("wm"), busy, now);
        assert_eq!((w.at_ms, w.through), (10_500, Some(ClusterTime { seconds: 10, increment: 3 })));
        // A drain before more events came: the send time counts, not the
        // last event's whole cluster time.
        let early = Drained { drained: Some(12_000), dry: false };
        let w = t.applied(&[], Some("wm"), early, now);
        assert_eq!((w.at_ms, w.through), (11_000, Some(ClusterTime { seconds: 10, increment: 3 })));
        // Ended dry: the last event's own cluster time.
        let dry = Drained { drained: Some(12_000), dry: true };
        assert_eq!(t.applied(&[], Some("wm"), dry, now).through, Some(ClusterTime { seconds: 10, increment: 4 }));
        // Marks are ignored with no collection configured, or from the
        // future; the primary's clock counts no further than ours.
        let mut t = Tracker::default();
        let mark = Some(doc! {"_id": 19_000i64, "at_ms": 19_000i64});
        assert_eq!(t.applied(&[event("wm", OperationType::Insert, 10, 0, mark)], None, busy, now).at_ms, 9_000);
        let future = Some(doc! {"_id": 30_000i64, "at_ms": 30_000i64});
        assert_eq!(
            t.applied(&[event("wm", OperationType::Insert, 10, 1, future)], Some("wm"), busy, now).at_ms,
            10_000
        );
        assert_eq!(t.applied(&[event("calls", OperationType::Insert, 99, 1, None)], None, busy, now).at_ms, 19_000);
    }
}
