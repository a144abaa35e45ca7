use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use callboard_domain::render::{self, GroupCalls, UserFields};
use callboard_domain::{ClusterTime, GroupedBody, GroupedRequest, Status, StatusRecord, TenantId, UserId, Watermark};
use redis::AsyncCommands;

use crate::answers::{AnswerKey, Answers, Kept, Label, Lookup, LookupObserver, Mode, SharedLabel, TenantLabel};
use crate::codec::{member_call_id, split_stored, user_json_for};
use crate::conn::{transaction, Conn, Redis};
use crate::local::{LocalCopies, Stamps, TenantStatuses};
use crate::state::{as_of, is_job_id, job, progress, Command};
use crate::tracking::Tracking;
use crate::write::script::{script, REQUEST_WARM};
use crate::{Keys, ReadModelError, TenantState};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct JobStatus {
    pub job_id: String,
    pub state: &'static str,
    pub total: u64,
    pub done: u64,
    pub created_ms: i64,
}

/// What the projector last reported.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Progress {
    pub heartbeat_ms: Option<i64>,
    pub last_event_ms: Option<i64>,
    pub lag_ms: Option<i64>,
    pub events_applied: u64,
    pub owner: Option<String>,
}

/// What a tenant's board is made of, as one fingerprint: its state, its
/// write version and status stamp, the global statuses' and the users'
/// stamps. Any write that can change the board changes it (the converse
/// need not hold: a user renamed in another tenant changes it too). Stable
/// across processes, so a client may carry it from one to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BoardVersion(u64);

impl BoardVersion {
    /// Of a board whose version could not be read: no reconnect matches it.
    pub const UNKNOWN: BoardVersion = BoardVersion(0);

    fn of<'a>(parts: impl Iterator<Item = &'a Option<Vec<u8>>>) -> Self {
        let mut bytes = Vec::new();
        for part in parts {
            match part {
                // Length-prefixed, so that no two lists of parts share bytes.
                Some(v) => {
                    bytes.extend_from_slice(&(v.len() as u64).to_le_bytes());
                    bytes.extend_from_slice(v);
                }
                None => bytes.extend_from_slice(&u64::MAX.to_le_bytes()),
            }
        }
        Self(crate::keys::fnv1a(&bytes))
    }
}

impl std::fmt::Display for BoardVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl std::str::FromStr for BoardVersion {
    type Err = std::num::ParseIntError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u64::from_str_radix(s, 16).map(Self)
    }
}

/// Reads served by Redis alone.
#[derive(Clone)]
pub struct ReadModel {
    redis: Redis,
    keys: Keys,
    local: LocalCopies,
    hot: Option<HotConnections>,
    user_fields: UserFields,
    /// Rendered answers kept for reuse (`query.response_cache_mb`).
    answers: Option<Answers>,
    /// Reuse with no round trip (`query.response_cache_track_ms`).
    tracking: Option<Tracking>,
}

/// The grouped read's connections: one multiplexed, self-reconnecting
/// connection per thread (so per actix worker), shared by every request
/// the thread serves. A pooled connection is checked with an `UNWATCH` +
/// `PING` round trip each time it is taken (deadpool-redis's recycle),
/// which doubled the Redis round trips of a cache hit.
#[derive(Clone)]
struct HotConnections {
    client: redis::Client,
    /// Tells this read model's connections from another's on one thread.
    id: u64,
}

thread_local! {
    static HOT: std::cell::RefCell<HashMap<u64, redis::aio::ConnectionManager>> =
        std::cell::RefCell::new(HashMap::new());
}

impl HotConnections {
    async fn get(&self) -> Result<redis::aio::ConnectionManager, ReadModelError> {
        if let Some(c) = HOT.with(|m| m.borrow().get(&self.id).cloned()) {
            return Ok(c);
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(std::time::Duration::from_secs(1)))
            .set_response_timeout(Some(std::time::Duration::from_secs(1)))
            .set_number_of_retries(2);
        let c = redis::aio::ConnectionManager::new_with_config(self.client.clone(), config).await?;
        HOT.with(|m| m.borrow_mut().insert(self.id, c.clone()));
        Ok(c)
    }
}

impl ReadModel {
    pub fn new(redis: Redis, keys: Keys) -> Self {
        Self {
            redis,
            keys,
            local: LocalCopies::default(),
            hot: None,
            user_fields: UserFields::default(),
            answers: None,
            tracking: None,
        }
    }

    /// Keeps up to `max_bytes` of rendered answers in this process, each
    /// reused while the keys it was read from are unchanged (see
    /// [`crate::answers`]); `observe` counts every lookup.
    pub fn with_answer_cache(mut self, max_bytes: u64, observe: Option<LookupObserver>) -> Self {
        self.answers = (max_bytes > 0).then(|| Answers::new(max_bytes, observe));
        self
    }

    /// Reuses kept answers with no round trip while Redis's tracking
    /// (RESP3 `CLIENT TRACKING`, over a connection of its own to `client`)
    /// vouches for them, at most `bound` behind (see [`crate::tracking`]).
    /// Single node only, with an answer cache; a cluster, or no cache,
    /// leaves this off. Starts the connection on the current runtime.
    pub fn with_tracking(mut self, client: &redis::Client, bound: Duration) -> Result<Self, ReadModelError> {
        if self.answers.is_some() && !self.redis.is_cluster() && !bound.is_zero() {
            self.tracking = Some(Tracking::spawn(client, self.keys.clone(), bound)?);
        }
        Ok(self)
    }

    /// (bytes, entries) of rendered answers kept now; `None` without a
    /// cache.
    pub fn answer_cache_size(&self) -> Option<(u64, usize)> {
        self.answers.as_ref().map(Answers::size)
    }

