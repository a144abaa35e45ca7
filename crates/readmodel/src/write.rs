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
//! Every operation sets a value rather than adjusting one (no count is
//! ever incremented; the window lengths move only with the ZSET changes
//! they describe, and the tenant's write version only tells readers that
//! something changed), so applying a plan twice leaves the same state.
//!
//! Documents are kept only for the first ranks of each status's ZSET (the
//! *document window*, `P:{tN}:dw`); a tenant script reports the statuses
//! whose window fell below what reads may ask for, and the projector
//! refills them from MongoDB ([`Writer::window_gap`], [`Writer::fill_window`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use callboard_domain::{DocKey, StatusKey, TenantId, UserId};
use deadpool_redis::Pool;
use redis::AsyncCommands;

use crate::codec::{member_parts, CallEntry, Place};
use crate::read::TenantState;
use crate::{scan, Keys, ReadModelError};

/// Where a status document lives: `g` (global) or a tenant id.
pub type StatusPlace = String;

pub fn status_place(tenant: Option<TenantId>) -> StatusPlace {
    tenant.map(|t| t.get().to_string()).unwrap_or_else(|| "g".into())
}

/// What the projector knows of the read model before planning a batch.
/// A locator may name several places while a batch is half applied.
#[derive(Debug, Default, Clone)]
pub struct StateView {
    pub call_loc: HashMap<DocKey, BTreeSet<Place>>,
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
    /// Put a call in place (replacing itself if there).
    Put(CallEntry),
    /// Remove a call from a place of this tenant.
    Remove {
        doc: DocKey,
        place: Place,
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
    pub fn call_loc<'a>(doc: DocKey, places: impl IntoIterator<Item = &'a Place>) -> Self {
        GlobalOp::PutLoc(Locator::Call, doc, Place::encode_all(places))
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

/// The check every write script starts with. ARGV[1] `fence`: the
/// tenant's fence (KEYS[1]) must not exceed the token ARGV[2], and is raised
/// to it; `lease`: the lease (KEYS[1]) must be held by ARGV[2]; `none`: no
/// check (tests and tools).
macro_rules! guard {
    () => {
        r#"
local mode = ARGV[1]
if mode == 'fence' then
  local fence = tonumber(redis.call('GET', KEYS[1]) or '0')
  if fence > tonumber(ARGV[2]) then return redis.error_reply('FENCED a newer projector wrote here') end
  if fence < tonumber(ARGV[2]) then redis.call('SET', KEYS[1], ARGV[2]) end
elseif mode == 'lease' then
  if redis.call('GET', KEYS[1]) ~= ARGV[2] then return redis.error_reply('FENCED the lease is lost') end
end
"#
    };
}

/// How many first ranks of each status's ZSET keep their documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DocWindow {
    /// Documents kept per status at most.
    pub size: u64,
    /// Below this many (or the status's size, if smaller) a window is
    /// refilled: the largest `limit` a read may ask for.
    pub floor: u64,
}

impl Default for DocWindow {
    fn default() -> Self {
        Self { size: 1200, floor: 1000 }
    }
}

/// Commands gathered for one atomic script on one slot.
struct Script {
    keys: Vec<String>,
    argv: Vec<Vec<u8>>,
    /// KEYS index of the tenant's version key, for tenant scripts.
    version: Option<usize>,
}

/// The write script. ARGV: guard mode and value, window size and floor,
/// the index of the tenant's version key (bumped when calls change; empty
/// for the shared keys' script), then operations: name, key count, key indexes, argument count,
/// arguments. `CPUT` and `CREM` (keys: ZSET, documents, windows; args:
/// status, [score,] member[, stored]) keep the document window: the first
/// `d` ranks of a ZSET, and only they, have a document. Returns the
/// statuses whose window is below min(floor, size) after the operations.
const APPLY: &str = concat!(
    guard!(),
    r#"
local W = tonumber(ARGV[3])
local F = tonumber(ARGV[4])
local touched = {}
local function window(dw, status)
  return tonumber(redis.call('HGET', dw, status) or '0')
end
local function crem(z, docs, dw, status, member)
  local r = redis.call('ZREVRANK', z, member)
  if r then
    redis.call('ZREM', z, member)
    redis.call('HDEL', docs, member)
    local d = window(dw, status)
    if r < d then redis.call('HSET', dw, status, d - 1) end
  end
end
local function cput(z, docs, dw, status, score, member, stored)
  crem(z, docs, dw, status, member)
  redis.call('ZADD', z, score, member)
  local r = redis.call('ZREVRANK', z, member)
  local d = window(dw, status)
  if r < d or (r == d and d < W) then
    redis.call('HSET', docs, member, stored)
    d = d + 1
    if d > W then
      for _, out in ipairs(redis.call('ZREVRANGE', z, W, d - 1)) do redis.call('HDEL', docs, out) end
      d = W
    end
    redis.call('HSET', dw, status, d)
  end
end
local i = 6
while i <= #ARGV do
  local op, nk = ARGV[i], tonumber(ARGV[i + 1])
  local keys = {}
  for k = 1, nk do keys[k] = KEYS[tonumber(ARGV[i + 1 + k])] end
  local na = tonumber(ARGV[i + 2 + nk])
  local a = i + 3 + nk
  if op == 'CPUT' then
    cput(keys[1], keys[2], keys[3], ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3])
    touched[keys[1]] = {keys[3], ARGV[a]}
  elseif op == 'CREM' then
    crem(keys[1], keys[2], keys[3], ARGV[a], ARGV[a + 1])
    touched[keys[1]] = {keys[3], ARGV[a]}
  else
    redis.call(op, keys[1], unpack(ARGV, a, a + na - 1))
  end
  i = a + na
end
local needy = {}
if ARGV[5] ~= '' and next(touched) ~= nil then redis.call('INCR', KEYS[tonumber(ARGV[5])]) end
for z, t in pairs(touched) do
  local size = redis.call('ZCARD', z)
  if size == 0 then
    redis.call('HDEL', t[1], t[2])
  elseif window(t[1], t[2]) < math.min(F, size) then
    table.insert(needy, t[2])
  end
end
return needy
"#
);

