//! Purges: one tenant's calls (an invalidation, or before a warm), and the
//! whole read model (a rebuild). Every deletion runs in a guarded script.

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
                let scanned: Result<(u64, Vec<Vec<u8>>), _> =
                    redis::cmd("ZSCAN").arg(z).arg(cursor).arg("COUNT").arg(1000).query_async(&mut c).await;
                let (next, chunk) = match scanned {
                    Ok(scanned) => scanned,
                    // Not a ZSET (a corrupt key, as a poison event may
                    // leave): nothing to unlocate; it is deleted below.
                    Err(e) if e.code() == Some("WRONGTYPE") => break,
                    Err(e) => return Err(e.into()),
                };
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

    /// Removes this partition's read model (on every master): its
    /// tenants' keys, its locators, its checkpoint and format mark; for
    /// partition 0 also the users, the global statuses, and whatever no
    /// partition owns (keys of an older format, or of partitions beyond the
    /// count). Kept: leases, fences, the command queue, the epoch counter,
    /// warm jobs, the tenant index, the progress counters and the members.
    /// Each slot's keys go in guarded scripts.
    pub async fn purge_all(&self) -> Result<(), ReadModelError> {
        let keys: Vec<String> = self.redis.scan(&self.keys.everything_pattern()).await?;
        let ops: Vec<Op> = keys.into_iter().filter(|k| self.owns_key(k)).map(|key| Op::Del { key }).collect();
        for chunk in ops.chunks(500) {
            self.run_shared(chunk.to_vec()).await?;
        }
        Ok(())
    }

    /// Whether a purge of this partition removes `key`.
    fn owns_key(&self, key: &str) -> bool {
        let scope = self.scope;
        let mine = |p: &str| {
            p.parse::<u32>()
                .is_ok_and(|p| p == scope.partition || (scope.owns_globals() && p >= scope.partitioning.count()))
        };
        let rest = key.split_once("}:").map(|(_, r)| r).unwrap_or("");
        match tag_of(key) {
            _ if rest == "fence" || rest.starts_with("fence:") => false,
            Some(t) if t.starts_with('t') => match t[1..].parse::<i64>().ok().and_then(|n| TenantId::new(n).ok()) {
                Some(tenant) => scope.owns_tenant(tenant),
                None => scope.owns_globals(),
            },
            Some(t) if t.starts_with('l') => match rest.strip_prefix("cl:").and_then(|r| r.split_once(':')) {
                Some((p, _)) => mine(p),
                None => scope.owns_globals(),
            },
            Some(t) if t.starts_with('m') => match rest.strip_prefix("seq:") {
                Some(p) => mine(p),
                None => scope.owns_globals(),
            },
            Some(crate::keys::GLOBAL_TAG) => {
                // `poison`: records of quarantined tenants of every
                // partition (a stale one is not shown: see `poison_events`).
                let shared = ["cmdq", "epoch", "progress", "fence_seq", "members", "tenants", "poison"];
                if shared.contains(&rest) || rest.starts_with("job:") || rest.starts_with("lease:") {
                    return false;
                }
                match ["sloc:", "ckpt:", "schema:", "settings:", "asof:"].iter().find_map(|k| rest.strip_prefix(k)) {
                    Some(p) => mine(p),
                    None => scope.owns_globals(),
                }
            }
            _ => scope.owns_globals(),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::keys::Partitioning;
    use crate::{Keys, Redis};

    use super::*;

    #[test]
    fn a_partition_purges_its_own_keys_and_partition_0_the_rest() {
        let redis = Redis::single_url("redis://127.0.0.1:1", 1).unwrap();
        let of = |p| Writer::new(redis.clone(), Keys::new("cb")).for_partition(p, Partitioning::new(2));
        let (zero, one) = (of(0), of(1));
        let t = |n| TenantId::new(n).unwrap();
        let (t0, t1) = (
            (1..).map(t).find(|x| Partitioning::new(2).of(*x) == 0).unwrap(),
            (1..).map(t).find(|x| Partitioning::new(2).of(*x) == 1).unwrap(),
        );
        let k = Keys::new("cb");
        let doc = DocKey::from_stored("65f0a0a0a0a0a0a0a0a0a0a0".into());
        let cases: Vec<(String, bool, bool)> = vec![
            (k.zset(t0, callboard_domain::StatusKey::new(1)), true, false),
            (k.state(t1), false, true),
            (k.fence(t1), false, false),
            (k.call_loc(&doc), true, false),
            (k.in_partition(1).call_loc(&doc), false, true),
            (k.in_partition(5).call_loc(&doc), true, false),
            (k.in_partition(1).fence_of_tag("l3"), false, false),
            (k.users(), true, false),
            (k.in_partition(1).checkpoint(), false, true),
            (k.in_partition(1).lease(), false, false),
            (k.commands(), false, false),
            (k.marker("m3"), true, false),
            (k.in_partition(1).marker("m3"), false, true),
            (k.job("w3"), false, false),
            (k.tenants(), false, false),
            ("cb:{g}:tstate".into(), true, false),
            ("cb:{g}:cl:77".into(), true, false),
        ];
        for (key, by_zero, by_one) in cases {
            assert_eq!((zero.owns_key(&key), one.owns_key(&key)), (by_zero, by_one), "{key}");
        }
    }
}