    /// The user fields this process may show: a user read from Redis is
    /// cut down to them, whatever the projector stored.
    pub fn with_user_fields(mut self, fields: UserFields) -> Self {
        self.user_fields = fields;
        self
    }

    /// Serves grouped reads over per-thread multiplexed connections to
    /// `client` instead of the pool (single node only: the cluster
    /// connection is multiplexed already).
    pub fn with_hot_client(mut self, client: redis::Client) -> Self {
        static IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        self.hot = Some(HotConnections { client, id: IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) });
        self
    }

    async fn conn(&self) -> Result<Conn, ReadModelError> {
        self.redis.get().await
    }

    /// The same read model without this process's copies of statuses and
    /// users: every read takes them from Redis. For verification, which
    /// must see what Redis holds (a copy would hide a hash lost under an
    /// unchanged stamp).
    pub fn without_local_copies(&self) -> Self {
        Self { local: LocalCopies::default(), answers: None, tracking: None, ..self.clone() }
    }

    pub async fn ping(&self) -> Result<(), ReadModelError> {
        let mut c = self.conn().await?;
        let _: String = redis::cmd("PING").query_async(&mut c).await?;
        Ok(())
    }

    /// Every partition's watermark (`partitions` of them, in order; a
    /// partition that has published none has the zero watermark, which
    /// vouches for nothing). One pipeline to the `{g}` slot.
    pub async fn watermarks(&self, partitions: u32) -> Result<Vec<Watermark>, ReadModelError> {
        let mut pipe = redis::pipe();
        for p in 0..partitions {
            pipe.hmget(self.keys.in_partition(p).as_of(), &[as_of::AT_MS, as_of::THROUGH_S, as_of::THROUGH_I]);
        }
        let mut c = self.conn().await?;
        let rows: Vec<(Option<u64>, Option<u32>, Option<u32>)> = pipe.query_async(&mut c).await?;
        Ok(rows
            .into_iter()
            .map(|(at_ms, seconds, increment)| Watermark {
                at_ms: at_ms.unwrap_or(0),
                through: seconds.zip(increment).map(|(seconds, increment)| ClusterTime { seconds, increment }),
            })
            .collect())
    }

    /// Everything a tenant's answer is made of, as versions: the tenant's
    /// write version (`P:{tN}:ver`, bumped by every write to its calls),
    /// its statuses' stamp, the global statuses' and the users' stamps.
    /// The same versions twice: no write to the answer landed between.
    pub async fn answer_versions(&self, tenant: TenantId) -> Result<Vec<Option<String>>, ReadModelError> {
        let mut c = self.conn().await?;
        let mut versions = Vec::with_capacity(4);
        for key in self.tenant_version_keys(tenant).into_iter().chain(self.shared_version_keys()) {
            versions.push(c.get(key).await?);
        }
        Ok(versions)
    }

    /// The keys that version a tenant's own part of its answer: its write
    /// version and its statuses' stamp.
    fn tenant_version_keys(&self, tenant: TenantId) -> [String; 2] {
        [self.keys.version(tenant), self.keys.status_stamp(tenant)]
    }

    /// ...and the shared part: the global statuses' and the users' stamps.
    fn shared_version_keys(&self) -> [String; 2] {
        [self.keys.global_status_stamp(), self.keys.users_stamp()]
    }

    /// Each tenant's [`BoardVersion`], in order: one pipeline on a single
    /// node (one per tenant's slot on a cluster), however many tenants.
    pub async fn board_versions(&self, tenants: &[TenantId]) -> Result<Vec<BoardVersion>, ReadModelError> {
        let get = |key: String| (key.clone(), redis::cmd("GET").arg(key).clone());
        let shared = self.shared_version_keys();
        let mut cmds: Vec<_> = shared.iter().cloned().map(get).collect();
        for t in tenants {
            cmds.push(get(self.keys.state(*t)));
            cmds.extend(self.tenant_version_keys(*t).map(get));
        }
        let replies = self.redis.query_by_tag(cmds).await?;
        let values =
            replies.into_iter().map(redis::from_redis_value::<Option<Vec<u8>>>).collect::<Result<Vec<_>, _>>()?;
        let (global, per_tenant) = values.split_at(shared.len());
        Ok(per_tenant.chunks(3).map(|own| BoardVersion::of(global.iter().chain(own))).collect())
    }

    pub async fn tenant_state(&self, tenant: TenantId) -> Result<TenantState, ReadModelError> {
        let mut c = self.conn().await?;
        let raw: Option<String> = c.get(self.keys.state(tenant)).await?;
        Ok(TenantState::parse(raw.as_deref()))
    }

    /// Every tenant that is warm or warming, with its state as stored.
    async fn raw_states(&self) -> Result<Vec<(TenantId, String)>, ReadModelError> {
        let mut c = self.conn().await?;
        let listed: Vec<i64> = c.smembers(self.keys.tenants()).await?;
        let tenants: Vec<TenantId> = listed.into_iter().filter_map(|t| TenantId::new(t).ok()).collect();
        let cmds = tenants.iter().map(|t| (self.keys.state(*t), redis::cmd("GET").arg(self.keys.state(*t)).clone()));
        let replies = self.redis.query_by_tag(cmds.collect()).await?;
        let mut out = Vec::new();
        for (t, reply) in tenants.into_iter().zip(replies) {
            if let Some(raw) = redis::from_redis_value::<Option<String>>(reply)? {
                out.push((t, raw));
            }
        }
        Ok(out)
    }

    /// Every tenant that is not cold.
    pub async fn tenant_states(&self) -> Result<BTreeMap<TenantId, TenantState>, ReadModelError> {
        Ok(self
            .raw_states()
            .await?
            .into_iter()
            .map(|(t, raw)| (t, TenantState::parse(Some(&raw))))
            .filter(|(_, s)| *s != TenantState::Cold)
            .collect())
    }

    /// Tenants whose warm is queued or under way: (tenant, epoch, job).
    pub async fn warming(&self) -> Result<Vec<(TenantId, u64, Option<String>)>, ReadModelError> {
        Ok(self
            .raw_states()
            .await?
            .into_iter()
            .filter_map(|(t, raw)| match TenantState::parse(Some(&raw)) {
                TenantState::Warming(e) => Some((t, e, TenantState::job_of(&raw))),
                _ => None,
            })
            .collect())
    }

    /// The (tenant, epoch) of every `warm` command still waiting in the
    /// queue: one read of the queue, however many tenants are asked about.
    pub async fn queued_warms(&self) -> Result<std::collections::HashSet<(TenantId, u64)>, ReadModelError> {
        let mut c = self.conn().await?;
        let queued: Vec<String> = c.lrange(self.keys.commands(), 0, -1).await?;
        Ok(queued
            .iter()
            .filter_map(|q| Command::parse(q))
            .filter_map(|q| match q {
                Command::Warm { tenant, epoch, .. } => Some((tenant, epoch)),
                _ => None,
            })
            .collect())
    }

    /// The grouped response from Redis alone, or why it cannot be given.
    ///
    /// One MULTI on the tenant's slot with the tenant's state (and format
    /// mark), its status stamp, and each visible status's size and first
    /// members, the statuses named from this process's copy of them; for
    /// enriched calls also the document windows and the tenant's write
    /// version. The global status and user stamps are read in the same
    /// MULTI on a single node, and at the same time from the `{g}` slot on
    /// a cluster. For enriched calls a second trip reads the documents and
    /// checks the tenant's write version. The answer is used only if the
    /// stamps still match the copy and the version did not move; otherwise
    /// the read is repeated. Users come from this process's copy when its
    /// stamp matches, else from one `HMGET`.
    ///
    /// With an answer cache ([`Self::with_answer_cache`]), an answer kept
    /// for the same tenant and parameters is reused if its [`Label`] is
    /// current: one `MGET` (one per slot, at once, on a cluster) instead,
    /// shared by the requests for the tenant that arrived before it
    /// started ([`Self::current_label`]).
    pub async fn grouped(&self, tenant: TenantId, request: &GroupedRequest) -> Result<Read, ReadModelError> {
        self.grouped_not_before(tenant, request, None).await
    }

    /// [`Self::grouped`], where an answer that reflects Redis at a moment
    /// no older than `not_before` will do: with tracking
    /// ([`Self::with_tracking`]), a kept answer it vouches for since then
    /// is reused with no round trip. `None`: a moment after this call
    /// began, as [`Self::grouped`].
    pub async fn grouped_not_before(
        &self,
        tenant: TenantId,
        request: &GroupedRequest,
        not_before: Option<Instant>,
    ) -> Result<Read, ReadModelError> {
        let Some(answers) = &self.answers else {
            return Ok(self.read_grouped(tenant, request).await?.0);
        };
        let key = AnswerKey::of(tenant, request);
        let kept = answers.get(&key);
        if let Some(kept) = &kept {
            if let (Some(tracking), Some(since)) = (&self.tracking, not_before) {
                if tracking.vouches(tenant, &kept.label, since) {
                    answers.observe(Lookup::Tracked);
                    return Ok(Read::Hit(kept.body.clone()));
                }
            }
            if self.current_label(answers, tenant).await? == kept.label {
                answers.observe(Lookup::Hit);
                return Ok(Read::Hit(kept.body.clone()));
            }
        }
        answers.observe(if kept.is_some() { Lookup::Stale } else { Lookup::Absent });
        let (read, label) = self.read_grouped(tenant, request).await?;
        if let (Read::Hit(body), Some(label)) = (&read, label) {
            answers.keep(key, Kept { label, body: body.clone() });
        }
        Ok(read)
    }

    /// Reads and renders the answer (see [`Self::grouped`]), with the label
    /// it was read at when it is a hit.
    async fn read_grouped(
        &self,
        tenant: TenantId,
        request: &GroupedRequest,
    ) -> Result<(Read, Option<Label>), ReadModelError> {
        match &self.hot {
            Some(hot) if !self.redis.is_cluster() => {
                self.grouped_on(&mut hot.get().await?, None, tenant, request).await
            }
            _ => {
                let side = if self.redis.is_cluster() { Some(self.conn().await?) } else { None };
                self.grouped_on(&mut self.conn().await?, side, tenant, request).await
            }
        }
    }

    /// The tenant's current [`Label`], from a read that started after this
    /// call began. Concurrent calls for one tenant share reads: while one
    /// is under way, later callers wait for the next, which starts when it
    /// ends and serves all of them (a group commit; see
    /// [`crate::answers::LabelReads`]).
    async fn current_label(&self, answers: &Answers, tenant: TenantId) -> Result<Label, ReadModelError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if answers.reads.join(tenant, tx) {
            // Its own task, so that a client going away does not strand the
            // requests waiting on this read.
            let model = self.clone();
            tokio::spawn(async move { model.label_rounds(tenant).await });
        }
        match rx.await {
            Ok(Ok(label)) => Ok(label),
            Ok(Err(e)) => Err(ReadModelError::Shared(e)),
            Err(_) => Err(ReadModelError::Shared("the label read ended without an answer".into())),
        }
    }

    /// Reads the label for each batch of waiting callers until none waits.
    async fn label_rounds(self, tenant: TenantId) {
        let Some(answers) = self.answers.clone() else { return };
        let mut rounds = answers.reads.rounds(tenant);
        while let Some(batch) = rounds.next_batch() {
            let label = self.read_label(tenant).await.map_err(|e| Arc::<str>::from(e.to_string()));
            for waiter in batch {
                let _ = waiter.send(label.clone());
            }
        }
    }

    /// One read of a tenant's [`Label`]: one `MGET` on a single node
    /// (atomic), one per slot at once on a cluster, as the read itself
    /// reads them.
    async fn read_label(&self, tenant: TenantId) -> Result<Label, ReadModelError> {
        let shared = SharedLabel::keys(&self.keys);
        let own = TenantLabel::keys(&self.keys, tenant);
        if let Some(tracking) = &self.tracking {
            if let Some((mut conn, stamp)) = tracking.begin(tenant) {
                match redis::cmd("MGET").arg(&shared).arg(&own).query_async(&mut conn).await {
                    Ok(values) => {
                        let label = Label::from_values(values);
                        tracking.confirm(tenant, stamp, &label);
                        return Ok(label);
                    }
                    // Not found out by the heartbeat yet: read as without
                    // tracking, and confirm nothing.
                    Err(e) => tracing::debug!(error = %e, "the label read failed on the tracking connection"),
                }
            }
        }
        let values: Vec<Option<String>> = match &self.hot {
            Some(hot) if !self.redis.is_cluster() => {
                redis::cmd("MGET").arg(&shared).arg(&own).query_async(&mut hot.get().await?).await?
            }
            _ if !self.redis.is_cluster() => {
                redis::cmd("MGET").arg(&shared).arg(&own).query_async(&mut self.conn().await?).await?
            }
            _ => {
                let (global, tenant) = (redis::cmd("MGET").arg(&shared).clone(), redis::cmd("MGET").arg(&own).clone());
                let (mut g, mut c) = futures::try_join!(self.conn(), self.conn())?;
                let (mut g_values, t): (Vec<Option<String>>, Vec<Option<String>>) =
                    futures::try_join!(global.query_async(&mut g), tenant.query_async(&mut c))?;
                g_values.extend(t);
                g_values
            }
        };
        Ok(Label::from_values(values))
    }

    async fn grouped_on<C: redis::aio::ConnectionLike + Send>(
        &self,
        c: &mut C,
        mut side: Option<Conn>,
        tenant: TenantId,
        request: &GroupedRequest,
    ) -> Result<(Read, Option<Label>), ReadModelError> {
        let mode = Mode::of(request);
        let mut statuses = self.local.statuses(tenant);
        let mut attempts = 0;
        let (stamps, label, groups, statuses) = loop {
            attempts += 1;
            if attempts > MAX_ATTEMPTS {
                // Writes or status changes kept racing the read: let the
                // live path answer this one.
                return Ok((Read::Miss(Miss::Raced), None));
            }
            let Some(copy) = statuses.take() else {
                statuses = Some(self.load_statuses(c, tenant).await?);
                continue;
            };
            // First round trip, one MULTI: state, stamps, the tenant's
            // version, the windows, and per status its size and members.
            // The shared keys' stamps, and partition 0's format mark: a
            // partition-0 rebuild deletes the users and global statuses
            // and sets the mark once they are loaded again, so while it is
            // missing no answer is served from the cache (the other
            // partitions' tenants stay warm meanwhile).
            let shared = self.keys.in_partition(0).schema();
            let mut global = redis::pipe();
            global.get(self.keys.global_status_stamp()).get(self.keys.users_stamp()).get(&shared);
            let mut pipe = redis::pipe();
            pipe.atomic();
            if side.is_none() {
                pipe.get(self.keys.global_status_stamp()).get(self.keys.users_stamp()).get(&shared);
            }
            pipe.get(self.keys.state(tenant)).get(self.keys.status_stamp(tenant)).get(self.keys.version(tenant));
            let with_windows = mode == Mode::Enriched && !copy.visible.is_empty();
            if with_windows {
                let keys: Vec<i64> = copy.visible.iter().map(|s| s.key.get()).collect();
                pipe.cmd("HMGET").arg(self.keys.windows(tenant)).arg(keys);
            }
            for s in &copy.visible {
                let zset = self.keys.zset(tenant, s.key);
                pipe.zcard(&zset);
                if mode != Mode::Counts {
                    pipe.zrevrange(zset, 0, request.limit.get() as isize - 1);
                }
            }
            let (state_key, users_stamp) = (self.keys.state(tenant), self.keys.users_stamp());
            let replies: Vec<redis::Value> = match side.as_mut() {
                None => transaction(c, &pipe, &state_key).await?,
                Some(side) => {
                    let (mut g, t): (Vec<redis::Value>, Vec<redis::Value>) = futures::try_join!(
                        transaction(side, &global, &users_stamp),
                        transaction(c, &pipe, &state_key)
                    )?;
                    g.extend(t);
                    g
                }
            };
            let mut replies = replies.into_iter();
            let mut next = || replies.next().unwrap_or(redis::Value::Nil);
            let (global_statuses, users): (Option<String>, Option<String>) = (parse(next())?, parse(next())?);
            let format: Option<String> = parse(next())?;
            let shared_loaded = format.is_some();
            let state: Option<String> = parse(next())?;
            // Data in another format (before the projector's upgrade
            // rebuild) is never served: its state does not parse.
            match (state.as_deref(), TenantState::parse(state.as_deref())) {
                (_, TenantState::Warm(_)) => {}
                (None, _) | (Some(_), TenantState::Warming(_)) => return Ok((Read::Miss(Miss::Cold), None)),
                (Some(_), TenantState::Cold) => return Ok((Read::Miss(Miss::Format), None)),
                (_, TenantState::Quarantined) => return Ok((Read::Miss(Miss::Quarantined), None)),
            }
            // After the state: a cold tenant is still reported cold (its
            // request queues the warm) before any projector has led.
            if !shared_loaded {
                return Ok((Read::Miss(Miss::Rebuilding), None));
            }
            let stamps = Stamps { global_statuses, tenant_statuses: parse(next())?, users };
            if !copy.is_current(&stamps) {
                continue;
            }
            let version: Option<String> = parse(next())?;
            let windows: Vec<Option<u64>> = if with_windows { parse(next())? } else { Vec::new() };
            let mut groups: Vec<Group> = Vec::with_capacity(copy.visible.len());
            for i in 0..copy.visible.len() {
                let count: u64 = parse(next())?;
                let members: Vec<Vec<u8>> = if mode == Mode::Counts { Vec::new() } else { parse(next())? };
                // A document window shorter than asked for: a refill is
                // under way; the live path answers meanwhile.
                if mode == Mode::Enriched && windows.get(i).copied().flatten().unwrap_or(0) < members.len() as u64 {
                    return Ok((Read::Miss(Miss::ShortWindow), None));
                }
                groups.push((count, members, Vec::new()));
            }
            if mode == Mode::Enriched {
                // Second round trip: the documents, then the version again.
                // Every tenant write bumps the version in the same atomic
                // step, so an unchanged version means no write landed
                // between the two trips: one consistent moment.
                let members: Vec<&[u8]> = groups.iter().flat_map(|g| g.1.iter().map(Vec::as_slice)).collect();
                if !members.is_empty() {
                    let (docs, again): (Vec<Option<String>>, Option<String>) = transaction(
                        c,
                        redis::pipe()
                            .cmd("HMGET")
                            .arg(self.keys.docs(tenant))
                            .arg(members)
                            .get(self.keys.version(tenant)),
                        &self.keys.version(tenant),
                    )
                    .await?;
                    if again != version {
                        statuses = Some(copy);
                        continue;
                    }
                    let mut docs = docs.into_iter();
                    for g in &mut groups {
                        g.2 = docs.by_ref().take(g.1.len()).collect();
                    }
                }
            }
            // What this answer is made of, as read with it: a kept copy is
            // reused while these values hold (crate::answers).
            let label = Label {
                shared: SharedLabel {
                    global_statuses: stamps.global_statuses.clone(),
                    users: stamps.users.clone(),
                    format,
                },
                tenant: TenantLabel { state, statuses: stamps.tenant_statuses.clone(), version },
            };
            break (stamps, label, groups, copy);
        };

        let mut users: HashMap<UserId, Option<Arc<str>>> = HashMap::new();
        if mode == Mode::Enriched {
            let ids: BTreeSet<UserId> = groups
                .iter()
                .flat_map(|(_, _, docs)| docs.iter().flatten())
                .filter_map(|d| split_stored(d))
                .flat_map(|(refs, _)| refs.into_iter().flatten())
                .collect();
            let (found, missing) = self.local.users(&stamps.users, ids);
            users = found;
            if !missing.is_empty() {
                let raw: Vec<i64> = missing.iter().map(|u| u.get()).collect();
                let read: Vec<Option<String>> =
                    redis::cmd("HMGET").arg(self.keys.users()).arg(&raw).query_async(c).await?;
                let read: Vec<(UserId, Option<Arc<str>>)> = missing
                    .into_iter()
                    .zip(read)
                    .map(|(id, u)| (id, u.map(|u| Arc::from(restrict_user(&u, &self.user_fields)))))
                    .collect();
                self.local.put_users(&stamps.users, read.iter().cloned());
                users.extend(read);
            }
        }
        let mut by_status = BTreeMap::new();
        for (status, (count, members, docs)) in statuses.visible.iter().zip(groups) {
            let calls = match mode {
                Mode::Counts => Vec::new(),
                Mode::Ids => members
                    .iter()
                    .map(|m| member_call_id(m).map(|id| id.get().to_string()).ok_or_else(|| corrupt(&tenant, m)))
                    .collect::<Result<_, _>>()?,
                Mode::Enriched => docs
                    .iter()
                    .zip(&members)
                    .map(|(doc, m)| {
                        let (refs, json) = doc.as_deref().and_then(split_stored).ok_or_else(|| corrupt(&tenant, m))?;
                        let detail = |r: Option<UserId>| {
                            r.and_then(|id| users.get(&id))
                                .and_then(|u| user_json_for(u.as_deref()?, tenant))
                                .unwrap_or("{}")
                        };
                        // Written by the projector through serde: valid JSON,
                        // spliced without parsing it again.
                        Ok::<_, ReadModelError>(render::splice_details(
                            json,
                            [detail(refs[0]), detail(refs[1]), detail(refs[2])],
                        ))
                    })
                    .collect::<Result<_, _>>()?,
            };
            by_status.insert(status.key, GroupCalls { total: count, calls });
        }
        Ok((Read::Hit(render::assemble(&statuses.visible, by_status, request)), Some(label)))
    }

    /// Reads the tenant's statuses and their stamps atomically, and keeps
    /// them as this process's copy.
    async fn load_statuses<C: redis::aio::ConnectionLike + Send>(
        &self,
        c: &mut C,
        tenant: TenantId,
    ) -> Result<Arc<TenantStatuses>, ReadModelError> {
        // Each slot's stamp with its data, atomically: the copy is
        // labelled with stamps no older than what it holds.
        let (global_stamp, global): (Option<String>, HashMap<String, String>) = transaction(
            c,
            redis::pipe().atomic().get(self.keys.global_status_stamp()).hgetall(self.keys.global_statuses()),
            &self.keys.global_statuses(),
        )
        .await?;
        let (tenant_stamp, own): (Option<String>, HashMap<String, String>) = transaction(
            c,
            redis::pipe().atomic().get(self.keys.status_stamp(tenant)).hgetall(self.keys.statuses(tenant)),
            &self.keys.statuses(tenant),
        )
        .await?;
        let records = own.values().chain(global.values()).map(|json| {
            serde_json::from_str::<StatusRecord>(json)
                .map_err(|e| ReadModelError::Corrupt { key: "statuses".into(), detail: e.to_string() })
        });
        let visible = Status::visible(records.collect::<Result<Vec<_>, _>>()?, tenant);
        Ok(self.local.put_statuses(tenant, TenantStatuses { global_stamp, tenant_stamp, visible }))
    }

    /// Queues a warm of a cold tenant unless one is already under way
    /// (single-flight). Returns the new epoch when this call queued it.
    pub async fn request_warm(&self, tenant: TenantId) -> Result<Option<u64>, ReadModelError> {
        self.queue_warm(tenant, None, false).await
    }

    /// Queues a warm of `tenant` as part of `job`, even if it is warm.
    pub async fn force_warm(&self, tenant: TenantId, job: &str) -> Result<u64, ReadModelError> {
        Ok(self.queue_warm(tenant, Some(job), true).await?.unwrap_or(0))
    }

    /// Three steps, each in one slot: a new epoch (and the tenant listed),
    /// the tenant's state (single flight: only the first caller for a cold
    /// tenant sets it), then the command. A crash before the command leaves
    /// a warming tenant with nothing queued, which the projector resumes.
    async fn queue_warm(
        &self,
        tenant: TenantId,
        job: Option<&str>,
        force: bool,
    ) -> Result<Option<u64>, ReadModelError> {
        static CELL: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
        let mut c = self.conn().await?;
        let current: Option<String> = c.get(self.keys.state(tenant)).await?;
        if !force && current.as_deref().is_some_and(|s| s.starts_with(&TenantState::format_prefix())) {
            return Ok(None);
        }
        let (epoch,): (u64,) = transaction(
            &mut c,
            redis::pipe().atomic().incr(self.keys.epoch(), 1).sadd(self.keys.tenants(), tenant.get()).ignore(),
            &self.keys.epoch(),
        )
        .await?;
        let set: i64 = script(&CELL, REQUEST_WARM)
            .key(self.keys.state(tenant))
            .arg(TenantState::encode_warming(epoch, job))
            .arg(if force { "1" } else { "0" })
            .arg(TenantState::format_prefix())
            .invoke_async(&mut c)
            .await?;
        if set != 1 {
            return Ok(None);
        }
        self.void_tracked(tenant);
        let command = Command::Warm { tenant, epoch, job: job.map(str::to_string) };
        let _: () = c.rpush(self.keys.commands(), command.encode()).await?;
        Ok(Some(epoch))
    }

    /// Puts back the `warming` state of a queued warm of `tenant` (its
    /// `epoch` and `job`) if the tenant has no state of this format, as
    /// after a purge. Returns whether it did.
    pub async fn restore_warming(
        &self,
        tenant: TenantId,
        epoch: u64,
        job: Option<&str>,
    ) -> Result<bool, ReadModelError> {
        static CELL: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
        let mut c = self.conn().await?;
        let set: i64 = script(&CELL, REQUEST_WARM)
            .key(self.keys.state(tenant))
            .arg(TenantState::encode_warming(epoch, job))
            .arg("0")
            .arg(TenantState::format_prefix())
            .invoke_async(&mut c)
            .await?;
        if set == 1 {
            self.void_tracked(tenant);
        }
        Ok(set == 1)
    }

    /// Creates a warm job of `total` tenants and returns its id. The total
    /// is set up front, so the job never looks done before every warm of
    /// it has been queued.
    pub async fn create_job(&self, total: usize) -> Result<String, ReadModelError> {
        let mut c = self.conn().await?;
        let n: u64 = c.incr(self.keys.epoch(), 1).await?;
        let id = format!("w{n}");
        let now = now_ms();
        let _: () = redis::pipe()
            .hset_multiple(self.keys.job(&id), &[(job::TOTAL, total.to_string()), (job::DONE, "0".to_string())])
            .hset(self.keys.job(&id), job::CREATED_MS, now)
            .expire(self.keys.job(&id), 7 * 24 * 3600)
            .query_async(&mut c)
            .await?;
        Ok(id)
    }

    pub async fn job(&self, id: &str) -> Result<Option<JobStatus>, ReadModelError> {
        if !is_job_id(id) {
            return Ok(None);
        }
        let mut c = self.conn().await?;
        let h: HashMap<String, i64> = c.hgetall(self.keys.job(id)).await?;
        if h.is_empty() {
            return Ok(None);
        }
        let total = h.get(job::TOTAL).copied().unwrap_or(0).max(0) as u64;
        let done = h.get(job::DONE).copied().unwrap_or(0).max(0) as u64;
        Ok(Some(JobStatus {
            job_id: id.to_string(),
            state: if done >= total { "done" } else { "running" },
            total,
            done,
            created_ms: h.get(job::CREATED_MS).copied().unwrap_or(0),
        }))
    }

    /// After this process wrote `tenant`'s label keys itself: its next
    /// read must not precede the invalidation Redis will push.
    fn void_tracked(&self, tenant: TenantId) {
        if let Some(tracking) = &self.tracking {
            tracking.void(tenant);
        }
    }

    /// Marks `tenant` cold at once (reads go live from now on) and queues
    /// the removal of its calls for the projector.
    pub async fn invalidate(&self, tenant: TenantId) -> Result<(), ReadModelError> {
        let mut c = self.conn().await?;
        let _: () = c.del(self.keys.state(tenant)).await?;
        self.void_tracked(tenant);
        let _: () = c.rpush(self.keys.commands(), Command::Purge { tenant }.encode()).await?;
        Ok(())
    }

    /// Queues a [`Command::Rebuild`] of `partition`.
    pub async fn request_rebuild(&self, partition: u32) -> Result<(), ReadModelError> {
        let mut c = self.conn().await?;
        let _: () = c.rpush(self.keys.commands(), Command::Rebuild { partition }.encode()).await?;
        Ok(())
    }

    /// Counts one verification that compared a tenant, and the kinds of
    /// the differences it found (one count per difference).
    pub async fn record_verification<'a>(
        &self,
        kinds: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), ReadModelError> {
        let mut pipe = redis::pipe();
        pipe.hincr(self.keys.progress(), progress::RECONCILE_CHECKS, 1).ignore();
        for kind in kinds {
            pipe.hincr(self.keys.progress(), progress::reconcile_drift(kind), 1).ignore();
        }
        let mut c = self.conn().await?;
        let _: () = pipe.query_async(&mut c).await?;
        Ok(())
    }

    /// Marks every tenant cold and queues their removal.
    pub async fn invalidate_all(&self) -> Result<Vec<TenantId>, ReadModelError> {
        let tenants: Vec<TenantId> = self.tenant_states().await?.into_keys().collect();
        for t in &tenants {
            self.invalidate(*t).await?;
        }
        Ok(tenants)
    }

    /// Calls held for `tenant` (its ZSETs' sizes).
    pub async fn tenant_calls(&self, tenant: TenantId) -> Result<u64, ReadModelError> {
        let zsets = self.redis.scan_tag(&self.keys.version(tenant), &self.keys.zset_pattern(tenant)).await?;
        let mut c = self.conn().await?;
        let mut total = 0;
        for z in zsets {
            let n: u64 = c.zcard(z).await?;
            total += n;
        }
        Ok(total)
    }

    pub async fn tenant_last_event_ms(&self, tenant: TenantId) -> Result<Option<i64>, ReadModelError> {
        let mut c = self.conn().await?;
        Ok(c.hget(self.keys.meta(tenant), progress::LAST_EVENT_MS).await?)
    }

    pub async fn progress(&self) -> Result<Progress, ReadModelError> {
        let mut c = self.conn().await?;
        let (h, owner): (HashMap<String, i64>, Option<String>) =
            redis::pipe().hgetall(self.keys.progress()).get(self.keys.lease()).query_async(&mut c).await?;
        Ok(Progress {
            heartbeat_ms: h.get(progress::HEARTBEAT_MS).copied(),
            last_event_ms: h.get(progress::LAST_EVENT_MS).copied(),
            lag_ms: h.get(progress::LAG_MS).copied(),
            events_applied: h.get(progress::EVENTS_APPLIED).copied().unwrap_or(0).max(0) as u64,
            owner,
        })
    }
}

