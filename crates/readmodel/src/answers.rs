//! Rendered answers kept in-process (`query.response_cache_mb`), each
//! labelled with the values of every key whose change can change it, read
//! atomically with the data the answer was made of. A request reads the
//! label's keys again (one `MGET` on a single node) and reuses the answer
//! only if every value is the same; otherwise it reads and renders as
//! before, and keeps the new answer. docs/ARCHITECTURE.md ("Reusing
//! rendered answers") gives the argument that a reused answer is the one a
//! read at that instant would have rendered.

use std::collections::HashMap;
use std::sync::Arc;

use callboard_domain::{GroupedBody, GroupedRequest, TenantId};

use crate::Keys;

/// What a grouped read returns per status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Mode {
    Counts,
    Ids,
    Enriched,
}

impl Mode {
    pub(crate) fn of(request: &GroupedRequest) -> Self {
        match (request.include_calls, request.include_enrichment) {
            (false, _) => Mode::Counts,
            (true, false) => Mode::Ids,
            (true, true) => Mode::Enriched,
        }
    }
}

/// Which answer: a tenant's, for these parameters. The limit is part of
/// every answer, counts-only too (`summary.limit_per_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct AnswerKey {
    tenant: TenantId,
    limit: u32,
    mode: Mode,
}

impl AnswerKey {
    pub(crate) fn of(tenant: TenantId, request: &GroupedRequest) -> Self {
        Self { tenant, limit: request.limit.get(), mode: Mode::of(request) }
    }
}

/// The values, at one moment, of every key an answer depends on: the
/// global statuses' and the users' stamps and partition 0's format mark
/// (from the `{g}` slot), the tenant's state, status stamp and write
/// version (from its own). Stamps are never reused and the version only
/// grows while the state (which names the warm's epoch) stays, so equal
/// labels mean no write to any of these keys' data landed in between.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Label {
    pub shared: SharedLabel,
    pub tenant: TenantLabel,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct SharedLabel {
    pub global_statuses: Option<String>,
    pub users: Option<String>,
    pub format: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct TenantLabel {
    pub state: Option<String>,
    pub statuses: Option<String>,
    pub version: Option<String>,
}

impl SharedLabel {
    /// Its keys, in the order [`Self::from_values`] takes their values.
    pub(crate) fn keys(keys: &Keys) -> [String; 3] {
        [keys.global_status_stamp(), keys.users_stamp(), keys.in_partition(0).schema()]
    }

    pub(crate) fn from_values([global_statuses, users, format]: [Option<String>; 3]) -> Self {
        Self { global_statuses, users, format }
    }
}

impl TenantLabel {
    /// Its keys, in the order [`Self::from_values`] takes their values.
    pub(crate) fn keys(keys: &Keys, tenant: TenantId) -> [String; 3] {
        [keys.state(tenant), keys.status_stamp(tenant), keys.version(tenant)]
    }

    pub(crate) fn from_values([state, statuses, version]: [Option<String>; 3]) -> Self {
        Self { state, statuses, version }
    }
}

impl Label {
    /// From the values of [`SharedLabel::keys`] then [`TenantLabel::keys`],
    /// in order (an `MGET` of them).
    pub(crate) fn from_values(values: Vec<Option<String>>) -> Self {
        let mut values = values.into_iter();
        let mut next = || values.next().flatten();
        Label {
            shared: SharedLabel::from_values([next(), next(), next()]),
            tenant: TenantLabel::from_values([next(), next(), next()]),
        }
    }
}

/// A kept answer and the label it was read at.
#[derive(Debug)]
pub(crate) struct Kept {
    pub label: Label,
    pub body: GroupedBody,
}

/// What a lookup found, for the hit rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// An answer kept at the current label: reused after reading the label.
    Hit,
    /// An answer kept at the label Redis's tracking vouches for: reused
    /// with no round trip ([`crate::tracking`]).
    Tracked,
    /// An answer kept at an older label: read and rendered again.
    Stale,
    /// None kept (never read here, or pushed out by newer ones).
    Absent,
}

impl Lookup {
    /// The `result` it counts under.
    pub fn as_str(self) -> &'static str {
        match self {
            Lookup::Hit => "hit",
            // A hit too: `check` tells the two apart.
            Lookup::Tracked => "hit",
            Lookup::Stale => "stale",
            Lookup::Absent => "absent",
        }
    }
}

/// Counts each lookup (the API's metrics).
pub type LookupObserver = Arc<dyn Fn(Lookup) + Send + Sync>;

