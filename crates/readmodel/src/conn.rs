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
    /// One multiplexed connection to every node; clones share it.
    Cluster(ClusterConnection),
}

/// One connection: a pooled one, or (a clone of) the cluster connection.
pub enum Conn {
    Single(deadpool_redis::Connection),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
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
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
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
        let client = redis::cluster::ClusterClientBuilder::new(seeds.iter().map(String::as_str))
            .connection_timeout(std::time::Duration::from_secs(1))
            .response_timeout(std::time::Duration::from_secs(2))
            .retries(8)
            .build()?;
        Ok(Self { topology: Topology::Cluster(client.get_async_connection().await?) })
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.topology, Topology::Cluster(_))
    }

    pub async fn get(&self) -> Result<Conn, ReadModelError> {
        Ok(match &self.topology {
            Topology::Single(pool) => Conn::Single(pool.get().await?),
            Topology::Cluster(c) => Conn::Cluster(c.clone()),
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
        let mut groups: BTreeMap<String, (Vec<usize>, redis::Pipeline)> = BTreeMap::new();
        for (i, (key, cmd)) in cmds.into_iter().enumerate() {
            let group =
                groups.entry(tag_of(&key).unwrap_or(&key).to_string()).or_insert_with(|| (Vec::new(), redis::pipe()));
            group.0.push(i);
            group.1.add_command(cmd);
        }
        let total = groups.values().map(|g| g.0.len()).sum();
        let replies = try_join_all(groups.into_values().map(|(at, pipe)| {
            let mut c = match &self.topology {
                Topology::Cluster(c) => c.clone(),
                Topology::Single(_) => unreachable!("single nodes take one pipeline"),
            };
            async move {
                let values: Vec<Value> = pipe.query_async(&mut c).await?;
                Ok::<_, ReadModelError>((at, values))
            }
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
                for (host, port) in masters(&mut c.clone()).await? {
                    let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
                    keys.extend(scan_on(&mut Conn::Cluster(c.clone()), Some(route), pattern).await?);
                }
                Ok(keys)
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

    /// The masters' addresses, for measurements and tests (empty on a
    /// single node).
    pub async fn master_addresses(&self) -> Result<Vec<(String, u16)>, ReadModelError> {
        match &self.topology {
            Topology::Single(_) => Ok(Vec::new()),
            Topology::Cluster(c) => masters(&mut c.clone()).await,
        }
    }
}

async fn scan_on(c: &mut Conn, route: Option<RoutingInfo>, pattern: &str) -> Result<Vec<String>, ReadModelError> {
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000);
        let reply = match (&route, &mut *c) {
            (Some(route), Conn::Cluster(cluster)) => cluster.route_command(cmd, route.clone()).await?,
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
    let reply = c
        .route_command(
            redis::cmd("CLUSTER").arg("SLOTS").clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
        )
        .await?;
    let ranges: Vec<Vec<Value>> = redis::from_redis_value(reply)?;
    let mut out: Vec<(String, u16)> = Vec::new();
    for range in ranges {
        let Some(node) = range.into_iter().nth(2) else { continue };
        let node: Vec<Value> = redis::from_redis_value(node)?;
        let mut node = node.into_iter();
        let (Some(host), Some(port)) = (node.next(), node.next()) else { continue };
        let master = (redis::from_redis_value::<String>(host)?, redis::from_redis_value::<u16>(port)?);
        if !out.contains(&master) {
            out.push(master);
        }
    }
    Ok(out)
}