/// How close the projectors' checkpoints are to falling off MongoDB's
/// history (the oplog): when a checkpoint is older than the oldest entry,
/// its partition must be rebuilt.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct HistoryWindow {
    /// How far behind now the oldest partition checkpoint stands (ms);
    /// none before every partition has saved one.
    pub checkpoint_age_ms: Option<i64>,
    /// How much history MongoDB holds: now less its oldest oplog entry
    /// (ms); none when unknown (no `local.oplog.rs` to read, or no right to).
    pub window_ms: Option<i64>,
    /// `checkpoint_age_ms / window_ms`.
    pub used: Option<f64>,
    /// `used` has passed `warn_share`.
    pub at_risk: bool,
    pub warn_share: f64,
}

impl HistoryWindow {
    /// From each partition's checkpoint position (ms; none: not saved
    /// yet) and the oldest oplog entry's cluster time (s).
    pub fn assess(checkpoint_at: &[Option<i64>], oplog_first_s: Option<i64>, now_ms: i64, warn_share: f64) -> Self {
        let oldest = checkpoint_at.iter().copied().collect::<Option<Vec<i64>>>().and_then(|v| v.into_iter().min());
        let checkpoint_age_ms = oldest.map(|at| (now_ms - at).max(0));
        let window_ms = oplog_first_s.map(|s| (now_ms - s * 1000).max(1));
        let used = checkpoint_age_ms.zip(window_ms).map(|(age, window)| age as f64 / window as f64);
        Self { checkpoint_age_ms, window_ms, used, at_risk: used.is_some_and(|u| u > warn_share), warn_share }
    }
}