/// Fills a status's document window from rank `d`. KEYS: fence, ZSET,
/// documents, windows, the tenant's version. ARGV: guard mode and value, window size, status,
/// the `d` the caller read, then member, stored pairs in rank order. Stops
/// at the first member no longer at the next rank. Returns the new window,
/// or -1 if it moved since the caller read it.
const FILL: &str = concat!(
    guard!(),
    r#"
local W = tonumber(ARGV[3])
local d = tonumber(redis.call('HGET', KEYS[4], ARGV[4]) or '0')
if d ~= tonumber(ARGV[5]) then return -1 end
local i = 6
while i < #ARGV and d < W do
  local at = redis.call('ZREVRANGE', KEYS[2], d, d)
  if at[1] ~= ARGV[i] then break end
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  d = d + 1
  i = i + 2
end
redis.call('HSET', KEYS[4], ARGV[4], d)
redis.call('INCR', KEYS[5])
return d
"#
);

impl Script {
    fn new(guard_key: String) -> Self {
        Self { keys: vec![guard_key], argv: Vec::new(), version: None }
    }

    /// A tenant script: bumps `version_key` when it changes calls.
    fn for_tenant(guard_key: String, version_key: String) -> Self {
        Self { keys: vec![guard_key, version_key], argv: Vec::new(), version: Some(2) }
    }

    fn key_index(&mut self, key: String) -> usize {
        match self.keys.iter().position(|k| *k == key) {
            Some(i) => i + 1,
            None => {
                self.keys.push(key);
                self.keys.len()
            }
        }
    }

    fn op(&mut self, op: &str, keys: Vec<String>, args: Vec<Vec<u8>>) {
        self.argv.push(op.as_bytes().to_vec());
        self.argv.push(keys.len().to_string().into_bytes());
        for k in keys {
            let i = self.key_index(k);
            self.argv.push(i.to_string().into_bytes());
        }
        self.argv.push(args.len().to_string().into_bytes());
        self.argv.extend(args);
    }

