//! The write side: the state the projector reads before planning a batch
//! ([`StateView`]), the operations it plans ([`ops`]), and their
//! application through [`Writer`].
//!
//! A plan is applied in three steps, each made of atomic Lua scripts that
//! each touch one slot: the *intents* (every locator widened to the old and
//! the new places), one script per tenant (all of a tenant's keys share a
//! slot), then the shared keys (final locators, users, global statuses). On
//! a single node the shared keys of a step are one script; on a cluster,
//! one script per hash tag (the `{g}` keys, and each locator shard),
//! run at once. A crash between scripts leaves each document's locator
//! naming every place it may be in, so the replay finds and cleans them
//! all, whatever the documents look like by then.
//!
//! Every script is guarded ([`Guard`]): scripts on a tenant or a locator
//! shard check and raise that slot's fence token; scripts on the `{g}`
//! keys check the lease. A projector that lost its lease cannot write over
//! a newer leader's work.
//!
//! Every operation sets a value rather than adjusting one (no count is
//! ever incremented; the window lengths move only with the ZSET changes
//! they describe, and the tenant's write version only tells readers that
//! something changed), so applying a plan twice leaves the same state.
//!
//! Modules: [`ops`] (the plan), `script` (the Lua scripts and their typed
//! builder), `snapshot` (warms), `purge` (tenant and full purges), `window`
//! (document-window refills).

pub mod ops;
mod purge;
pub(crate) mod script;
mod snapshot;
mod window;

use std::collections::{BTreeMap, BTreeSet};

use callboard_domain::{DocKey, StatusKey, TenantId, UserId};
use futures::future::try_join_all;
use redis::AsyncCommands;

pub use ops::{status_place, GlobalOp, Locator, Plan, Scope, StateView, StatusPlace, TenantOp};

use crate::codec::Place;
use crate::conn::{Conn, Redis};
use crate::keys::{tag_of, GLOBAL_TAG};
use crate::state::job;
use crate::{Keys, ReadModelError, TenantState};
use script::{fenced, script, Batch, Check, Op, MARK_WARM};

/// Who may write: checked inside every write script.
#[derive(Debug, Clone)]
pub enum Guard {
    /// Tests and tools: no check.
    None,
    /// The projector: scripts on a tenant or a locator shard require the
    /// slot's fence to be at most `token` (and raise it); scripts on the
    /// shared `{g}` keys require `owner` to hold the lease.
    Leader { token: u64, owner: String },
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

/// The projector's access to Redis.
#[derive(Clone)]
pub struct Writer {
    redis: Redis,
    /// With the partition's own keys ([`Keys::in_partition`]).
    keys: Keys,
    guard: Guard,
    window: DocWindow,
    scope: Scope,
}

impl Writer {
    pub fn new(redis: Redis, keys: Keys) -> Self {
        Self::guarded(redis, keys, Guard::None)
    }

    /// A writer whose every write checks `guard`.
    pub fn guarded(redis: Redis, keys: Keys, guard: Guard) -> Self {
        Self { redis, keys, guard, window: DocWindow::default(), scope: Scope::default() }
    }

    /// The same writer for one partition of `partitioning`: its keys, and
    /// plans limited to its scope.
    pub fn for_partition(mut self, partition: u32, partitioning: crate::keys::Partitioning) -> Self {
        self.keys = self.keys.in_partition(partition);
        self.scope = Scope { partition, partitioning };
        self
    }

    pub fn scope(&self) -> Scope {
        self.scope
    }

    /// The same writer with another document window.
    pub fn with_window(mut self, window: DocWindow) -> Self {
        self.window = window;
        self
    }

    pub async fn conn(&self) -> Result<Conn, ReadModelError> {
        self.redis.get().await
    }

