//! How much history MongoDB keeps, against how far behind the checkpoints
//! are: operators are told before a checkpoint falls off the oplog (and
//! its partition has to be rebuilt), not after.
//!
//! Partition 0's leader reads the oldest and newest entries of
//! `local.oplog.rs` every [`CHECK_EVERY`] (a replica set member's oplog;
//! reading it needs `find` on `local.oplog.rs`, e.g. the built-in
//! `clusterMonitor` role) and stores their cluster times in the progress
//! hash; where it cannot (a sharded cluster's mongos, no permission, the
//! stand-in), the window is unknown and only the checkpoints' age is
//! reported. Each check logs a warning while the oldest checkpoint's age
//! passes `projector.history_warn_share` of the window.

use std::time::Duration;

use bson::{doc, Document};
use callboard_readmodel::state::progress;
use callboard_readmodel::{Keys, ReadModel, Redis};
use mongodb::Client;
use redis::AsyncCommands;
use tracing::{info, warn};

pub const CHECK_EVERY: Duration = Duration::from_secs(10);

/// Checks the history window until aborted (the leadership's end).
pub async fn watch(client: Client, redis: Redis, reader: ReadModel, keys: Keys, partitions: u32, warn_share: f64) {
    let mut known = None;
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let window = oplog_window(&client).await;
        match (&window, known) {
            (Ok(Some(_)), Some(true)) | (Ok(None), Some(false)) => {}
            (Ok(Some((first, last))), _) => info!(first, last, "reading MongoDB's history window from local.oplog.rs"),
            (Ok(None), _) => info!("no local.oplog.rs to read: the history window is unknown"),
            (Err(e), _) => {
                if known != Some(false) {
                    warn!(error = %e, "cannot read local.oplog.rs (grant find on it, e.g. the clusterMonitor role): the history window is unknown");
                }
            }
        }
        known = Some(matches!(window, Ok(Some(_))));
        if let Err(e) = store(&redis, &keys, window.ok().flatten()).await {
            warn!(error = %e, "could not store the history window");
            continue;
        }
        match reader.history_window(partitions, warn_share).await {
            Ok(h) if h.at_risk => warn!(
                checkpoint_age_ms = h.checkpoint_age_ms,
                window_ms = h.window_ms,
                used = h.used,
                warn_share,
                "a checkpoint is close to falling off MongoDB's history: once it does, its partition is rebuilt and \
                 its tenants answered live until warm again (catch the projector up, or give the oplog more room)"
            ),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "could not read the checkpoints' positions"),
        }
    }
}

/// The cluster times (s) of the oldest and newest oplog entries, if there
/// is an oplog to read.
async fn oplog_window(client: &Client) -> Result<Option<(i64, i64)>, mongodb::error::Error> {
    let oplog = client.database("local").collection::<Document>("oplog.rs");
    let ts = |d: Option<Document>| d.and_then(|d| d.get_timestamp("ts").ok()).map(|t| i64::from(t.time));
    let first = ts(oplog.find_one(doc! {}).sort(doc! {"$natural": 1}).projection(doc! {"ts": 1}).await?);
    let last = ts(oplog.find_one(doc! {}).sort(doc! {"$natural": -1}).projection(doc! {"ts": 1}).await?);
    Ok(first.zip(last))
}

async fn store(
    redis: &Redis,
    keys: &Keys,
    window: Option<(i64, i64)>,
) -> Result<(), callboard_readmodel::ReadModelError> {
    let mut c = redis.get().await?;
    match window {
        Some((first, last)) => {
            let _: () = c
                .hset_multiple(keys.progress(), &[(progress::OPLOG_FIRST_S, first), (progress::OPLOG_LAST_S, last)])
                .await?;
        }
        None => {
            let _: () = c.hdel(keys.progress(), &[progress::OPLOG_FIRST_S, progress::OPLOG_LAST_S]).await?;
        }
    }
    Ok(())
}