    fn cmd(&mut self, op: &str, key: String, args: &[String]) {
        self.op(op, vec![key], args.iter().map(|a| a.clone().into_bytes()).collect());
    }

    async fn run(
        self,
        c: &mut deadpool_redis::Connection,
        mode: &str,
        check: &str,
        window: DocWindow,
    ) -> Result<Vec<StatusKey>, ReadModelError> {
        // Hashed once: this runs several times per projector batch.
        static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
        let mut invocation = SCRIPT.get_or_init(|| redis::Script::new(APPLY)).prepare_invoke();
        for k in &self.keys {
            invocation.key(k);
        }
        invocation
            .arg(mode)
            .arg(check)
            .arg(window.size)
            .arg(window.floor)
            .arg(self.version.map(|v| v.to_string()).unwrap_or_default());
        for a in &self.argv {
            invocation.arg(a.as_slice());
        }
        let short: Vec<i64> = invocation.invoke_async(c).await.map_err(fenced)?;
        Ok(short.into_iter().map(StatusKey::new).collect())
    }
}

fn fenced(e: redis::RedisError) -> ReadModelError {
    if e.to_string().contains("FENCED") {
        ReadModelError::Fenced
    } else {
        e.into()
    }
}

/// The projector's access to Redis.
#[derive(Clone)]
pub struct Writer {
    pool: Pool,
    keys: Keys,
    guard: Guard,
    window: DocWindow,
}

impl Writer {
    pub fn new(pool: Pool, keys: Keys) -> Self {
        Self { pool, keys, guard: Guard::None, window: DocWindow::default() }
    }

    /// The same writer with another document window.
    pub fn with_window(mut self, window: DocWindow) -> Self {
        self.window = window;
        self
    }

    /// A writer whose every write checks `guard`.
    pub fn guarded(pool: Pool, keys: Keys, guard: Guard) -> Self {
        Self { pool, keys, guard, window: DocWindow::default() }
    }

    /// The guard of a script on one tenant's keys: its fence.
    fn fence_check(&self) -> (&'static str, String) {
        match &self.guard {
            Guard::None => ("none", String::new()),
            Guard::Leader { token, .. } => ("fence", token.to_string()),
        }
    }

    fn tenant_script(&self, t: TenantId) -> (Script, &'static str, String) {
        let (mode, check) = self.fence_check();
        (Script::for_tenant(self.keys.fence(t), self.keys.version(t)), mode, check)
    }

    fn global_script(&self) -> (Script, &'static str, String) {
        match &self.guard {
            Guard::None => (Script::new(self.keys.lease()), "none", String::new()),
            Guard::Leader { owner, .. } => (Script::new(self.keys.lease()), "lease", owner.clone()),
        }
    }