/// Bytes an entry costs beyond its body and its label's text: the key,
/// the label's six `Option<String>`s and their allocations, the body's
/// `Arc`, the entry's `Arc` and the map's slot (an estimate).
const ENTRY_OVERHEAD: u64 = 320;

impl Label {
    /// The bytes of its values' text.
    fn text_len(&self) -> usize {
        let (s, t) = (&self.shared, &self.tenant);
        [&s.global_statuses, &s.users, &s.format, &t.state, &t.statuses, &t.version]
            .iter()
            .map(|v| v.as_ref().map_or(0, String::len))
            .sum()
    }
}

#[derive(Clone)]
struct ByBytes;

impl quick_cache::Weighter<AnswerKey, Arc<Kept>> for ByBytes {
    fn weight(&self, _key: &AnswerKey, kept: &Arc<Kept>) -> u64 {
        (kept.body.len() + kept.label.text_len()) as u64 + ENTRY_OVERHEAD
    }
}

/// What a label read hands each caller waiting on it (an error as text:
/// one error for many callers).
pub(crate) type LabelResult = Result<Label, Arc<str>>;
type Waiter = tokio::sync::oneshot::Sender<LabelResult>;

/// Label reads shared by concurrent requests, per tenant, as a group
/// commit: a caller joins the batch waiting for the next read, and a read
/// takes its whole batch before it starts. So every caller's read began
/// after the caller joined (a reused answer is as fresh as if the caller
/// had read alone), and one read serves every request that arrived while
/// the previous one was under way.
#[derive(Default)]
pub(crate) struct LabelReads {
    tenants: std::sync::Mutex<HashMap<TenantId, Vec<Waiter>>>,
}

impl LabelReads {
    /// Joins `tenant`'s next batch; true if no read is under way, and the
    /// caller must start the rounds ([`Self::next_batch`] until `None`).
    pub(crate) fn join(&self, tenant: TenantId, waiter: Waiter) -> bool {
        let mut tenants = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        match tenants.get_mut(&tenant) {
            Some(batch) => {
                batch.push(waiter);
                false
            }
            None => {
                tenants.insert(tenant, vec![waiter]);
                true
            }
        }
    }

    /// The callers the next read serves, taken before it starts; `None`
    /// (and the tenant's rounds over) when none is waiting.
    pub(crate) fn next_batch(&self, tenant: TenantId) -> Option<Vec<Waiter>> {
        let mut tenants = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        let batch = std::mem::take(tenants.get_mut(&tenant)?);
        if batch.is_empty() {
            tenants.remove(&tenant);
            return None;
        }
        Some(batch)
    }

    /// The tenant's rounds, as a guard: [`Rounds::next_batch`] until
    /// `None`. If they end any other way (a panic, the task dropped), the
    /// tenant's waiters are dropped (their reads fail, and the requests
    /// answer live) and the next caller starts new rounds.
    pub(crate) fn rounds(&self, tenant: TenantId) -> Rounds<'_> {
        Rounds { reads: self, tenant, over: false }
    }
}

pub(crate) struct Rounds<'a> {
    reads: &'a LabelReads,
    tenant: TenantId,
    over: bool,
}

impl Rounds<'_> {
    /// See [`LabelReads::next_batch`].
    pub(crate) fn next_batch(&mut self) -> Option<Vec<Waiter>> {
        let batch = self.reads.next_batch(self.tenant);
        self.over = batch.is_none();
        batch
    }
}

impl Drop for Rounds<'_> {
    fn drop(&mut self) {
        if !self.over {
            self.reads.tenants.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.tenant);
        }
    }
}

/// The kept answers, bounded in bytes; the least recently useful go first
/// (quick_cache's CLOCK-Pro).
#[derive(Clone)]
pub(crate) struct Answers {
    cache: Arc<quick_cache::sync::Cache<AnswerKey, Arc<Kept>, ByBytes>>,
    pub(crate) reads: Arc<LabelReads>,
    observe: Option<LookupObserver>,
}

impl std::fmt::Debug for Answers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answers").field("bytes", &self.cache.weight()).field("entries", &self.cache.len()).finish()
    }
}

/// Answers of about this size are expected (sizes the map up front).
const TYPICAL_ANSWER: u64 = 4 * 1024;

impl Answers {
    pub(crate) fn new(max_bytes: u64, observe: Option<LookupObserver>) -> Self {
        let items = (max_bytes / TYPICAL_ANSWER).clamp(16, 1 << 20) as usize;
        Self {
            cache: Arc::new(quick_cache::sync::Cache::with_weighter(items, max_bytes, ByBytes)),
            reads: Arc::default(),
            observe,
        }
    }