    /// The check of a script on the slot with hash tag `tag`.
    fn check(&self, tag: &str) -> Check {
        match &self.guard {
            Guard::None => Check { key: self.keys.fence_of_tag(tag), mode: "none", value: String::new() },
            Guard::Leader { owner, .. } if tag == GLOBAL_TAG => {
                Check { key: self.keys.lease(), mode: "lease", value: owner.clone() }
            }
            Guard::Leader { token, .. } => {
                Check { key: self.keys.fence_of_tag(tag), mode: "fence", value: token.to_string() }
            }
        }
    }

    fn tenant_batch(&self, t: TenantId) -> Batch {
        Batch::tenant(
            self.check(&self.keys.tenant_tag(t)),
            self.keys.version(t),
            self.keys.docs(t),
            self.keys.windows(t),
        )
    }

    /// Runs shared-key operations: one batch on a single node (checked as
    /// the `{g}` keys are), else one per hash tag, all at once.
    async fn run_shared(&self, ops: Vec<Op>) -> Result<(), ReadModelError> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut batches: BTreeMap<String, Batch> = BTreeMap::new();
        for op in ops {
            // Keys without a tag (of no format of ours) go alone.
            let tag = if self.redis.is_cluster() { tag_of(op.key()).unwrap_or(op.key()) } else { GLOBAL_TAG };
            let tag = tag.to_string();
            batches.entry(tag.clone()).or_insert_with(|| Batch::shared(self.check(&tag))).push(op);
        }
        try_join_all(batches.into_values().map(|b| async move {
            let mut c = self.conn().await?;
            b.run(&mut c, self.window).await
        }))
        .await?;
        Ok(())
    }

    async fn run_global(&self, ops: &[GlobalOp]) -> Result<(), ReadModelError> {
        self.run_shared(ops.iter().flat_map(|op| self.global_ops(op)).collect()).await
    }

    /// Locators of the given documents, and the states of `tenants`.
    pub async fn load_locators(
        &self,
        calls: &[DocKey],
        users: &[DocKey],
        statuses: &[DocKey],
        tenants: &[TenantId],
    ) -> Result<StateView, ReadModelError> {
        let mut cmds = Vec::with_capacity(calls.len() + users.len() + statuses.len() + tenants.len());
        for doc in calls {
            let key = self.keys.call_loc(doc);
            cmds.push((key.clone(), redis::cmd("HGET").arg(key).arg(doc.to_bytes()).clone()));
        }
        for (doc, key) in
            users.iter().map(|d| (d, self.keys.user_loc())).chain(statuses.iter().map(|d| (d, self.keys.status_loc())))
        {
            cmds.push((key.clone(), redis::cmd("HGET").arg(key).arg(doc.as_str()).clone()));
        }
        let tenants: Vec<TenantId> = tenants.iter().copied().filter(|t| self.scope.owns_tenant(*t)).collect();
        for t in &tenants {
            let key = self.keys.state(*t);
            cmds.push((key.clone(), redis::cmd("GET").arg(key).clone()));
        }
        let mut replies = self.redis.query_by_tag(cmds).await?.into_iter();
        let mut next = || -> Result<Option<String>, ReadModelError> {
            Ok(redis::from_redis_value(replies.next().unwrap_or(redis::Value::Nil))?)
        };
        let mut view = StateView { scope: self.scope, ..StateView::default() };
        for doc in calls {
            let Some(places) = next()? else { continue };
            let set = Place::decode_all(&places).ok_or_else(|| ReadModelError::Corrupt {
                key: self.keys.call_loc(doc),
                detail: format!("{doc}: {places}"),
            })?;
            if !set.is_empty() {
                view.call_loc.insert(doc.clone(), set);
            }
        }
        for doc in users {
            let set: BTreeSet<UserId> = split(&next()?).filter_map(|p| p.parse().ok().map(UserId::new)).collect();
            if !set.is_empty() {
                view.user_loc.insert(doc.clone(), set);
            }
        }
        for doc in statuses {
            let set: BTreeSet<StatusPlace> = split(&next()?).map(str::to_string).collect();
            if !set.is_empty() {
                view.status_loc.insert(doc.clone(), set);
            }
        }
        for t in tenants {
            view.tenants.insert(t, TenantState::parse(next()?.as_deref()));
        }
        Ok(view)
    }