/// Totals the projectors count in `P:{g}:progress`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub warms: i64,
    pub history_lost: i64,
    pub window_refills: i64,
    pub writes_lost: i64,
    pub poison_events: i64,
    /// Verifications that compared a tenant (by every process).
    pub reconcile_checks: i64,
    /// Differences verification found, by kind.
    pub reconcile_drift: BTreeMap<String, i64>,
}

impl ReadModel {
    /// The [`HistoryWindow`] of `partitions` partitions.
    pub async fn history_window(&self, partitions: u32, warn_share: f64) -> Result<HistoryWindow, ReadModelError> {
        let mut c = self.conn().await?;
        let mut fields: Vec<String> = (0..partitions).map(progress::checkpoint_at).collect();
        fields.push(progress::OPLOG_FIRST_S.to_string());
        let mut values: Vec<Option<i64>> =
            redis::cmd("HMGET").arg(self.keys.progress()).arg(&fields).query_async(&mut c).await?;
        let first = values.pop().flatten();
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        Ok(HistoryWindow::assess(&values, first, now, warn_share))
    }

    pub async fn progress_counters(&self) -> Result<Counters, ReadModelError> {
        let mut c = self.conn().await?;
        let all: HashMap<String, String> = c.hgetall(self.keys.progress()).await?;
        let value = |field: &str| all.get(field).and_then(|v| v.parse().ok()).unwrap_or(0);
        Ok(Counters {
            warms: value(progress::WARMS),
            history_lost: value(progress::HISTORY_LOST),
            window_refills: value(progress::WINDOW_REFILLS),
            writes_lost: value(progress::WRITES_LOST),
            poison_events: value(progress::POISON_EVENTS),
            reconcile_checks: value(progress::RECONCILE_CHECKS),
            reconcile_drift: all
                .iter()
                .filter_map(|(k, v)| {
                    Some((k.strip_prefix(progress::RECONCILE_DRIFT_PREFIX)?.to_string(), v.parse().ok()?))
                })
                .collect(),
        })
    }