    pub(crate) fn get(&self, key: &AnswerKey) -> Option<Arc<Kept>> {
        self.cache.get(key)
    }

    pub(crate) fn keep(&self, key: AnswerKey, kept: Kept) {
        self.cache.insert(key, Arc::new(kept));
    }

    pub(crate) fn observe(&self, lookup: Lookup) {
        if let Some(observe) = &self.observe {
            observe(lookup);
        }
    }

    /// (bytes, entries) kept now.
    pub(crate) fn size(&self) -> (u64, usize) {
        (self.cache.weight(), self.cache.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use callboard_domain::Limit;

    fn request(limit: u32, include_calls: bool, include_enrichment: bool) -> GroupedRequest {
        GroupedRequest { limit: Limit::new(i64::from(limit), 1000).unwrap(), include_calls, include_enrichment }
    }

    #[test]
    fn answers_are_kept_per_tenant_limit_and_mode() {
        let t = TenantId::new(1).unwrap();
        assert_eq!(AnswerKey::of(t, &request(5, false, true)), AnswerKey::of(t, &request(5, false, false)));
        assert_ne!(AnswerKey::of(t, &request(5, false, true)), AnswerKey::of(t, &request(50, false, true)));
        assert_ne!(AnswerKey::of(t, &request(5, true, true)), AnswerKey::of(t, &request(50, true, true)));
        assert_ne!(AnswerKey::of(t, &request(5, true, true)), AnswerKey::of(t, &request(5, true, false)));
        assert_ne!(
            AnswerKey::of(t, &request(5, true, true)),
            AnswerKey::of(TenantId::new(2).unwrap(), &request(5, true, true))
        );
    }

    #[test]
    fn a_label_read_serves_only_callers_that_joined_before_it_started() {
        let (reads, t) = (LabelReads::default(), TenantId::new(1).unwrap());
        let waiter = || tokio::sync::oneshot::channel::<LabelResult>();
        let ((a, _ra), (b, _rb), (c, _rc), (d, _rd)) = (waiter(), waiter(), waiter(), waiter());
        assert!(reads.join(t, a), "the first caller starts the rounds");
        assert!(!reads.join(t, b), "a second caller waits for the first read");
        assert_eq!(reads.next_batch(t).map(|b| b.len()), Some(2), "both joined before the first read started");
        assert!(!reads.join(t, c), "a caller joining during a read waits for the next");
        assert_eq!(reads.next_batch(t).map(|b| b.len()), Some(1));
        assert!(reads.next_batch(t).is_none(), "the rounds end when no one waits");
        assert!(reads.join(t, d), "the next caller starts new rounds");
    }

    #[test]
    fn rounds_that_end_early_leave_no_tenant_waiting() {
        use tokio::sync::oneshot::error::TryRecvError;
        let (reads, t) = (LabelReads::default(), TenantId::new(1).unwrap());
        let waiter = || tokio::sync::oneshot::channel::<LabelResult>();
        let ((a, _ra), (b, mut rb), (c, _rc), (d, _rd)) = (waiter(), waiter(), waiter(), waiter());
        assert!(reads.join(t, a));
        let mut rounds = reads.rounds(t);
        assert!(rounds.next_batch().is_some());
        assert!(!reads.join(t, b), "b waits for the next read");
        drop(rounds); // cancelled mid-way, say
        assert_eq!(rb.try_recv(), Err(TryRecvError::Closed), "b is told the read will not come");
        assert!(reads.join(t, c), "the next caller starts new rounds");
        let mut rounds = reads.rounds(t);
        assert!(rounds.next_batch().is_some() && rounds.next_batch().is_none(), "c's rounds end");
        assert!(reads.join(t, d), "d starts the next rounds");
        drop(rounds);
        assert_eq!(reads.next_batch(t).map(|b| b.len()), Some(1), "rounds that ended leave d's in place");
    }

    #[test]
    fn the_kept_bytes_stay_within_the_bound() {
        let answers = Answers::new(64 * 1024, None);
        let body = callboard_domain::assemble(&[], Default::default(), &request(20, true, true));
        for t in 1..=1_000 {
            let label = Label::default();
            answers.keep(
                AnswerKey::of(TenantId::new(t).unwrap(), &request(20, true, true)),
                Kept { label, body: body.clone() },
            );
        }
        let (bytes, entries) = answers.size();
        assert!(bytes <= 64 * 1024, "{bytes} bytes kept");
        assert!(entries > 10 && entries < 1_000, "{entries} entries kept");
    }
}
