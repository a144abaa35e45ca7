//! The write side: the state the projector reads before planning a batch,
//! the operations it plans, and their application.
//!
//! A plan is applied in three steps, each one atomic Lua script: the
//! *intents* (every locator widened to the old and the new places), one
//! script per tenant (all of a tenant's keys share a slot), then the shared
//! keys (final locators, users, global statuses). A crash between steps
//! leaves each document's locator naming every place it may be in, so the
//! replay finds and cleans them all, whatever the documents look like by
//! then. Each tenant script checks and raises the tenant's fence token, and
//! the shared one checks the lease: a projector that lost its lease cannot
//! write over a newer leader's work.
//!
//! Every operation sets a value rather than adjusting one (no counter is
//! ever incremented), so applying a plan twice leaves the same state.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use callboard_domain::{DocKey, TenantId, UserId};
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
/// A locator may name several places while a batch is half applied.
#[derive(Debug, Default, Clone)]
pub struct StateView {
    pub call_loc: HashMap<DocKey, BTreeSet<TenantId>>,
    pub idx: HashMap<(TenantId, DocKey), IdxValue>,
    pub user_loc: HashMap<DocKey, BTreeSet<UserId>>,
    pub status_loc: HashMap<DocKey, BTreeSet<StatusPlace>>,
    pub tenants: HashMap<TenantId, TenantState>,
}

/// Which locator hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locator {
    Call,
    User,
    Status,
}

fn encode_places<T: ToString>(places: impl IntoIterator<Item = T>) -> String {
    places.into_iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",")
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
    /// A locator: the places (comma-separated) a document may be in.
    PutLoc(Locator, DocKey, String),
    DelLoc(Locator, DocKey),
    PutUser(UserId, String),
    DelUser(UserId),
    PutGlobalStatus(DocKey, String),
    DelGlobalStatus(DocKey),
}

impl GlobalOp {
    pub fn call_loc(doc: DocKey, tenants: impl IntoIterator<Item = TenantId>) -> Self {
        GlobalOp::PutLoc(Locator::Call, doc, encode_places(tenants.into_iter().map(TenantId::get)))
    }
    pub fn user_loc(doc: DocKey, users: impl IntoIterator<Item = UserId>) -> Self {
        GlobalOp::PutLoc(Locator::User, doc, encode_places(users.into_iter().map(UserId::get)))
    }
    pub fn status_loc<'a>(doc: DocKey, places: impl IntoIterator<Item = &'a StatusPlace>) -> Self {
        GlobalOp::PutLoc(Locator::Status, doc, encode_places(places))
    }
}

/// A batch's writes.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Plan {
    /// Locators widened before any tenant is written.
    pub intents: Vec<GlobalOp>,
    pub tenants: BTreeMap<TenantId, Vec<TenantOp>>,
    pub global: Vec<GlobalOp>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.intents.is_empty() && self.tenants.is_empty() && self.global.is_empty()
    }
}

/// Who may write: checked inside every write script.
#[derive(Debug, Clone)]
pub enum Guard {
    /// Tests and tools: no check.
    None,
    /// The projector: tenant scripts require the tenant's fence to be at
    /// most `token` (and raise it); shared scripts require `owner` to hold
    /// the lease.
    Leader { token: u64, owner: String },
}

/// Commands gathered for one atomic script on one slot.
struct Script {
    keys: Vec<String>,
    argv: Vec<String>,
}

const APPLY: &str = r#"
local mode = ARGV[1]
if mode == 'fence' then
  local fence = tonumber(redis.call('GET', KEYS[1]) or '0')
  if fence > tonumber(ARGV[2]) then return redis.error_reply('FENCED a newer projector wrote here') end
  if fence < tonumber(ARGV[2]) then redis.call('SET', KEYS[1], ARGV[2]) end
elseif mode == 'lease' then
  if redis.call('GET', KEYS[1]) ~= ARGV[2] then return redis.error_reply('FENCED the lease is lost') end
end
local i = 3
while i <= #ARGV do
  local n = tonumber(ARGV[i + 2])
  redis.call(ARGV[i], KEYS[tonumber(ARGV[i + 1])], unpack(ARGV, i + 3, i + 2 + n))
  i = i + 3 + n
end
return 1
"#;

impl Script {
    fn new(guard_key: String) -> Self {
        Self { keys: vec![guard_key], argv: Vec::new() }
    }

    fn cmd(&mut self, op: &str, key: String, args: &[String]) {
        let index = match self.keys.iter().position(|k| *k == key) {
            Some(i) => i + 1,
            None => {
                self.keys.push(key);
                self.keys.len()
            }
        };
        self.argv.push(op.to_string());
        self.argv.push(index.to_string());
        self.argv.push(args.len().to_string());
        self.argv.extend(args.iter().cloned());
    }

