//! The write side: the state the projector reads before planning a batch,
//! the operations it plans, and their application: one MULTI per tenant
//! (all of a tenant's keys share a slot), then one for the shared keys.
//!
//! Every operation sets a value rather than adjusting one (no counter is
//! ever incremented), so applying a plan twice leaves the same state.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use callboard_domain::{DocKey, StatusKey, TenantId, UserId};
use deadpool_redis::Pool;
use redis::AsyncCommands;

use crate::codec::{CallEntry, IdxValue};
use crate::read::TenantState;
use crate::{Keys, ReadModelError};

/// Where a status document lives: `g` (global) or a tenant id.
pub type StatusPlace = String;

pub fn status_place(tenant: Option<TenantId>) -> StatusPlace {
    tenant.map(|t| t.get().to_string()).unwrap_or_else(|| "g".into())
}

/// What the projector knows of the read model before planning a batch.
#[derive(Debug, Default, Clone)]
pub struct StateView {
    pub call_loc: HashMap<DocKey, TenantId>,
    pub idx: HashMap<(TenantId, DocKey), IdxValue>,
    pub user_loc: HashMap<DocKey, UserId>,
    pub status_loc: HashMap<DocKey, StatusPlace>,
    pub tenants: HashMap<TenantId, TenantState>,
}

