//! Where the read model lives: one Redis node (a deadpool pool) or a Redis
//! Cluster (the `redis` crate's async cluster client, which follows MOVED
//! and ASK and refreshes its slot map after a failover). Everything in this
//! crate and in the projector reaches Redis through [`Redis`], so the
//! topology is decided in one place.
//!
//! On a cluster every pipeline, MULTI and script must stay in one slot.
//! The helpers here group commands by their key's hash tag
//! ([`Redis::query_by_tag`]) and run SCANs on every master
//! ([`Redis::scan`]) or on the one that owns a tag ([`Redis::scan_tag`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::future::try_join_all;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, RedisFuture, Value};

use crate::keys::tag_of;
use crate::ReadModelError;

/// A handle on the read model's Redis, cheap to clone.
#[derive(Clone)]
pub struct Redis {
    topology: Topology,
}

#[derive(Clone)]
enum Topology {
    Single(deadpool_redis::Pool),
    Cluster(Arc<Cluster>),
}

/// The cluster connection: one multiplexed connection to every node,
/// shared by every clone. The client follows `MOVED` and `ASK`, but after
/// a master dies it can keep a slot map that names the dead node, if it
/// refreshed the map before a replica was promoted; only a `MOVED` would
/// make it look again, and the dead node sends none. So a connection error
/// or time-out makes a new connection, discovered afresh from the seeds
/// (at most once a second), which the next [`Redis::get`] hands out.
pub struct Cluster {
    seeds: Vec<String>,
    current: RwLock<ClusterConnection>,
    /// The runtime the connection was made on: replacements run there, not
    /// on whichever worker saw the error.
    runtime: tokio::runtime::Handle,
    /// When the connection was last replaced; `None` while a replacement
    /// is being made.
    replaced: Mutex<Option<Instant>>,
}

impl Cluster {
    async fn connect(seeds: &[String]) -> Result<ClusterConnection, redis::RedisError> {
        redis::cluster::ClusterClientBuilder::new(seeds.iter().map(String::as_str))
            .connection_timeout(Duration::from_secs(1))
            .response_timeout(Duration::from_secs(2))
            .retries(4)
            .build()?
            .get_async_connection()
            .await
    }

    fn connection(&self) -> ClusterConnection {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the connection in the background after an error that may
    /// mean a stale slot map.
    fn on_error(self: &Arc<Self>, e: &redis::RedisError) {
        let stale = e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || matches!(
                e.kind(),
                redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown | redis::ServerErrorKind::TryAgain)
            );
        if !stale {
            return;
        }
        {
            let mut replaced = self.replaced.lock().unwrap_or_else(|e| e.into_inner());
            match *replaced {
                Some(at) if at.elapsed() >= Duration::from_secs(1) => *replaced = None,
                _ => return,
            }
        }
        let this = self.clone();
        self.runtime.spawn(async move {
            match Cluster::connect(&this.seeds).await {
                Ok(fresh) => {
                    *this.current.write().unwrap_or_else(|e| e.into_inner()) = fresh;
                    tracing::info!("Redis Cluster connection replaced after an error");
                }
                Err(e) => tracing::warn!(error = %e, "could not reconnect to the Redis Cluster"),
            }
            *this.replaced.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        });
    }
}

/// One connection: a pooled one, or (a clone of) the cluster connection.
pub enum Conn {
    Single(deadpool_redis::Connection),
    Cluster(ClusterConnection, Arc<Cluster>),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c, cluster) => Box::pin(async move {
                let reply = c.req_packed_command(cmd).await;
                if let Err(e) = &reply {
                    cluster.on_error(e);
                }
                reply
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c, cluster) => Box::pin(async move {
                let reply = c.req_packed_commands(cmd, offset, count).await;
                if let Err(e) = &reply {
                    cluster.on_error(e);
                }
                reply
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c, _) => c.get_db(),
        }
    }
}

impl Redis {
    /// A single node behind a pool.
    pub fn single(pool: deadpool_redis::Pool) -> Self {
        Self { topology: Topology::Single(pool) }
    }

    /// A single node at `url`, with a pool of `size` connections.
    pub fn single_url(url: &str, size: usize) -> Result<Self, ReadModelError> {
        let mut config = deadpool_redis::Config::from_url(url);
        config.pool = Some(deadpool_redis::PoolConfig::new(size));
        let pool = config
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .map_err(|e| ReadModelError::Config(e.to_string()))?;
        Ok(Self::single(pool))
    }