    async fn run(self, c: &mut deadpool_redis::Connection, mode: &str, check: &str) -> Result<(), ReadModelError> {
        // Hashed once: this runs several times per projector batch.
        static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
        let mut invocation = SCRIPT.get_or_init(|| redis::Script::new(APPLY)).prepare_invoke();
        for k in &self.keys {
            invocation.key(k);
        }
        invocation.arg(mode).arg(check);
        for a in &self.argv {
            invocation.arg(a);
        }
        match invocation.invoke_async::<i64>(c).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("FENCED") => Err(ReadModelError::Fenced),
            Err(e) => Err(e.into()),
        }
    }
}

/// The projector's access to Redis.
#[derive(Clone)]
pub struct Writer {
    pool: Pool,
    keys: Keys,
    guard: Guard,
}

impl Writer {
    pub fn new(pool: Pool, keys: Keys) -> Self {
        Self { pool, keys, guard: Guard::None }
    }

    /// A writer whose every write checks `guard`.
    pub fn guarded(pool: Pool, keys: Keys, guard: Guard) -> Self {
        Self { pool, keys, guard }
    }

    fn tenant_script(&self, t: TenantId) -> (Script, &'static str, String) {
        match &self.guard {
            Guard::None => (Script::new(self.keys.fence(t)), "none", String::new()),
            Guard::Leader { token, .. } => (Script::new(self.keys.fence(t)), "fence", token.to_string()),
        }
    }

    fn global_script(&self) -> (Script, &'static str, String) {
        match &self.guard {
            Guard::None => (Script::new(self.keys.lease()), "none", String::new()),
            Guard::Leader { owner, .. } => (Script::new(self.keys.lease()), "lease", owner.clone()),
        }
    }

