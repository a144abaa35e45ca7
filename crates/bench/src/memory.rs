//! What each kind of key costs: every key under the prefix on every node
//! (`SCAN`), weighed with `MEMORY USAGE <key> SAMPLES 0` (exact: every
//! element counted) and grouped by its row in the key schema
//! ([`callboard_readmodel::keys::KeyKind`]).

use std::collections::BTreeMap;

use callboard_readmodel::keys::KeyKind;
use callboard_readmodel::Keys;

/// One kind of key: how many there are and what they weigh together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyCost {
    /// `None`: keys under the prefix that the schema does not name.
    pub kind: Option<KeyKind>,
    pub keys: u64,
    pub bytes: u64,
}

impl KeyCost {
    pub fn label(&self) -> &'static str {
        self.kind.map_or("other (outside the schema)", KeyKind::pattern)
    }
}

/// Keys weighed per pipeline.
const PIPELINE: usize = 500;

/// Every key of `keys`' prefix on `nodes` (each node's own keys: on a
/// cluster, each master's), by kind, heaviest first.
pub async fn key_costs(nodes: &[String], keys: &Keys) -> anyhow::Result<Vec<KeyCost>> {
    let mut by_kind: BTreeMap<Option<KeyKind>, (u64, u64)> = BTreeMap::new();
    for url in nodes {
        // No response timeout: weighing every element of a 200K-member
        // ZSET takes tens of ms, a pipeline of 500 keys may hold several.
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        let mut c = redis::Client::open(url.as_str())?.get_multiplexed_async_connection_with_config(&config).await?;
        let mut names: Vec<String> = Vec::new();
        let mut cursor = 0_u64;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(keys.everything_pattern())
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await?;
            names.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        for chunk in names.chunks(PIPELINE) {
            let mut pipe = redis::pipe();
            for name in chunk {
                pipe.cmd("MEMORY").arg("USAGE").arg(name).arg("SAMPLES").arg(0);
            }
            // A key deleted since the SCAN weighs nothing.
            let weights: Vec<Option<u64>> = pipe.query_async(&mut c).await?;
            for (name, bytes) in chunk.iter().zip(weights) {
                let entry = by_kind.entry(keys.kind_of(name)).or_default();
                entry.0 += 1;
                entry.1 += bytes.unwrap_or(0);
            }
        }
    }
    let mut costs: Vec<KeyCost> =
        by_kind.into_iter().map(|(kind, (keys, bytes))| KeyCost { kind, keys, bytes }).collect();
    costs.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.kind.cmp(&b.kind)));
    Ok(costs)
}
