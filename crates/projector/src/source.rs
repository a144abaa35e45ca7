//! The change stream: one stream on the database, filtered to the three
//! collections (and the watermark collection), so that their events arrive
//! in one commit order.

use std::time::{Duration, Instant};

use bson::{doc, Document};
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType, ResumeToken};
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
    db: Database,
    /// The collections watched: the three, and the watermark collection
    /// when there is one.
    collections: Vec<String>,
    start: StartAt,
    /// An `invalidate` event was returned: the stream ends there by design
    /// and the caller starts a new one after it.
    invalidated: bool,
    /// The token after everything returned so far. Kept here because the
    /// driver forgets its own when a getMore ends the cursor without a
    /// post-batch token.
    last: Option<ResumeToken>,
    /// When (ms) the last getMore that came back empty was sent: every
    /// event committed before then has been returned ([`crate::watermark`]).
    drained_ms: Option<i64>,
    /// The last `next_if_any` of the last batch came back empty: nothing
    /// returned is followed by more of its transaction.
    ended_dry: bool,
}

impl Source {
    /// The stream of the three collections, and of `watermarks` (the
    /// watermark collection) if given.
    pub async fn open(db: &Database, start: StartAt, watermarks: Option<&str>) -> Result<Self, mongodb::error::Error> {
        let mut collections: Vec<String> = [CALLS, USERS, CALL_STATUS].map(str::to_string).into();
        collections.extend(watermarks.map(str::to_string));
        let stream = Self::watch(db, &collections, &start).await?;
        let last = stream.resume_token();
        Ok(Self {
            stream,
            db: db.clone(),
            collections,
            start,
            invalidated: false,
            last,
            drained_ms: None,
            ended_dry: false,
        })
    }

    async fn watch(
        db: &Database,
        collections: &[String],
        start: &StartAt,
    ) -> Result<ChangeStream<ChangeStreamEvent<Document>>, mongodb::error::Error> {
        let pipeline = [doc! {"$match": {"ns.coll": {"$in": collections.to_vec()}}}];
        let mut watch = db
            .watch()
            .pipeline(pipeline)
            .full_document(FullDocumentType::UpdateLookup)
            // A getMore with nothing to return waits this long: it bounds
            // how long a batch waits for more events after its first.
            .max_await_time(MAX_AWAIT);
        match start {
            StartAt::Now => {}
            StartAt::ResumeAfter(t) => watch = watch.resume_after(t.clone()),
            StartAt::StartAfter(t) => watch = watch.start_after(t.clone()),
        }
        watch.await
    }

    /// A stream that ended without an `invalidate` (its server-side cursor
    /// was closed and a getMore came back with cursor id 0 and no error,
    /// which the driver cannot resume by itself) is opened again after the
    /// last event or post-batch token it returned. Without this, such a
    /// stream reports "no events" forever, at once, and the partition
    /// stalls while its loop spins.
    async fn revive(&mut self) -> Result<(), mongodb::error::Error> {
        if self.invalidated || self.stream.is_alive() {
            return Ok(());
        }
        let start = match &self.last {
            Some(token) => StartAt::ResumeAfter(token.clone()),
            None => self.start.clone(),
        };
        tracing::warn!(?start, "the change stream ended without an invalidate; reopening it where it stopped");
        self.stream = Self::watch(&self.db, &self.collections, &start).await?;
        self.last = self.stream.resume_token().or(self.last.take());
        self.start = start;
        Ok(())
    }

    /// Up to `max` events: waits at most `wait` for the first, then takes
    /// what arrives within [`LINGER`] of it. After it, [`Source::drained_ms`]
    /// says whether the stream ran dry meanwhile
    /// ([`Source::drained`]). Uses `next_if_any` (no
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
        let mut revived = false;
        self.drained_ms = None;
        while batch.len() < max {
            let sent = crate::checkpoint::now_ms();
            let next = self.stream.next_if_any().await?;
            // `next_if_any` makes at most one request: none while events
            // are buffered, so a `None` from a live stream is an empty
            // getMore sent after `sent`.
            let dry = next.is_none() && self.stream.is_alive() && !self.invalidated;
            if dry {
                self.drained_ms = Some(sent);
            }
            self.ended_dry = dry;
            if let Some(token) = self.stream.resume_token() {
                self.last = Some(token);
            }
            match next {
                Some(event) => {
                    first.get_or_insert_with(Instant::now);
                    self.invalidated |= event.operation_type == OperationType::Invalidate;
                    batch.push(event);
                }
                None if !batch.is_empty() || self.invalidated || Instant::now() >= deadline => break,
                // Ended, every buffered event read: reopen, once a call.
                None if !self.stream.is_alive() && !revived => {
                    self.revive().await?;
                    revived = true;
                }
                None if !self.stream.is_alive() => break,
                None => {}
            }
            if first.is_some_and(|f| f.elapsed() >= LINGER) {
                break;
            }
        }
        Ok(batch)
    }

    /// How the last batch's reads ended: when a getMore last came back
    /// empty, and whether the batch ended on one (rather than on its size
    /// or its linger, with events perhaps still buffered).
    pub fn drained(&self) -> crate::watermark::Drained {
        crate::watermark::Drained { drained: self.drained_ms, dry: self.ended_dry }
    }

    /// The token to resume after everything returned so far.
    pub fn resume_token(&self) -> Option<ResumeToken> {
        self.last.clone()
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
