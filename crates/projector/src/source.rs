//! The change stream: one stream on the database, filtered to the three
//! collections, so that their events arrive in one commit order.

use std::time::{Duration, Instant};

use bson::{doc, Document};
use mongodb::change_stream::event::{ChangeStreamEvent, ResumeToken};
use mongodb::change_stream::ChangeStream;
use mongodb::options::FullDocumentType;
use mongodb::Database;

use callboard_store::{CALLS, CALL_STATUS, USERS};

/// Where to start reading.
#[derive(Debug, Clone)]
pub enum StartAt {
    Now,
    /// Just after this event (the checkpoint).
    ResumeAfter(ResumeToken),
    /// Just after an `invalidate` event.
    StartAfter(ResumeToken),
}

/// How long the server holds an empty getMore.
const MAX_AWAIT: Duration = Duration::from_millis(10);
/// A batch closes this long after its first event, full or not: under a
/// steady stream of writes, waiting to fill it would add its whole
/// collection time to every event's lag.
const LINGER: Duration = Duration::from_millis(5);

pub struct Source {
    stream: ChangeStream<ChangeStreamEvent<Document>>,
}

impl Source {
    pub async fn open(db: &Database, start: StartAt) -> Result<Self, mongodb::error::Error> {
        let pipeline = [doc! {"$match": {"ns.coll": {"$in": [CALLS, USERS, CALL_STATUS]}}}];
        let mut watch = db
            .watch()
            .pipeline(pipeline)
            .full_document(FullDocumentType::UpdateLookup)
            // A getMore with nothing to return waits this long: it bounds
            // how long a batch waits for more events after its first.
            .max_await_time(MAX_AWAIT);
        match start {
            StartAt::Now => {}
            StartAt::ResumeAfter(t) => watch = watch.resume_after(t),
            StartAt::StartAfter(t) => watch = watch.start_after(t),
        }
        Ok(Self { stream: watch.await? })
    }

    /// Up to `max` events: waits at most `wait` for the first, then takes
    /// what arrives within [`LINGER`] of it. Uses `next_if_any` (no
    /// cancelled futures: the driver's stream state must not be interrupted
    /// mid-read).
    pub async fn next_batch(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<ChangeStreamEvent<Document>>, mongodb::error::Error> {
        let deadline = Instant::now() + wait;
        let mut first: Option<Instant> = None;
        let mut batch = Vec::new();
        while batch.len() < max {
            match self.stream.next_if_any().await? {
                Some(event) => {
                    first.get_or_insert_with(Instant::now);
                    batch.push(event);
                }
                None if !batch.is_empty() || Instant::now() >= deadline => break,
                None => {}
            }
            if first.is_some_and(|f| f.elapsed() >= LINGER) {
                break;
            }
        }
        Ok(batch)
    }

    /// The token to resume after everything returned so far.
    pub fn resume_token(&self) -> Option<ResumeToken> {
        self.stream.resume_token()
    }
}

/// Whether a stream error means its history is gone: the checkpoint can no
/// longer be resumed (ChangeStreamHistoryLost 286, InvalidResumeToken 260,
/// or the oplog entry no longer exists 136/280).
pub fn is_history_lost(e: &mongodb::error::Error) -> bool {
    match *e.kind {
        mongodb::error::ErrorKind::Command(ref c) => matches!(c.code, 286 | 260 | 280 | 136),
        _ => false,
    }
}