    /// A locator's hash and field.
    fn locator(&self, which: Locator, doc: &DocKey) -> (String, Vec<u8>) {
        match which {
            Locator::Call => (self.keys.call_loc(doc), doc.to_bytes()),
            Locator::User => (self.keys.user_loc(), doc.as_str().as_bytes().to_vec()),
            Locator::Status => (self.keys.status_loc(), doc.as_str().as_bytes().to_vec()),
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
        for chunk in calls.chunks(1000) {
            let mut pipe = redis::pipe();
            for doc in chunk {
                pipe.hget(self.keys.call_loc(doc), doc.to_bytes());
            }
            let found: Vec<Option<String>> = pipe.query_async(&mut c).await?;
            for (doc, places) in chunk.iter().zip(found) {
                let Some(places) = places else { continue };
                let set = Place::decode_all(&places).ok_or_else(|| ReadModelError::Corrupt {
                    key: self.keys.call_loc(doc),
                    detail: format!("{doc}: {places}"),
                })?;
                if !set.is_empty() {
                    view.call_loc.insert(doc.clone(), set);
                }
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

    /// Applies a plan: intents, then each tenant, then the shared keys,
    /// each one guarded atomic script. Returns the (tenant, status) pairs
    /// whose document window needs a refill.
    pub async fn apply(&self, plan: &Plan) -> Result<Vec<(TenantId, StatusKey)>, ReadModelError> {
        let mut c = self.conn().await?;
        self.run_global(&mut c, &plan.intents).await?;
        let mut needy = Vec::new();
        for (tenant, ops) in &plan.tenants {
            let (mut script, mode, check) = self.tenant_script(*tenant);
            for op in ops {
                self.tenant_op(&mut script, *tenant, op);
            }
            let short = script.run(&mut c, mode, &check, self.window).await?;
            needy.extend(short.into_iter().map(|s| (*tenant, s)));
        }
        self.run_global(&mut c, &plan.global).await?;
        Ok(needy)
    }

    async fn run_global(&self, c: &mut deadpool_redis::Connection, ops: &[GlobalOp]) -> Result<(), ReadModelError> {
        if ops.is_empty() {
            return Ok(());
        }
        let (mut script, mode, check) = self.global_script();
        for op in ops {
            self.global_op(&mut script, op);
        }
        script.run(c, mode, &check, self.window).await.map(drop)
    }

    fn tenant_op(&self, script: &mut Script, t: TenantId, op: &TenantOp) {
        let k = &self.keys;
        let call_keys = |status| vec![k.zset(t, status), k.docs(t), k.windows(t)];
        match op {
            TenantOp::Put(e) => script.op(
                "CPUT",
                call_keys(e.place.status),
                vec![
                    e.place.status.get().to_string().into_bytes(),
                    e.score().to_string().into_bytes(),
                    e.member(),
                    e.stored.clone().into_bytes(),
                ],
            ),
            TenantOp::Remove { doc, place } => script.op(
                "CREM",
                call_keys(place.status),
                vec![place.status.get().to_string().into_bytes(), crate::codec::member(place.id, doc)],
            ),
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
                let (key, field) = self.locator(*which, d);
                script.op("HSET", vec![key], vec![field, places.clone().into_bytes()]);
            }
            GlobalOp::DelLoc(which, d) => {
                let (key, field) = self.locator(*which, d);
                script.op("HDEL", vec![key], vec![field]);
            }
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
    pub async fn put_snapshot(
        &self,
        tenant: TenantId,
        entries: &[CallEntry],
    ) -> Result<Vec<(TenantId, StatusKey)>, ReadModelError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        // A scan can return a document twice (it moved within the index
        // being scanned): the last one read wins, as an event would.
        let mut last: HashMap<&DocKey, &CallEntry> = HashMap::with_capacity(entries.len());
        for e in entries {
            last.insert(&e.doc, e);
        }
        let entries: Vec<&CallEntry> =
            entries.iter().filter(|e| last.get(&e.doc).is_some_and(|l| std::ptr::eq(*l, *e))).collect();
        let docs: Vec<DocKey> = entries.iter().map(|e| e.doc.clone()).collect();
        let view = self.load_locators(&docs, &[], &[]).await?;
        let mut c = self.conn().await?;
        let (mut script, mode, check) = self.tenant_script(tenant);
        let (mut locators, mut narrowed) = (Vec::with_capacity(entries.len()), Vec::new());
        for e in entries {
            let mut places = view.call_loc.get(&e.doc).cloned().unwrap_or_default();
            let stale: Vec<Place> = places.iter().filter(|p| p.tenant == tenant && **p != e.place).copied().collect();
            for old in &stale {
                self.tenant_op(&mut script, tenant, &TenantOp::Remove { doc: e.doc.clone(), place: *old });
            }
            self.tenant_op(&mut script, tenant, &TenantOp::Put((*e).clone()));
            places.insert(e.place);
            locators.push(GlobalOp::call_loc(e.doc.clone(), &places));
            if !stale.is_empty() {
                places.retain(|p| !stale.contains(p));
                narrowed.push(GlobalOp::call_loc(e.doc.clone(), &places));
            }
        }
        // Locators first: a crash after them leaves a place named but empty,
        // which is harmless; the other order could hide a placed call. The
        // places this tenant's script emptied are dropped after it ran.
        self.run_global(&mut c, &locators).await?;
        let short = script.run(&mut c, mode, &check, self.window).await?;
        self.run_global(&mut c, &narrowed).await?;
        Ok(short.into_iter().map(|s| (tenant, s)).collect())
    }

    /// Removes every call of `tenant` (and their locators). Its statuses
    /// stay: the projector keeps statuses for every tenant.
    pub async fn purge_tenant_calls(&self, tenant: TenantId) -> Result<u64, ReadModelError> {
        let mut c = self.conn().await?;
        let zsets: Vec<String> = scan(&mut c, &self.keys.tenant_call_pattern(tenant)[0]).await?;
        let mut removed = 0;
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
                    let view = self.load_locators(&docs, &[], &[]).await?;
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
                    self.run_global(&mut c, &ops).await?;
                }
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        let mut keys = zsets;
        keys.extend(self.keys.tenant_call_pattern(tenant).into_iter().skip(1));
        for chunk in keys.chunks(500) {
            let _: () = redis::cmd("DEL").arg(chunk).query_async(&mut c).await?;
        }
        // A read between its two round trips must see that calls changed.
        let _: () = c.incr(self.keys.version(tenant), 1).await?;
        Ok(removed)
    }

    /// A status's document window and the members that would extend it
    /// (ranks `d` up to the window's size).
    pub async fn window_gap(&self, tenant: TenantId, status: StatusKey) -> Result<(u64, Vec<Vec<u8>>), ReadModelError> {
        let mut c = self.conn().await?;
        let d: Option<u64> = c.hget(self.keys.windows(tenant), status.get()).await?;
        let d = d.unwrap_or(0);
        if d >= self.window.size {
            return Ok((d, Vec::new()));
        }
        let members: Vec<Vec<u8>> =
            c.zrevrange(self.keys.zset(tenant, status), d as isize, self.window.size as isize - 1).await?;
        Ok((d, members))
    }

    /// Extends a status's window from `d` with `docs` (member, stored) in
    /// rank order. Returns the new window, or `None` if the window moved
    /// since [`Writer::window_gap`] read it.
    pub async fn fill_window(
        &self,
        tenant: TenantId,
        status: StatusKey,
        d: u64,
        docs: &[(Vec<u8>, String)],
    ) -> Result<Option<u64>, ReadModelError> {
        static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
        let (mode, check) = self.fence_check();
        let mut invocation = SCRIPT.get_or_init(|| redis::Script::new(FILL)).prepare_invoke();
        invocation
            .key(self.keys.fence(tenant))
            .key(self.keys.zset(tenant, status))
            .key(self.keys.docs(tenant))
            .key(self.keys.windows(tenant))
            .key(self.keys.version(tenant))
            .arg(mode)
            .arg(check)
            .arg(self.window.size)
            .arg(status.get())
            .arg(d);
        for (member, stored) in docs {
            invocation.arg(member.as_slice()).arg(stored);
        }
        let mut c = self.conn().await?;
        let now: i64 = invocation.invoke_async(&mut c).await.map_err(fenced)?;
        Ok(u64::try_from(now).ok())
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

    /// The read model's format, as the projector that built it recorded.
    pub async fn schema(&self) -> Result<Option<String>, ReadModelError> {
        let mut c = self.conn().await?;
        Ok(c.get(self.keys.schema()).await?)
    }

    /// Records that the read model is in this version's format.
    pub async fn set_schema(&self) -> Result<(), ReadModelError> {
        let mut c = self.conn().await?;
        let _: () = c.set(self.keys.schema(), crate::keys::SCHEMA).await?;
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

fn split(places: &Option<String>) -> impl Iterator<Item = &str> {
    places.as_deref().unwrap_or("").split(',').filter(|p| !p.is_empty())
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