    fn locator_key(&self, which: Locator) -> String {
        match which {
            Locator::Call => self.keys.call_loc(),
            Locator::User => self.keys.user_loc(),
            Locator::Status => self.keys.status_loc(),
        }
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
        for (doc, places) in calls.iter().zip(hmget::<Option<String>>(&mut c, &self.keys.call_loc(), calls).await?) {
            let set: BTreeSet<TenantId> = split(&places).filter_map(|p| TenantId::new(p.parse().ok()?).ok()).collect();
            if !set.is_empty() {
                view.call_loc.insert(doc.clone(), set);
            }
        }
        for (doc, places) in users.iter().zip(hmget::<Option<String>>(&mut c, &self.keys.user_loc(), users).await?) {
            let set: BTreeSet<UserId> = split(&places).filter_map(|p| p.parse().ok().map(UserId::new)).collect();
            if !set.is_empty() {
                view.user_loc.insert(doc.clone(), set);
            }
        }
        for (doc, places) in
            statuses.iter().zip(hmget::<Option<String>>(&mut c, &self.keys.status_loc(), statuses).await?)
        {
            let set: BTreeSet<StatusPlace> = split(&places).map(str::to_string).collect();
            if !set.is_empty() {
                view.status_loc.insert(doc.clone(), set);
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

    /// Applies a plan: intents, then each tenant, then the shared keys,
    /// each one guarded atomic script.
    pub async fn apply(&self, plan: &Plan) -> Result<(), ReadModelError> {
        let mut c = self.conn().await?;
        self.run_global(&mut c, &plan.intents).await?;
        for (tenant, ops) in &plan.tenants {
            let (mut script, mode, check) = self.tenant_script(*tenant);
            for op in ops {
                self.tenant_op(&mut script, *tenant, op);
            }
            script.run(&mut c, mode, &check).await?;
        }
        self.run_global(&mut c, &plan.global).await
    }

    async fn run_global(&self, c: &mut deadpool_redis::Connection, ops: &[GlobalOp]) -> Result<(), ReadModelError> {
        if ops.is_empty() {
            return Ok(());
        }
        let (mut script, mode, check) = self.global_script();
        for op in ops {
            self.global_op(&mut script, op);
        }
        script.run(c, mode, &check).await
    }

    fn tenant_op(&self, script: &mut Script, t: TenantId, op: &TenantOp) {
        let k = &self.keys;
        match op {
            TenantOp::Put { doc, old, index, stored } => {
                if let Some(old) = old {
                    if old.status != index.status || old.member != index.member {
                        script.cmd("ZREM", k.zset(t, old.status), std::slice::from_ref(&old.member));
                    }
                    if old.member != index.member {
                        script.cmd("HDEL", k.docs(t), std::slice::from_ref(&old.member));
                    }
                }
                script.cmd("ZADD", k.zset(t, index.status), &[index.score().to_string(), index.member.clone()]);
                script.cmd("HSET", k.docs(t), &[index.member.clone(), stored.clone()]);
                script.cmd("HSET", k.idx(t), &[doc.to_string(), index.encode()]);
            }
            TenantOp::Remove { doc, old } => {
                script.cmd("ZREM", k.zset(t, old.status), std::slice::from_ref(&old.member));
                script.cmd("HDEL", k.docs(t), std::slice::from_ref(&old.member));
                script.cmd("HDEL", k.idx(t), &[doc.to_string()]);
            }
            TenantOp::PutStatus { doc, json } => {
                script.cmd("HSET", k.statuses(t), &[doc.to_string(), json.clone()]);
                script.cmd("SET", k.status_stamp(t), &[stamp()]);
            }
            TenantOp::DelStatus { doc } => {
                script.cmd("HDEL", k.statuses(t), &[doc.to_string()]);
                script.cmd("SET", k.status_stamp(t), &[stamp()]);
            }
            TenantOp::Touch { last_event_ms } => {
                script.cmd("HSET", k.meta(t), &["last_event_ms".into(), last_event_ms.to_string()])
            }
        }
    }

    fn global_op(&self, script: &mut Script, op: &GlobalOp) {
        let k = &self.keys;
        match op {
            GlobalOp::PutLoc(which, d, places) => {
                script.cmd("HSET", self.locator_key(*which), &[d.to_string(), places.clone()])
            }
            GlobalOp::DelLoc(which, d) => script.cmd("HDEL", self.locator_key(*which), &[d.to_string()]),
            GlobalOp::PutUser(u, json) => {
                script.cmd("HSET", k.users(), &[u.get().to_string(), json.clone()]);
                script.cmd("SET", k.users_stamp(), &[stamp()]);
            }
            GlobalOp::DelUser(u) => {
                script.cmd("HDEL", k.users(), &[u.get().to_string()]);
                script.cmd("SET", k.users_stamp(), &[stamp()]);
            }
            GlobalOp::PutGlobalStatus(d, json) => {
                script.cmd("HSET", k.global_statuses(), &[d.to_string(), json.clone()]);
                script.cmd("SET", k.global_status_stamp(), &[stamp()]);
            }
            GlobalOp::DelGlobalStatus(d) => {
                script.cmd("HDEL", k.global_statuses(), &[d.to_string()]);
                script.cmd("SET", k.global_status_stamp(), &[stamp()]);
            }
        }
    }

    /// Loads snapshot entries of one tenant (during a warm): calls put in
    /// place as if inserted. Each call's locator keeps the places it already
    /// names: another warm tenant may still hold the call at the stream's
    /// position (it moved after), and the event that moved it must find it
    /// there.
    pub async fn put_snapshot(&self, tenant: TenantId, entries: &[CallEntry]) -> Result<(), ReadModelError> {
        if entries.is_empty() {
            return Ok(());
        }
        let docs: Vec<DocKey> = entries.iter().map(|e| e.doc.clone()).collect();
        let mut view = self.load_locators(&docs, &[], &[]).await?;
        let pairs = docs.iter().map(|d| (tenant, d.clone())).collect();
        self.load_idx(&mut view, &pairs).await?;
        let mut c = self.conn().await?;
        let (mut script, mode, check) = self.tenant_script(tenant);
        let mut locators = Vec::with_capacity(entries.len());
        for e in entries {
            let old = view.idx.get(&(tenant, e.doc.clone())).cloned();
            let op = TenantOp::Put { doc: e.doc.clone(), old, index: e.index.clone(), stored: e.stored.clone() };
            self.tenant_op(&mut script, tenant, &op);
            let mut places = view.call_loc.get(&e.doc).cloned().unwrap_or_default();
            places.insert(tenant);
            locators.push(GlobalOp::call_loc(e.doc.clone(), places));
        }
        // Locators first: a crash after them leaves a place named but empty,
        // which is harmless; the other order could hide a placed call.
        self.run_global(&mut c, &locators).await?;
        script.run(&mut c, mode, &check).await
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
            let docs: Vec<DocKey> = chunk.iter().step_by(2).cloned().map(DocKey::from_stored).collect();
            if !docs.is_empty() {
                removed += docs.len() as u64;
                // Drop this tenant from each locator, keeping other places.
                let view = self.load_locators(&docs, &[], &[]).await?;
                let ops: Vec<GlobalOp> = docs
                    .iter()
                    .map(|d| {
                        let mut places = view.call_loc.get(d).cloned().unwrap_or_default();
                        places.remove(&tenant);
                        if places.is_empty() {
                            GlobalOp::DelLoc(Locator::Call, d.clone())
                        } else {
                            GlobalOp::call_loc(d.clone(), places)
                        }
                    })
                    .collect();
                self.run_global(&mut c, &ops).await?;
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
        let keep =
            [self.keys.lease(), self.keys.commands(), self.keys.epoch(), self.keys.progress(), self.keys.fence_seq()];
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
}

/// A value no other write ever produced (time, process, sequence): readers
/// cache statuses and users under it, so it must never come back after a
/// purge, as a counter's would.
fn stamp() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{nanos:x}.{:x}.{:x}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed))
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

fn split(places: &Option<String>) -> impl Iterator<Item = &str> {
    places.as_deref().unwrap_or("").split(',').filter(|p| !p.is_empty())
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