    /// A Redis Cluster, discovered from `seeds` (any reachable node will do).
    pub async fn cluster(seeds: &[String]) -> Result<Self, ReadModelError> {
        let current = RwLock::new(Cluster::connect(seeds).await?);
        let cluster = Cluster {
            seeds: seeds.to_vec(),
            current,
            runtime: tokio::runtime::Handle::current(),
            replaced: Mutex::new(Some(Instant::now())),
        };
        Ok(Self { topology: Topology::Cluster(Arc::new(cluster)) })
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.topology, Topology::Cluster(_))
    }

    pub async fn get(&self) -> Result<Conn, ReadModelError> {
        Ok(match &self.topology {
            Topology::Single(pool) => Conn::Single(pool.get().await?),
            Topology::Cluster(c) => Conn::Cluster(c.connection(), c.clone()),
        })
    }

    /// Runs `cmds` (each with the key that routes it) and returns their
    /// replies in order. One pipeline on a single node; on a cluster one
    /// pipeline per hash tag, all at once.
    pub async fn query_by_tag(&self, cmds: Vec<(String, Cmd)>) -> Result<Vec<Value>, ReadModelError> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.get().await?;
        if !self.is_cluster() {
            let mut pipe = redis::pipe();
            for (_, cmd) in &cmds {
                pipe.add_command(cmd.clone());
            }
            return Ok(pipe.query_async(&mut c).await?);
        }
        let mut groups: BTreeMap<String, (Vec<usize>, redis::Pipeline, String)> = BTreeMap::new();
        for (i, (key, cmd)) in cmds.into_iter().enumerate() {
            let group = groups
                .entry(tag_of(&key).unwrap_or(&key).to_string())
                .or_insert_with(|| (Vec::new(), redis::pipe(), key.clone()));
            group.0.push(i);
            group.1.add_command(cmd);
        }
        let total = groups.values().map(|g| g.0.len()).sum();
        let replies = try_join_all(groups.into_values().map(|(at, pipe, key)| async move {
            let mut c = self.get().await?;
            let values: Vec<Value> = transaction(&mut c, &pipe, &key).await?;
            Ok::<_, ReadModelError>((at, values))
        }))
        .await?;
        let mut out = vec![Value::Nil; total];
        for (at, values) in replies {
            for (i, v) in at.into_iter().zip(values) {
                out[i] = v;
            }
        }
        Ok(out)
    }

    /// Every key matching `pattern`, on every master (SCAN, so Redis is
    /// never blocked).
    pub async fn scan(&self, pattern: &str) -> Result<Vec<String>, ReadModelError> {
        match &self.topology {
            Topology::Single(_) => {
                let mut c = self.get().await?;
                scan_on(&mut c, None, pattern).await
            }
            Topology::Cluster(c) => {
                let mut keys = Vec::new();
                for (host, port) in masters(&mut c.connection()).await? {
                    let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
                    keys.extend(scan_on(&mut self.get().await?, Some(route), pattern).await?);
                }
                Ok(keys)
            }
        }
    }

    /// `maxmemory-policy` of every master (`host:port`, policy); one entry,
    /// named `redis`, on a single node.
    pub async fn eviction_policies(&self) -> Result<Vec<(String, String)>, ReadModelError> {
        let mut get = redis::cmd("CONFIG");
        get.arg("GET").arg("maxmemory-policy");
        let policy = |reply: Value| -> Result<String, ReadModelError> {
            // RESP2: [name, value]; RESP3: {name: value}.
            let pairs: Vec<(String, String)> = match redis::from_redis_value::<Vec<String>>(reply.clone()) {
                Ok(flat) => flat.chunks(2).filter_map(|c| Some((c.first()?.clone(), c.get(1)?.clone()))).collect(),
                Err(_) => {
                    redis::from_redis_value::<std::collections::HashMap<String, String>>(reply)?.into_iter().collect()
                }
            };
            pairs.into_iter().find(|(k, _)| k == "maxmemory-policy").map(|(_, v)| v).ok_or_else(|| {
                ReadModelError::Config(
                    "CONFIG GET maxmemory-policy returned nothing (is CONFIG renamed or disabled?)".into(),
                )
            })
        };
        match &self.topology {
            Topology::Single(_) => {
                let reply: Value = get.query_async(&mut self.get().await?).await?;
                Ok(vec![("redis".to_string(), policy(reply)?)])
            }
            Topology::Cluster(c) => {
                let mut out = Vec::new();
                for (host, port) in masters(&mut c.connection()).await? {
                    let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host: host.clone(), port });
                    let reply = c.connection().route_command(get.clone(), route).await?;
                    out.push((format!("{host}:{port}"), policy(reply)?));
                }
                Ok(out)
            }
        }
    }

    /// Every key matching `pattern` on the node that owns `key`'s slot
    /// (the pattern must stay within that key's hash tag).
    pub async fn scan_tag(&self, key: &str, pattern: &str) -> Result<Vec<String>, ReadModelError> {
        let mut c = self.get().await?;
        let route = self.is_cluster().then(|| {
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::with_key(key, SlotAddr::Master)))
        });
        scan_on(&mut c, route, pattern).await
    }

    /// One hash tag per master, `<stem><i>` with the smallest `i` whose
    /// slot that master serves: a key under it lives on that master (and,
    /// after a failover, on the replica that took its slots). Empty on a
    /// single node.
    pub async fn tag_per_master(&self, stem: &str) -> Result<Vec<String>, ReadModelError> {
        let Topology::Cluster(c) = &self.topology else { return Ok(Vec::new()) };
        let ranges = slot_ranges(&mut c.connection()).await?;
        let mut masters: Vec<&(String, u16)> = Vec::new();
        for (_, _, m) in &ranges {
            if !masters.contains(&m) {
                masters.push(m);
            }
        }
        let mut tags = Vec::with_capacity(masters.len());
        for master in masters {
            let tag = (0..100_000).map(|i| format!("{stem}{i}")).find(|t| {
                let slot = key_slot(t.as_bytes());
                ranges.iter().any(|(lo, hi, m)| m == master && (*lo..=*hi).contains(&slot))
            });
            tags.extend(tag);
        }
        Ok(tags)
    }
}