    /// The poison events of the tenants quarantined now, oldest first (a
    /// record of a tenant no longer quarantined, after a rebuild or an
    /// invalidation, or one that does not parse, is left out).
    pub async fn poison_events(&self) -> Result<Vec<crate::PoisonEvent>, ReadModelError> {
        let quarantined: BTreeSet<i64> = self
            .tenant_states()
            .await?
            .into_iter()
            .filter(|(_, s)| *s == TenantState::Quarantined)
            .map(|(t, _)| t.get())
            .collect();
        let mut c = self.conn().await?;
        let raw: HashMap<String, String> = c.hgetall(self.keys.poison()).await?;
        let mut events: Vec<crate::PoisonEvent> = raw
            .values()
            .filter_map(|v| serde_json::from_str::<crate::PoisonEvent>(v).ok())
            .filter(|e| quarantined.contains(&e.tenant_id))
            .collect();
        events.sort_by_key(|e| (e.at_ms, e.tenant_id));
        Ok(events)
    }
}

/// A cached user (`<tenant>|<JSON>`) with only the `fields` this process
/// may show: a projector configured with a longer allowlist (or a value
/// written by hand) cannot widen what a response shows. Once per user per
/// process (the result is kept in the local copy).
fn restrict_user(stored: &str, fields: &UserFields) -> String {
    let Some((owner, json)) = stored.split_once('|') else { return stored.to_string() };
    let Ok(mut user) = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(json) else {
        // Not an object: nothing to show of it.
        return format!("{owner}|{{}}");
    };
    if user.keys().all(|k| fields.names().contains(k)) {
        return stored.to_string();
    }
    user.retain(|k, _| fields.names().contains(k));
    format!("{owner}|{}", serde_json::Value::Object(user))
}

