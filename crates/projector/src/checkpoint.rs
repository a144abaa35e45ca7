//! The resume token of the last applied batch, stored in Redis only while
//! the writer holds the lease (one script checks and writes).

use bson::doc;
use mongodb::change_stream::event::ResumeToken;
use redis::{AsyncCommands, Script};

use callboard_readmodel::{Keys, ReadModelError};

pub struct Checkpoint {
    pool: deadpool_redis::Pool,
    keys: Keys,
}

/// Progress figures written with each checkpoint.
#[derive(Debug, Default, Clone, Copy)]
pub struct BatchStats {
    pub events: u64,
    pub last_event_ms: Option<i64>,
    pub lag_ms: Option<i64>,
}

impl Checkpoint {
    pub fn new(pool: deadpool_redis::Pool, keys: Keys) -> Self {
        Self { pool, keys }
    }

    pub async fn load(&self) -> Result<Option<ResumeToken>, ReadModelError> {
        let mut c = self.pool.get().await?;
        let raw: Option<Vec<u8>> = c.get(self.keys.checkpoint()).await?;
        let Some(raw) = raw else { return Ok(None) };
        let token = bson::from_slice::<bson::Document>(&raw)
            .ok()
            .and_then(|d| d.get("t").cloned())
            .and_then(|t| bson::from_bson::<ResumeToken>(t).ok());
        match token {
            Some(t) => Ok(Some(t)),
            None => Err(ReadModelError::Corrupt { key: self.keys.checkpoint(), detail: "not a resume token".into() }),
        }
    }

    /// Saves `token` if `owner` still holds the lease; `false` otherwise.
    pub async fn save(&self, owner: &str, token: &ResumeToken, stats: BatchStats) -> Result<bool, ReadModelError> {
        let bytes = bson::to_bson(token).ok().and_then(|t| bson::to_vec(&doc! {"t": t}).ok()).ok_or_else(|| {
            ReadModelError::Corrupt { key: self.keys.checkpoint(), detail: "unserialisable token".into() }
        })?;
        let mut c = self.pool.get().await?;
        let now = now_ms();
        static SAVE: std::sync::OnceLock<Script> = std::sync::OnceLock::new();
        let script = SAVE.get_or_init(|| {
            Script::new(
                r#"if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
               redis.call('SET', KEYS[2], ARGV[2])
               redis.call('HINCRBY', KEYS[3], 'events_applied', ARGV[3])
               redis.call('HSET', KEYS[3], 'heartbeat_ms', ARGV[4])
               if ARGV[5] ~= '' then redis.call('HSET', KEYS[3], 'last_event_ms', ARGV[5]) end
               if ARGV[6] ~= '' then redis.call('HSET', KEYS[3], 'lag_ms', ARGV[6]) end
               return 1"#,
            )
        });
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
            .invoke_async(&mut c)
            .await?;
        Ok(saved == 1)
    }

    pub async fn clear(&self) -> Result<(), ReadModelError> {
        let mut c = self.pool.get().await?;
        let _: () = c.del(self.keys.checkpoint()).await?;
        Ok(())
    }

    /// Heartbeat and counters while idle or warming.
    pub async fn heartbeat(&self, extra: &[(&str, i64)]) -> Result<(), ReadModelError> {
        let mut c = self.pool.get().await?;
        let mut pipe = redis::pipe();
        pipe.hset(self.keys.progress(), "heartbeat_ms", now_ms()).ignore();
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
