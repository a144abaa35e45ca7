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
            .max_await_time(Duration::from_millis(100));
        match start {
            StartAt::Now => {}
            StartAt::ResumeAfter(t) => watch = watch.resume_after(t),
            StartAt::StartAfter(t) => watch = watch.start_after(t),
        }
        Ok(Self { stream: watch.await? })
    }

    /// Up to `max` events: whatever is there now, waiting at most `wait`
    /// for the first. Uses `next_if_any` (no cancelled futures: the
    /// driver's stream state must not be interrupted mid-read).
    pub async fn next_batch(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<ChangeStreamEvent<Document>>, mongodb::error::Error> {
        let deadline = Instant::now() + wait;
        let mut batch = Vec::new();
        while batch.len() < max {
            match self.stream.next_if_any().await? {
                Some(event) => batch.push(event),
                None if !batch.is_empty() || Instant::now() >= deadline => break,
                None => {}
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