fn parse<T: redis::FromRedisValue>(value: redis::Value) -> Result<T, ReadModelError> {
    redis::from_redis_value(value)
        .map_err(|e| ReadModelError::Corrupt { key: "read reply".into(), detail: e.to_string() })
}

/// A grouped read's outcome.
#[derive(Debug)]
pub enum Read {
    Hit(GroupedBody),
    /// Redis cannot answer this one; the live path does.
    Miss(Miss),
}

/// Why a grouped read was not answered from Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// The tenant is cold or still warming.
    Cold,
    /// The tenant's state is in another format (before the projector's
    /// upgrade rebuild).
    Format,
    /// A document window is shorter than the limit asks for (a refill is
    /// under way, or `projector.doc_window` is below the limit).
    ShortWindow,
    /// Writes kept landing between the read's round trips.
    Raced,
    /// The tenant is quarantined after a poison event.
    Quarantined,
    /// Partition 0 is (re)building the users and global statuses every
    /// answer shows (its format mark `P:{g}:schema:0` is set only once
    /// they are loaded).
    Rebuilding,
}

impl Miss {
    /// The reason as metrics and logs name it.
    pub fn name(self) -> &'static str {
        match self {
            Miss::Cold => "cold",
            Miss::Format => "format",
            Miss::ShortWindow => "short_window",
            Miss::Raced => "retries_exhausted",
            Miss::Quarantined => "quarantined",
            Miss::Rebuilding => "rebuilding",
        }
    }
}