    /// Applies a plan: intents, then each tenant, then the shared keys,
    /// each step guarded atomic scripts. Returns the (tenant, status)
    /// pairs whose document window needs a refill.
    pub async fn apply(&self, plan: &Plan) -> Result<Vec<(TenantId, StatusKey)>, ReadModelError> {
        self.run_global(&plan.intents).await?;
        let mut needy = Vec::new();
        let mut c = self.conn().await?;
        for (tenant, ops) in &plan.tenants {
            let mut batch = self.tenant_batch(*tenant);
            self.tenant_ops(&mut batch, *tenant, ops);
            let short = batch.run(&mut c, self.window).await.map_err(|e| rejected(*tenant, e))?;
            needy.extend(short.into_iter().map(|s| (*tenant, s)));
        }
        drop(c);
        self.run_global(&plan.global).await?;
        Ok(needy)
    }

    /// Takes `tenant` out of the projection after a poison event: its
    /// state becomes quarantined (fenced, in its slot: it is answered live
    /// and not warmed on its own), `event` is kept in `P:{g}:poison`, and
    /// its calls are removed.
    pub async fn quarantine(&self, tenant: TenantId, event: &crate::PoisonEvent) -> Result<(), ReadModelError> {
        let mut batch = self.tenant_batch(tenant);
        batch.push(Op::Set {
            key: self.keys.state(tenant),
            value: crate::TenantState::encode_quarantined().into_bytes(),
        });
        let mut c = self.conn().await?;
        batch.run(&mut c, self.window).await?;
        drop(c);
        let record = serde_json::to_vec(event)
            .map_err(|e| ReadModelError::Corrupt { key: self.keys.poison(), detail: e.to_string() })?;
        self.run_shared(vec![Op::HSet {
            key: self.keys.poison(),
            field: tenant.get().to_string().into_bytes(),
            value: record,
        }])
        .await?;
        self.purge_tenant_calls(tenant).await?;
        Ok(())
    }

    /// Forgets `tenant`'s poison event (it is warm again).
    pub async fn clear_poison(&self, tenant: TenantId) -> Result<(), ReadModelError> {
        self.run_shared(vec![Op::HDel { key: self.keys.poison(), field: tenant.get().to_string().into_bytes() }]).await
    }

