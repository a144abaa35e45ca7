//! The resume token of the last applied batch, stored in Redis only while
//! the writer holds the lease (one script checks and writes).

use bson::doc;
use mongodb::change_stream::event::ResumeToken;
use redis::{AsyncCommands, Script};

use callboard_domain::{ClusterTime, Watermark};
use callboard_readmodel::state::{as_of, progress};
use callboard_readmodel::{Keys, ReadModelError, Redis};

const SAVE: &str = include_str!("lua/checkpoint_save.lua");
const CLEAR: &str = include_str!("lua/checkpoint_clear.lua");
const AS_OF: &str = include_str!("lua/as_of_publish.lua");

pub struct Checkpoint {
    redis: Redis,
    keys: Keys,
}

/// A saved checkpoint: the resume token, and the sequence number of the
/// batch it closed (see [`crate::leader`]: markers on every master carry the
/// same number).
#[derive(Debug, Clone)]
pub struct Saved {
    pub token: ResumeToken,
    pub seq: u64,
    /// The hash tags of the markers written with it (one per master).
    pub markers: Vec<String>,
}

/// Progress figures written with each checkpoint.
#[derive(Debug, Default, Clone, Copy)]
pub struct BatchStats {
    pub events: u64,
    pub last_event_ms: Option<i64>,
    pub lag_ms: Option<i64>,
}

impl Checkpoint {
    pub fn new(redis: Redis, keys: Keys) -> Self {
        Self { redis, keys }
    }

    /// The checkpoint: BSON `{t: <resume token>, s: <sequence>, m: [<marker tags>]}`.
    pub async fn load(&self) -> Result<Option<Saved>, ReadModelError> {
        let mut c = self.redis.get().await?;
        let raw: Option<Vec<u8>> = c.get(self.keys.checkpoint()).await?;
        let Some(raw) = raw else { return Ok(None) };
        let doc = bson::from_slice::<bson::Document>(&raw).ok();
        let token = doc.as_ref().and_then(|d| d.get("t").cloned()).and_then(|t| bson::from_bson::<ResumeToken>(t).ok());
        let seq = doc.as_ref().and_then(|d| d.get_i64("s").ok()).unwrap_or(0).max(0) as u64;
        let markers = doc
            .as_ref()
            .and_then(|d| d.get_array("m").ok())
            .map(|m| m.iter().filter_map(|t| t.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        match token {
            Some(token) => Ok(Some(Saved { token, seq, markers })),
            None => Err(ReadModelError::Corrupt { key: self.keys.checkpoint(), detail: "not a resume token".into() }),
        }
    }

    /// Saves `token` as the end of batch `seq` if `owner` still holds the
    /// lease; `false` otherwise.
    pub async fn save(
        &self,
        owner: &str,
        token: &ResumeToken,
        seq: u64,
        markers: &[String],
        stats: BatchStats,
    ) -> Result<bool, ReadModelError> {
        let bytes = bson::to_bson(token)
            .ok()
            .and_then(|t| bson::to_vec(&doc! {"t": t, "s": seq as i64, "m": markers.to_vec()}).ok())
            .ok_or_else(|| ReadModelError::Corrupt {
                key: self.keys.checkpoint(),
                detail: "unserialisable token".into(),
            })?;
        let mut c = self.redis.get().await?;
        let now = now_ms();
        static CELL: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
        let script = CELL.get_or_init(|| Script::new(SAVE));
        let saved: i64 = script
            .key(self.keys.lease())
            .key(self.keys.checkpoint())
            .key(self.keys.progress())
            .arg(owner)
            .arg(bytes)
            .arg(stats.events)
            .arg(now)
            .arg(stats.last_event_ms.map(|v| v.to_string()).unwrap_or_default())
            .arg(stats.lag_ms.map(|v| v.to_string()).unwrap_or_default())
            .arg(progress::EVENTS_APPLIED)
            .arg(progress::HEARTBEAT_MS)
            .arg(progress::LAST_EVENT_MS)
            .arg(progress::LAG_MS)
            .arg(progress::checkpoint_at(self.keys.partition()))
            // An idle stream's post-batch token stands about at now.
            .arg(stats.last_event_ms.unwrap_or(now))
            .invoke_async(&mut c)
            .await?;
        Ok(saved == 1)
    }

    /// Clears the checkpoint if `owner` still holds the lease; `false`
    /// otherwise.
    pub async fn clear(&self, owner: &str) -> Result<bool, ReadModelError> {
        static CELL: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
        let mut c = self.redis.get().await?;
        let cleared: i64 = CELL
            .get_or_init(|| Script::new(CLEAR))
            .key(self.keys.lease())
            .key(self.keys.checkpoint())
            .arg(owner)
            .invoke_async(&mut c)
            .await?;
        Ok(cleared == 1)
    }

    /// Raises the partition's watermark (`P:{g}:asof:<p>`) to `w`, each
    /// part only upwards, if `owner` still holds the lease; `false`
    /// otherwise.
    pub async fn publish_as_of(&self, owner: &str, w: Watermark) -> Result<bool, ReadModelError> {
        static CELL: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
        let mut c = self.redis.get().await?;
        let through = |f: fn(ClusterTime) -> u32| w.through.map(|t| f(t).to_string()).unwrap_or_default();
        let published: i64 = CELL
            .get_or_init(|| Script::new(AS_OF))
            .key(self.keys.lease())
            .key(self.keys.as_of())
            .arg(owner)
            .arg(w.at_ms)
            .arg(through(|t| t.seconds))
            .arg(through(|t| t.increment))
            .arg(as_of::AT_MS)
            .arg(as_of::THROUGH_S)
            .arg(as_of::THROUGH_I)
            .invoke_async(&mut c)
            .await?;
        Ok(published == 1)
    }

    /// Heartbeat and counters while idle or warming.
    pub async fn heartbeat(&self, extra: &[(&str, i64)]) -> Result<(), ReadModelError> {
        let mut c = self.redis.get().await?;
        let mut pipe = redis::pipe();
        pipe.hset(self.keys.progress(), progress::HEARTBEAT_MS, now_ms()).ignore();
        for (field, by) in extra {
            pipe.hincr(self.keys.progress(), *field, *by).ignore();
        }
        let _: () = pipe.query_async(&mut c).await?;
        Ok(())
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