/// Read attempts before a hit gives way to the live path.
const MAX_ATTEMPTS: usize = 8;

/// A status's count, first members and their stored documents.
type Group = (u64, Vec<Vec<u8>>, Vec<Option<String>>);

fn corrupt(tenant: &TenantId, member: &[u8]) -> ReadModelError {
    ReadModelError::Corrupt {
        key: format!("tenant {tenant}"),
        detail: format!("missing or malformed call {member:02x?}"),
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
mod history_tests {
    use super::HistoryWindow;

    #[test]
    fn the_oldest_checkpoint_against_the_oldest_history() {
        let w = HistoryWindow::assess(&[Some(9_000), Some(7_000)], Some(0), 10_000, 0.5);
        assert_eq!((w.checkpoint_age_ms, w.window_ms), (Some(3_000), Some(10_000)));
        assert_eq!((w.used, w.at_risk), (Some(0.3), false));
        let w = HistoryWindow::assess(&[Some(4_000)], Some(0), 10_000, 0.5);
        assert!(w.at_risk, "{w:?}");
        // A partition without a checkpoint, or no oplog to read: unknown,
        // never at risk.
        assert_eq!(HistoryWindow::assess(&[Some(1), None], Some(0), 10_000, 0.5).checkpoint_age_ms, None);
        let w = HistoryWindow::assess(&[Some(1)], None, 10_000, 0.5);
        assert_eq!((w.window_ms, w.used, w.at_risk), (None, None, false));
    }
}