    /// Adds a tenant's operations in the order its script runs them:
    /// removals by status, then puts by status (`apply.lua` runs a status's
    /// removals in a row as one `ZREM`, its puts as one `ZADD`), then the
    /// rest. They commute: a plan names each
    /// call once, a call's removals are of places other than its put's,
    /// and statuses and the tenant's meta are keys of their own. Only the
    /// document windows' lengths can end up otherwise, and either way each
    /// window holds exactly the documents of its first ranks.
    fn tenant_ops<'a>(&self, batch: &mut Batch, t: TenantId, ops: impl IntoIterator<Item = &'a TenantOp>) {
        let mut ops: Vec<&TenantOp> = ops.into_iter().collect();
        ops.sort_by_key(|op| match op {
            TenantOp::Remove { place, .. } => (0, place.status.get()),
            TenantOp::Put(e) => (1, e.place.status.get()),
            _ => (2, 0),
        });
        for op in ops {
            self.tenant_op(batch, t, op);
        }
    }

    fn tenant_op(&self, batch: &mut Batch, t: TenantId, op: &TenantOp) {
        let k = &self.keys;
        match op {
            TenantOp::Put(e) => batch.push(Op::CPut {
                zset: k.zset(t, e.place.status),
                status: e.place.status,
                score: e.score(),
                member: e.member(),
                stored: e.stored.clone().into_bytes(),
            }),
            TenantOp::Remove { doc, place } => batch.push(Op::CRem {
                zset: k.zset(t, place.status),
                status: place.status,
                member: crate::codec::member(place.id, doc),
            }),
            TenantOp::PutStatus { doc, json } => {
                batch.push(Op::HSet {
                    key: k.statuses(t),
                    field: doc.to_string().into_bytes(),
                    value: json.clone().into_bytes(),
                });
                batch.push(Op::Set { key: k.status_stamp(t), value: stamp().into_bytes() });
            }
            TenantOp::DelStatus { doc } => {
                batch.push(Op::HDel { key: k.statuses(t), field: doc.to_string().into_bytes() });
                batch.push(Op::Set { key: k.status_stamp(t), value: stamp().into_bytes() });
            }
            TenantOp::Touch { last_event_ms } => batch.push(Op::HSet {
                key: k.meta(t),
                field: crate::state::progress::LAST_EVENT_MS.as_bytes().to_vec(),
                value: last_event_ms.to_string().into_bytes(),
            }),
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

    fn global_ops(&self, op: &GlobalOp) -> Vec<Op> {
        let k = &self.keys;
        let stamped = |key: String, field: String, value: Option<&String>, stamp_key: String| {
            let field = field.into_bytes();
            let change = match value {
                Some(v) => Op::HSet { key, field, value: v.clone().into_bytes() },
                None => Op::HDel { key, field },
            };
            vec![change, Op::Set { key: stamp_key, value: stamp().into_bytes() }]
        };
        match op {
            GlobalOp::PutLoc(which, d, places) => {
                let (key, field) = self.locator(*which, d);
                vec![Op::HSet { key, field, value: places.clone().into_bytes() }]
            }
            GlobalOp::DelLoc(which, d) => {
                let (key, field) = self.locator(*which, d);
                vec![Op::HDel { key, field }]
            }
            GlobalOp::PutUser(u, json) => stamped(k.users(), u.get().to_string(), Some(json), k.users_stamp()),
            GlobalOp::DelUser(u) => stamped(k.users(), u.get().to_string(), None, k.users_stamp()),
            GlobalOp::PutGlobalStatus(d, json) => {
                stamped(k.global_statuses(), d.to_string(), Some(json), k.global_status_stamp())
            }
            GlobalOp::DelGlobalStatus(d) => stamped(k.global_statuses(), d.to_string(), None, k.global_status_stamp()),
        }
    }

    /// The read model's format, as the projector that built it recorded.
    pub async fn schema(&self) -> Result<Option<String>, ReadModelError> {
        let mut c = self.conn().await?;
        Ok(c.get(self.keys.schema()).await?)
    }

    /// Raises this leadership's fence on every locator shard. On a cluster
    /// the shared writes of a batch are per shard, fenced there rather than
    /// by the lease: a previous leader that froze between two of its
    /// scripts must find every shard closed to it before this leader reads
    /// any locator, or it could widen a locator this leader has already
    /// read and then write the tenant the widening named. On a single node
    /// the shared writes check the lease, which already does this.
    pub async fn claim_shards(&self) -> Result<(), ReadModelError> {
        if !self.redis.is_cluster() {
            return Ok(());
        }
        try_join_all((0..crate::keys::LOC_SHARDS).map(|k| async move {
            let batch = Batch::shared(self.check(&format!("l{k}")));
            batch.run(&mut self.conn().await?, self.window).await
        }))
        .await?;
        Ok(())
    }

    /// The hash tags of the durability markers: one per master (none on a
    /// single node, where the checkpoint and the data share one node).
    pub async fn marker_tags(&self) -> Result<Vec<String>, ReadModelError> {
        self.redis.tag_per_master("m").await
    }

    /// Moves the marker under each of `tags` from `previous` (the last
    /// checkpoint's sequence) to `seq` (guarded, one script per master, at
    /// once). Written after a batch's data and before its checkpoint: a
    /// master whose marker is older than the checkpoint has lost writes,
    /// since replication keeps a master's writes in order. Returns `false`
    /// when a marker was found below `previous` (left as it is).
    pub async fn mark(&self, tags: &[String], previous: u64, seq: u64) -> Result<bool, ReadModelError> {
        static CELL: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
        let marked = try_join_all(tags.iter().map(|tag| async move {
            let check = self.check(tag);
            let mut c = self.conn().await?;
            let done: i64 = script(&CELL, script::MARK)
                .key(&check.key)
                .key(self.keys.marker(tag))
                .arg(check.mode)
                .arg(&check.value)
                .arg(previous)
                .arg(seq)
                .invoke_async(&mut c)
                .await
                .map_err(fenced)?;
            Ok::<_, ReadModelError>(done == 1)
        }))
        .await?;
        Ok(marked.into_iter().all(|m| m))
    }

    /// The markers under `tags`, in order (`None`: never written there).
    pub async fn markers(&self, tags: &[String]) -> Result<Vec<Option<u64>>, ReadModelError> {
        let cmds = tags.iter().map(|t| (self.keys.marker(t), redis::cmd("GET").arg(self.keys.marker(t)).clone()));
        let replies = self.redis.query_by_tag(cmds.collect()).await?;
        replies.into_iter().map(|v| Ok(redis::from_redis_value::<Option<u64>>(v)?)).collect()
    }

    /// The format mark of this version and partition count:
    /// `<schema>/<partitions>`.
    pub fn schema_mark(&self) -> String {
        format!("{}/{}", crate::keys::SCHEMA, self.scope.partitioning.count())
    }

    /// Records that the partition's read model is in this version's format
    /// (guarded).
    /// The settings this partition's data was stored with, if recorded
    /// (a value that does not parse counts as none).
    pub async fn fingerprint(&self) -> Result<Option<crate::Fingerprint>, ReadModelError> {
        let mut c = self.conn().await?;
        let raw: Option<String> = c.get(self.keys.fingerprint()).await?;
        Ok(raw.and_then(|r| serde_json::from_str(&r).ok()))
    }

    /// Records `fingerprint` as the settings of this partition's data.
    pub async fn set_fingerprint(&self, fingerprint: &crate::Fingerprint) -> Result<(), ReadModelError> {
        let value = serde_json::to_vec(fingerprint)
            .map_err(|e| ReadModelError::Corrupt { key: self.keys.fingerprint(), detail: e.to_string() })?;
        self.run_shared(vec![Op::Set { key: self.keys.fingerprint(), value }]).await
    }

    pub async fn set_schema(&self) -> Result<(), ReadModelError> {
        self.run_shared(vec![Op::Set { key: self.keys.schema(), value: self.schema_mark().into_bytes() }]).await
    }

    /// Counts one tenant of a warm job as done (guarded).
    pub async fn job_done(&self, job_id: &str) -> Result<(), ReadModelError> {
        self.run_shared(vec![Op::HIncrBy { key: self.keys.job(job_id), field: job::DONE.as_bytes().to_vec(), by: 1 }])
            .await
    }

    /// Sets a warming tenant warm (guarded by the tenant's fence), unless
    /// its state changed meanwhile (invalidated, or a newer warm queued).
    pub async fn mark_warm(&self, tenant: TenantId, epoch: u64) -> Result<bool, ReadModelError> {
        static CELL: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
        let check = self.check(&self.keys.tenant_tag(tenant));
        let mut c = self.conn().await?;
        let done: i64 = script(&CELL, MARK_WARM)
            .key(&check.key)
            .key(self.keys.state(tenant))
            .arg(check.mode)
            .arg(&check.value)
            .arg(TenantState::warming_prefix(epoch))
            .arg(TenantState::encode_warm(epoch))
            .invoke_async(&mut c)
            .await
            .map_err(fenced)?;
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

/// A tenant write's error: [`ReadModelError::Rejected`] when retrying
/// would not change it ([`crate::is_rejection`]).
pub(crate) fn rejected(tenant: TenantId, e: ReadModelError) -> ReadModelError {
    match e {
        ReadModelError::Redis(source) if crate::is_rejection(&source) => ReadModelError::Rejected { tenant, source },
        other => other,
    }
}
