//! Purges: one tenant's calls (an invalidation, or before a warm), and the
//! whole read model (a rebuild). Every deletion runs in a guarded script.

use std::collections::BTreeMap;

use callboard_domain::{DocKey, TenantId};

use super::script::Op;
use super::{GlobalOp, Locator, Writer};
use crate::codec::member_parts;
use crate::keys::tag_of;
use crate::ReadModelError;

impl Writer {
    /// Removes every call of `tenant` (and their locators). Its statuses
    /// stay: the projector keeps statuses for every tenant.
    pub async fn purge_tenant_calls(&self, tenant: TenantId) -> Result<u64, ReadModelError> {
        let zsets: Vec<String> =
            self.redis.scan_tag(&self.keys.version(tenant), &self.keys.zset_pattern(tenant)).await?;
        let mut removed = 0;
        let mut c = self.conn().await?;
        for z in &zsets {
            let mut cursor: u64 = 0;
            loop {
                let (next, chunk): (u64, Vec<Vec<u8>>) =
                    redis::cmd("ZSCAN").arg(z).arg(cursor).arg("COUNT").arg(1000).query_async(&mut c).await?;
                let docs: Vec<DocKey> =
                    chunk.iter().step_by(2).filter_map(|m| member_parts(m)).map(|(_, doc)| doc).collect();
                if !docs.is_empty() {
                    removed += docs.len() as u64;
                    // Drop this tenant from each locator, keeping other places.
                    let view = self.load_locators(&docs, &[], &[], &[]).await?;
                    let ops: Vec<GlobalOp> = docs
                        .iter()
                        .map(|d| {
                            let mut places = view.call_loc.get(d).cloned().unwrap_or_default();
                            places.retain(|p| p.tenant != tenant);
                            if places.is_empty() {
                                GlobalOp::DelLoc(Locator::Call, d.clone())
                            } else {
                                GlobalOp::call_loc(d.clone(), &places)
                            }
                        })
                        .collect();
                    self.run_global(&ops).await?;
                }
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        // One guarded script on the tenant's slot; a DEL there counts as a
        // change of calls, so the version moves and a read between its two
        // round trips sees that calls changed.
        let mut batch = self.tenant_batch(tenant);
        for key in zsets.into_iter().chain(self.keys.tenant_call_keys(tenant)) {
            batch.push(Op::Del { key });
        }
        batch.run(&mut c, self.window).await?;
        Ok(removed)
    }

    /// Removes the whole read model under the prefix on every master, but
    /// the lease, the fences, the command queue, the epoch counter, warm
    /// jobs and the progress counters; each slot's keys in one guarded
    /// script.
    pub async fn purge_all(&self) -> Result<(), ReadModelError> {
        let keep =
            [self.keys.lease(), self.keys.commands(), self.keys.epoch(), self.keys.progress(), self.keys.fence_seq()];
        let keys: Vec<String> = self.redis.scan(&self.keys.everything_pattern()).await?;
        let mut by_tag: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for key in keys {
            if keep.contains(&key) || key.contains(":job:") || key.ends_with(":fence") {
                continue;
            }
            by_tag.entry(tag_of(&key).unwrap_or_default().to_string()).or_default().push(key);
        }
        let ops: Vec<Op> = by_tag.into_values().flatten().map(|key| Op::Del { key }).collect();
        for chunk in ops.chunks(500) {
            self.run_shared(chunk.to_vec()).await?;
        }
        Ok(())
    }
}