/// Runs a pipeline or MULTI (`pipe`, all in the slot of `key`) and parses
/// its replies. On a cluster, one sent to a node that no longer serves the
/// slot (a failover just moved it) fails with `MOVED` inside `EXECABORT`
/// or a pipeline failure, which the cluster client does not follow; a plain
/// command on `key` does, and refreshes the slot map, so the pipeline is
/// retried after one (a few times).
pub async fn transaction<T: redis::FromRedisValue, C: redis::aio::ConnectionLike + Send>(
    c: &mut C,
    pipe: &redis::Pipeline,
    key: &str,
) -> Result<T, ReadModelError> {
    let mut tries = 0;
    loop {
        match pipe.query_async(c).await {
            Err(e) if tries < 3 && is_redirect(&e) => {
                tries += 1;
                let _: Value = redis::cmd("EXISTS").arg(key).query_async(c).await?;
            }
            other => return Ok(other?),
        }
    }
}

/// Whether a transaction failed because its slot moved.
fn is_redirect(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    let moved = |k: Option<ServerErrorKind>| matches!(k, Some(ServerErrorKind::Moved | ServerErrorKind::Ask));
    matches!(e.kind(), ErrorKind::Server(_))
        && e.clone().into_server_errors().is_some_and(|errs| errs.iter().any(|(_, s)| moved(s.kind())))
}

/// The Redis Cluster slot of a hash tag (CRC16-XMODEM mod 16,384).
pub fn key_slot(tag: &[u8]) -> u16 {
    let crc = tag.iter().fold(0u16, |mut crc, b| {
        crc ^= u16::from(*b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
        crc
    });
    crc % 16_384
}

async fn scan_on(c: &mut Conn, route: Option<RoutingInfo>, pattern: &str) -> Result<Vec<String>, ReadModelError> {
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000);
        let reply = match (&route, &mut *c) {
            (Some(route), Conn::Cluster(cluster, _)) => cluster.route_command(cmd, route.clone()).await?,
            _ => cmd.query_async(c).await?,
        };
        let (next, chunk): (u64, Vec<String>) = redis::from_redis_value(reply)?;
        keys.extend(chunk);
        cursor = next;
        if cursor == 0 {
            return Ok(keys);
        }
    }
}

/// The masters of a cluster, from `CLUSTER SLOTS` (each range's first node).
async fn masters(c: &mut ClusterConnection) -> Result<Vec<(String, u16)>, ReadModelError> {
    let mut out: Vec<(String, u16)> = Vec::new();
    for (_, _, master) in slot_ranges(c).await? {
        if !out.contains(&master) {
            out.push(master);
        }
    }
    Ok(out)
}

/// `CLUSTER SLOTS`: each slot range with its master.
async fn slot_ranges(c: &mut ClusterConnection) -> Result<Vec<(u16, u16, (String, u16))>, ReadModelError> {
    let reply = c
        .route_command(
            redis::cmd("CLUSTER").arg("SLOTS").clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
        )
        .await?;
    let ranges: Vec<Vec<Value>> = redis::from_redis_value(reply)?;
    let mut out = Vec::new();
    for range in ranges {
        let mut range = range.into_iter();
        let (Some(lo), Some(hi), Some(node)) = (range.next(), range.next(), range.next()) else { continue };
        let node: Vec<Value> = redis::from_redis_value(node)?;
        let mut node = node.into_iter();
        let (Some(host), Some(port)) = (node.next(), node.next()) else { continue };
        let master = (redis::from_redis_value::<String>(host)?, redis::from_redis_value::<u16>(port)?);
        out.push((redis::from_redis_value(lo)?, redis::from_redis_value(hi)?, master));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::key_slot;

    /// The examples of the Redis Cluster specification.
    #[test]
    fn slots_are_the_specifications() {
        assert_eq!(key_slot(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"g"), 7233);
    }
}