impl StateView {
    pub fn tenant_state(&self, t: TenantId) -> TenantState {
        self.tenants.get(&t).copied().unwrap_or(TenantState::Cold)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum TenantOp {
    /// Put a call in place, replacing `old` (the index entry before).
    Put {
        doc: DocKey,
        old: Option<IdxValue>,
        index: IdxValue,
        stored: String,
    },
    Remove {
        doc: DocKey,
        old: IdxValue,
    },
    PutStatus {
        doc: DocKey,
        json: String,
    },
    DelStatus {
        doc: DocKey,
    },
    Touch {
        last_event_ms: i64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum GlobalOp {
    PutCallLoc(DocKey, TenantId),
    DelCallLoc(DocKey),
    PutUser(UserId, String),
    DelUser(UserId),
    PutUserLoc(DocKey, UserId),
    DelUserLoc(DocKey),
    PutGlobalStatus(DocKey, String),
    DelGlobalStatus(DocKey),
    PutStatusLoc(DocKey, StatusPlace),
    DelStatusLoc(DocKey),
}

/// A batch's writes.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Plan {
    pub tenants: BTreeMap<TenantId, Vec<TenantOp>>,
    pub global: Vec<GlobalOp>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty() && self.global.is_empty()
    }
}

/// The projector's access to Redis.
#[derive(Clone)]
pub struct Writer {
    pool: Pool,
    keys: Keys,
}

impl Writer {
    pub fn new(pool: Pool, keys: Keys) -> Self {
        Self { pool, keys }
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub async fn conn(&self) -> Result<deadpool_redis::Connection, ReadModelError> {
        Ok(self.pool.get().await?)
    }

    /// Locators of the given documents, and every tenant's state.
    pub async fn load_locators(
        &self,
        calls: &[DocKey],
        users: &[DocKey],
        statuses: &[DocKey],
    ) -> Result<StateView, ReadModelError> {
        let mut c = self.conn().await?;
        let mut view = StateView::default();
        let states: HashMap<i64, String> = c.hgetall(self.keys.tenant_state()).await?;
        view.tenants = states
            .into_iter()
            .filter_map(|(t, s)| Some((TenantId::new(t).ok()?, TenantState::parse(Some(&s)))))
            .collect();
        if !calls.is_empty() {
            let found: Vec<Option<i64>> = hmget(&mut c, &self.keys.call_loc(), calls).await?;
            for (doc, t) in calls.iter().zip(found) {
                if let Some(t) = t.and_then(|t| TenantId::new(t).ok()) {
                    view.call_loc.insert(doc.clone(), t);
                }
            }
        }
        if !users.is_empty() {
            let found: Vec<Option<i64>> = hmget(&mut c, &self.keys.user_loc(), users).await?;
            for (doc, u) in users.iter().zip(found) {
                if let Some(u) = u {
                    view.user_loc.insert(doc.clone(), UserId::new(u));
                }
            }
        }
        if !statuses.is_empty() {
            let found: Vec<Option<String>> = hmget(&mut c, &self.keys.status_loc(), statuses).await?;
            for (doc, p) in statuses.iter().zip(found) {
                if let Some(p) = p {
                    view.status_loc.insert(doc.clone(), p);
                }
            }
        }
        Ok(view)
    }

    /// Call index entries for (tenant, document) pairs.
    pub async fn load_idx(
        &self,
        view: &mut StateView,
        pairs: &BTreeSet<(TenantId, DocKey)>,
    ) -> Result<(), ReadModelError> {
        let mut by_tenant: BTreeMap<TenantId, Vec<DocKey>> = BTreeMap::new();
        for (t, d) in pairs {
            by_tenant.entry(*t).or_default().push(d.clone());
        }
        let mut c = self.conn().await?;
        for (t, docs) in by_tenant {
            let found: Vec<Option<String>> = hmget(&mut c, &self.keys.idx(t), &docs).await?;
            for (doc, v) in docs.into_iter().zip(found) {
                if let Some(v) = v {
                    let idx = IdxValue::decode(&v).ok_or_else(|| ReadModelError::Corrupt {
                        key: self.keys.idx(t),
                        detail: format!("{doc}: {v}"),
                    })?;
                    view.idx.insert((t, doc), idx);
                }
            }
        }
        Ok(())
    }

    /// Applies a plan: one atomic MULTI per tenant, then one for the
    /// shared keys (locators last, so that a crash in between leaves them
    /// pointing at the old place, which a replay repairs).
    pub async fn apply(&self, plan: &Plan) -> Result<(), ReadModelError> {
        let mut c = self.conn().await?;
        for (tenant, ops) in &plan.tenants {
            let mut pipe = redis::pipe();
            pipe.atomic();
            for op in ops {
                self.tenant_op(&mut pipe, *tenant, op);
            }
            let _: () = pipe.query_async(&mut c).await?;
        }
        if !plan.global.is_empty() {
            let mut pipe = redis::pipe();
            pipe.atomic();
            for op in &plan.global {
                self.global_op(&mut pipe, op);
            }
            let _: () = pipe.query_async(&mut c).await?;
        }
        Ok(())
    }

    fn tenant_op(&self, pipe: &mut redis::Pipeline, t: TenantId, op: &TenantOp) {
        let k = &self.keys;
        match op {
            TenantOp::Put { doc, old, index, stored } => {
                if let Some(old) = old {
                    if old.status != index.status || old.member != index.member {
                        pipe.zrem(k.zset(t, old.status), &old.member).ignore();
                    }
                    if old.member != index.member {
                        pipe.hdel(k.docs(t), &old.member).ignore();
                    }
                }
                pipe.zadd(k.zset(t, index.status), &index.member, index.score()).ignore();
                pipe.hset(k.docs(t), &index.member, stored).ignore();
                pipe.hset(k.idx(t), doc.as_str(), index.encode()).ignore();
            }
            TenantOp::Remove { doc, old } => {
                pipe.zrem(k.zset(t, old.status), &old.member).ignore();
                pipe.hdel(k.docs(t), &old.member).ignore();
                pipe.hdel(k.idx(t), doc.as_str()).ignore();
            }
            TenantOp::PutStatus { doc, json } => {
                pipe.hset(k.statuses(t), doc.as_str(), json).ignore();
            }
            TenantOp::DelStatus { doc } => {
                pipe.hdel(k.statuses(t), doc.as_str()).ignore();
            }
            TenantOp::Touch { last_event_ms } => {
                pipe.hset(k.meta(t), "last_event_ms", last_event_ms).ignore();
            }
        }
    }

    fn global_op(&self, pipe: &mut redis::Pipeline, op: &GlobalOp) {
        let k = &self.keys;
        match op {
            GlobalOp::PutCallLoc(d, t) => pipe.hset(k.call_loc(), d.as_str(), t.get()).ignore(),
            GlobalOp::DelCallLoc(d) => pipe.hdel(k.call_loc(), d.as_str()).ignore(),
            GlobalOp::PutUser(u, json) => pipe.hset(k.users(), u.get(), json).ignore(),
            GlobalOp::DelUser(u) => pipe.hdel(k.users(), u.get()).ignore(),
            GlobalOp::PutUserLoc(d, u) => pipe.hset(k.user_loc(), d.as_str(), u.get()).ignore(),
            GlobalOp::DelUserLoc(d) => pipe.hdel(k.user_loc(), d.as_str()).ignore(),
            GlobalOp::PutGlobalStatus(d, json) => pipe.hset(k.global_statuses(), d.as_str(), json).ignore(),
            GlobalOp::DelGlobalStatus(d) => pipe.hdel(k.global_statuses(), d.as_str()).ignore(),
            GlobalOp::PutStatusLoc(d, p) => pipe.hset(k.status_loc(), d.as_str(), p).ignore(),
            GlobalOp::DelStatusLoc(d) => pipe.hdel(k.status_loc(), d.as_str()).ignore(),
        };
    }

    /// Loads snapshot entries of one tenant (during a warm): calls put in
    /// place as if inserted, with their locators.
    pub async fn put_snapshot(&self, tenant: TenantId, entries: &[CallEntry]) -> Result<(), ReadModelError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut c = self.conn().await?;
        let docs: Vec<DocKey> = entries.iter().map(|e| e.doc.clone()).collect();
        let mut view = StateView::default();
        let pairs = docs.iter().map(|d| (tenant, d.clone())).collect();
        self.load_idx(&mut view, &pairs).await?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        for e in entries {
            let old = view.idx.get(&(tenant, e.doc.clone())).cloned();
            let op = TenantOp::Put { doc: e.doc.clone(), old, index: e.index.clone(), stored: e.stored.clone() };
            self.tenant_op(&mut pipe, tenant, &op);
        }
        let _: () = pipe.query_async(&mut c).await?;
        let mut pipe = redis::pipe();
        for e in entries {
            pipe.hset(self.keys.call_loc(), e.doc.as_str(), tenant.get()).ignore();
        }
        let _: () = pipe.query_async(&mut c).await?;
        Ok(())
    }

    /// Removes every call of `tenant` (and their locators). Its statuses
    /// stay: the projector keeps statuses for every tenant.
    pub async fn purge_tenant_calls(&self, tenant: TenantId) -> Result<u64, ReadModelError> {
        let mut c = self.conn().await?;
        let idx = self.keys.idx(tenant);
        let mut removed = 0;
        let mut cursor: u64 = 0;
        loop {
            let (next, chunk): (u64, Vec<String>) =
                redis::cmd("HSCAN").arg(&idx).arg(cursor).arg("COUNT").arg(1000).query_async(&mut c).await?;
            let docs: Vec<&str> = chunk.iter().step_by(2).map(String::as_str).collect();
            if !docs.is_empty() {
                removed += docs.len() as u64;
                let _: () = redis::cmd("HDEL").arg(self.keys.call_loc()).arg(&docs).query_async(&mut c).await?;
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let mut keys: Vec<String> = scan(&mut c, &self.keys.tenant_call_pattern(tenant)[0]).await?;
        keys.extend(self.keys.tenant_call_pattern(tenant).into_iter().skip(1));
        for chunk in keys.chunks(500) {
            let _: () = redis::cmd("DEL").arg(chunk).query_async(&mut c).await?;
        }
        Ok(removed)
    }

    /// Removes the whole read model under the prefix but the lease, the
    /// command queue, the epoch counter, warm jobs and the progress counters.
    pub async fn purge_all(&self) -> Result<(), ReadModelError> {
        let mut c = self.conn().await?;
        let keep = [self.keys.lease(), self.keys.commands(), self.keys.epoch(), self.keys.progress()];
        let keys: Vec<String> = scan(&mut c, &self.keys.everything_pattern()).await?;
        let doomed: Vec<&String> = keys.iter().filter(|k| !keep.contains(k) && !k.contains(":job:")).collect();
        for chunk in doomed.chunks(500) {
            let _: () = redis::cmd("DEL").arg(chunk).query_async(&mut c).await?;
        }
        Ok(())
    }

    /// Sets a warming tenant warm, unless its state changed meanwhile
    /// (invalidated, or a newer warm queued).
    pub async fn mark_warm(&self, tenant: TenantId, epoch: u64) -> Result<bool, ReadModelError> {
        let script = redis::Script::new(
            r#"local s = redis.call('HGET', KEYS[1], ARGV[1])
               if s and string.sub(s, 1, string.len(ARGV[2])) == ARGV[2] then
                 redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) return 1 end
               return 0"#,
        );
        let mut c = self.conn().await?;
        let done: i64 = script
            .key(self.keys.tenant_state())
            .arg(tenant.get())
            .arg(format!("warming:{epoch}:"))
            .arg(format!("warm:{epoch}"))
            .invoke_async(&mut c)
            .await?;
        Ok(done == 1)
    }

    /// Every status key that has a ZSET for `tenant` (tests and ops).
    pub fn status_key_of(&self, zset_key: &str) -> Option<StatusKey> {
        zset_key.rsplit(":z:").next()?.parse().ok().map(StatusKey::new)
    }
}

async fn hmget<T: redis::FromRedisValue>(
    c: &mut deadpool_redis::Connection,
    key: &str,
    fields: &[DocKey],
) -> Result<Vec<T>, ReadModelError> {
    let mut out = Vec::with_capacity(fields.len());
    for chunk in fields.chunks(1000) {
        let names: Vec<&str> = chunk.iter().map(DocKey::as_str).collect();
        let part: Vec<T> = redis::cmd("HMGET").arg(key).arg(&names).query_async(c).await?;
        out.extend(part);
    }
    Ok(out)
}

async fn scan(c: &mut deadpool_redis::Connection, pattern: &str) -> Result<Vec<String>, ReadModelError> {
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, chunk): (u64, Vec<String>) =
            redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000).query_async(c).await?;
        keys.extend(chunk);
        cursor = next;
        if cursor == 0 {
            return Ok(keys);
        }
    }
}
