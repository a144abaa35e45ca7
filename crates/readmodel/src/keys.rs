//! The Redis key schema. Every key carries a hash tag, so that every
//! script, MULTI and pipeline touches one Redis Cluster slot:
//! - `{tN}`: one tenant's keys, so one tenant's change is one atomic script
//!   and one tenant's read one MULTI;
//! - `{lK}`: one of [`LOC_SHARDS`] shards of the call locators, spread over
//!   the cluster's slots so that no node holds every locator;
//! - `{g}`: keys shared by every tenant (users, global statuses, the
//!   projector's lease and checkpoint, the command queue).
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:{tN}:z:<status>` | ZSET | every live call: member [`crate::codec::member`] (id, then `_id`, binary), score `start_time` ms (undated: [`crate::codec::UNDATED`]) |
//! | `P:{tN}:doc` | HASH | member -> `<owner>,<user>,<assignee>\|<call JSON without details>`, for the first ranks of each ZSET only |
//! | `P:{tN}:dw` | HASH | status -> how many first ranks of its ZSET have their document |
//! | `P:{tN}:ver` | STRING | bumped by every write to the tenant's calls (a rebuild deletes it) |
//! | `P:{tN}:state` | STRING | [`crate::TenantState`] with the format mark: `<schema>:warming:<epoch>:<job>`, `<schema>:warm:<epoch>` or `<schema>:quarantined`; absent = cold |
//! | `P:{tN}:st` | HASH | status `_id` -> the tenant's own status (JSON `StatusRecord`) |
//! | `P:{tN}:meta` | HASH | `last_event_ms` |
//! | `P:{tN}:stv` | STRING | a unique stamp, replaced whenever the tenant's statuses change |
//! | `P:{tN}:fence` | STRING | the highest projector token that wrote the tenant |
//! | `P:{lK}:cl:<p>:<bucket>` | HASH | partition `p`'s call locators: call `_id` (binary) -> the places `<tenant>:<status>:<id>` (comma list) of `p`'s tenants that may hold it; bucket `b` lives in shard `b % LOC_SHARDS` |
//! | `P:{lK}:fence:<p>` | STRING | the highest token of partition `p`'s leaders that wrote the shard |
//! | `P:{g}:st` | HASH | status `_id` -> global status |
//! | `P:{g}:users` | HASH | user id -> allowlisted user JSON |
//! | `P:{g}:stv`, `P:{g}:uv` | STRING | unique stamps, replaced whenever a global status / a user changes |
//! | `P:{g}:uloc` | HASH | user `_id` -> user id |
//! | `P:{g}:sloc:<p>` | HASH | partition `p`'s status locators: status `_id` -> `g` or tenant id |
//! | `P:{g}:tenants` | SET | tenants that may have a state (an index for listing; the state itself is `P:{tN}:state`) |
//! | `P:{g}:epoch` | STRING | warm epoch counter |
//! | `P:{g}:cmdq` | LIST | commands for the projectors ([`crate::Command`]): warms, purges, rebuilds of a partition (queued by verification) |
//! | `P:{g}:job:<id>` | HASH | a warm job's progress ([`crate::job`] fields) |
//! | `P:{g}:settings:<p>` | STRING | the [`crate::Fingerprint`] (JSON) of the settings partition `p` stored its data with |
//! | `P:{g}:schema:<p>` | STRING | the format partition `p` built its keys in ([`SCHEMA`] and the partition count); reads answer live while partition 0's is missing (its users and global statuses not loaded) |
//! | `P:{g}:ckpt:<p>` | STRING | partition `p`'s resume token of its last applied batch (BSON) |
//! | `P:{g}:lease:<p>` | STRING | the id of partition `p`'s active projector, with a TTL |
//! | `P:{g}:asof:<p>` | HASH | partition `p`'s watermark: `at_ms` (every change committed before it is applied), `through_s`/`through_i` (every change at or before that cluster time); only grows, with the checkpoint's lease check |
//! | `P:{g}:members` | ZSET | projector processes, scored by their last heartbeat (ms) |
//! | `P:{mI}:seq:<p>` | STRING | on a cluster, one per master: the sequence of partition `p`'s last batch written before its checkpoint (durability marker) |
//! | `P:{g}:fence_seq` | STRING | counter handing each new leader a higher token |
//! | `P:{g}:progress` | HASH | projector heartbeat, last event time, lag, counters, `checkpoint_at_ms:<p>` (where partition `p`'s checkpoint stands), `oplog_first_s`/`oplog_last_s` (MongoDB's history window, when readable), verification's `reconcile_checks_total` and `reconcile_drift_total:<kind>` |
//! | `P:{g}:poison` | HASH | tenant id -> the [`crate::PoisonEvent`] (JSON) that quarantined it, until it is warm again |

use callboard_domain::{DocKey, StatusKey, TenantId};

/// The format of the keys below. A projector finding another one (or none
/// beside a checkpoint) rebuilds the read model; readers serve nothing from
/// Redis until it matches. 2: binary members, document windows, place
/// locators (ADR 0004). 3: tenant states in the tenant's slot with the
/// format mark, locators in shards (ADR 0005).
pub const SCHEMA: &str = "3";

/// Buckets of the call locator (see [`Keys::call_loc`]). Changing it
/// strands every locator: only with a rebuild (invalidate all).
pub const CALL_LOC_BUCKETS: u64 = 16_384;

/// Hash tags the call-locator buckets are spread over: on a cluster each
/// is a slot of its own, so the locators spread over the masters.
pub const LOC_SHARDS: u64 = 256;

/// The hash tag of a key (what lies between its first `{` and the next
/// `}`), which decides its Redis Cluster slot.
pub fn tag_of(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let close = key[open + 1..].find('}')?;
    Some(&key[open + 1..open + 1 + close]).filter(|t| !t.is_empty())
}

/// The hash tag of the shared keys.
pub const GLOBAL_TAG: &str = "g";

/// What a key of the schema above holds (its row in the table), read back
/// from the key's name by [`Keys::kind_of`]: for reports of what each kind
/// of key costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyKind {
    StatusCalls,
    Documents,
    Windows,
    TenantStatuses,
    TenantMeta,
    TenantVersion,
    TenantState,
    TenantStatusStamp,
    TenantFence,
    CallLocators,
    ShardFence,
    DurabilityMarker,
    GlobalStatuses,
    Users,
    UserLocators,
    StatusLocators,
    /// The projectors' own keys: stamps, the tenant index, the epoch, the
    /// command queue, jobs, format marks, settings, checkpoints, leases,
    /// watermarks, members, the fence sequence, progress, poison events.
    ProjectorState,
}

impl KeyKind {
    /// The key's row in the schema table.
    pub fn pattern(self) -> &'static str {
        match self {
            Self::StatusCalls => "P:{tN}:z:<status>",
            Self::Documents => "P:{tN}:doc",
            Self::Windows => "P:{tN}:dw",
            Self::TenantStatuses => "P:{tN}:st",
            Self::TenantMeta => "P:{tN}:meta",
            Self::TenantVersion => "P:{tN}:ver",
            Self::TenantState => "P:{tN}:state",
            Self::TenantStatusStamp => "P:{tN}:stv",
            Self::TenantFence => "P:{tN}:fence",
            Self::CallLocators => "P:{lK}:cl:<p>:<bucket>",
            Self::ShardFence => "P:{lK}:fence:<p>, P:{mI}:fence:<p>",
            Self::DurabilityMarker => "P:{mI}:seq:<p>",
            Self::GlobalStatuses => "P:{g}:st",
            Self::Users => "P:{g}:users",
            Self::UserLocators => "P:{g}:uloc",
            Self::StatusLocators => "P:{g}:sloc:<p>",
            Self::ProjectorState => "P:{g}:* (the projectors' own)",
        }
    }
}

/// How tenants are spread over projector partitions: by a stable hash of
/// the tenant id (FNV-1a of its decimal form), so every process agrees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Partitioning {
    count: u32,
}

impl Partitioning {
    /// `count` partitions (at least one).
    pub fn new(count: u32) -> Self {
        Self { count: count.max(1) }
    }

    pub fn count(self) -> u32 {
        self.count
    }

    /// The partition that projects `tenant`.
    pub fn of(self, tenant: TenantId) -> u32 {
        (fnv1a(tenant.get().to_string().as_bytes()) % u64::from(self.count)) as u32
    }

    /// Partition 0 also projects what no tenant owns: users and global
    /// statuses.
    pub fn owns_globals(partition: u32) -> bool {
        partition == 0
    }

    /// What `tenant`'s answers can claim given every partition's
    /// watermark (`marks`, in partition order): an answer holds its
    /// partition's data and partition 0's (the users and the global
    /// statuses, which only partition 0 stores), so what both have applied.
    pub fn claim(self, tenant: TenantId, marks: &[callboard_domain::Watermark]) -> callboard_domain::Watermark {
        let mark = |p: u32| marks.get(p as usize).copied().unwrap_or_default();
        match self.of(tenant) {
            0 => mark(0),
            p => mark(p).min(mark(0)),
        }
    }
}

pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    // Stable across processes and versions.
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

/// Key names. The keys a projector partition keeps for itself (its lease,
/// checkpoint, format mark, call and status locators, and its fences on the
/// locator shards) are those of [`Keys::partition`]; every other key is
/// the same for all partitions.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    partition: u32,
}

impl Keys {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into(), partition: 0 }
    }

    /// The same keys, with partition `p`'s own.
    pub fn in_partition(&self, p: u32) -> Self {
        Self { prefix: self.prefix.clone(), partition: p }
    }

    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// The hash tag of `t`'s keys.
    pub fn tenant_tag(&self, t: TenantId) -> String {
        format!("t{}", t.get())
    }

    /// The tenant whose slot `key` (one of this schema's, `{t<id>}`) is
    /// in; `None` for any other key.
    pub fn tenant_of(&self, key: &str) -> Option<TenantId> {
        let rest = key.strip_prefix(self.prefix.as_str())?.strip_prefix(":{t")?;
        let (id, _) = rest.split_once('}')?;
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        TenantId::new(id.parse().ok()?).ok()
    }

    fn tenant(&self, t: TenantId, suffix: &str) -> String {
        format!("{}:{{{}}}:{suffix}", self.prefix, self.tenant_tag(t))
    }

    fn global(&self, suffix: &str) -> String {
        format!("{}:{{{GLOBAL_TAG}}}:{suffix}", self.prefix)
    }

    /// The fence of the slot with hash tag `tag`: the highest projector
    /// token that wrote there. A tenant belongs to one partition, so its
    /// fence is the tenant's; every partition writes the locator shards,
    /// so each has its own fence there.
    pub fn fence_of_tag(&self, tag: &str) -> String {
        if tag.starts_with('t') {
            format!("{}:{{{tag}}}:fence", self.prefix)
        } else {
            format!("{}:{{{tag}}}:fence:{}", self.prefix, self.partition)
        }
    }

    pub fn zset(&self, t: TenantId, status: StatusKey) -> String {
        self.tenant(t, &format!("z:{}", status.get()))
    }
    pub fn docs(&self, t: TenantId) -> String {
        self.tenant(t, "doc")
    }
    /// How many of the first ranks of each status's ZSET hold their
    /// document (status -> count): the *document window*.
    pub fn windows(&self, t: TenantId) -> String {
        self.tenant(t, "dw")
    }
    pub fn statuses(&self, t: TenantId) -> String {
        self.tenant(t, "st")
    }
    pub fn meta(&self, t: TenantId) -> String {
        self.tenant(t, "meta")
    }
    /// The tenant's write counter: every script that changes its calls
    /// bumps it, so a read spanning two round trips can tell whether a
    /// write landed in between.
    pub fn version(&self, t: TenantId) -> String {
        self.tenant(t, "ver")
    }
    /// A stamp that changes whenever the tenant's own statuses change.
    pub fn status_stamp(&self, t: TenantId) -> String {
        self.tenant(t, "stv")
    }
    /// The highest projector token that wrote this tenant.
    pub fn fence(&self, t: TenantId) -> String {
        self.tenant(t, "fence")
    }
    /// The tenant's state and format mark ([`crate::TenantState`]).
    pub fn state(&self, t: TenantId) -> String {
        self.tenant(t, "state")
    }
    pub fn fence_seq(&self) -> String {
        self.global("fence_seq")
    }
    /// A SCAN pattern for the status ZSETs of `t`.
    pub fn zset_pattern(&self, t: TenantId) -> String {
        self.tenant(t, "z:*")
    }
    /// The keys of `t`'s calls besides its ZSETs (not its statuses, which
    /// the projector keeps for every tenant).
    pub fn tenant_call_keys(&self, t: TenantId) -> [String; 3] {
        [self.docs(t), self.windows(t), self.meta(t)]
    }

    pub fn global_statuses(&self) -> String {
        self.global("st")
    }
    pub fn users(&self) -> String {
        self.global("users")
    }
    /// A stamp that changes whenever a global status changes.
    pub fn global_status_stamp(&self) -> String {
        self.global("stv")
    }
    /// A stamp that changes whenever a user changes.
    pub fn users_stamp(&self) -> String {
        self.global("uv")
    }
    pub fn user_loc(&self) -> String {
        self.global("uloc")
    }
    pub fn status_loc(&self) -> String {
        self.global(&format!("sloc:{}", self.partition))
    }
    /// The bucket holding a call's locator: one of [`CALL_LOC_BUCKETS`]
    /// small hashes, so that Redis keeps each one compact (listpack) up to
    /// a few million calls in all. The field is [`DocKey::to_bytes`].
    pub fn call_loc(&self, doc: &DocKey) -> String {
        let bucket = fnv1a(doc.as_str().as_bytes()) % CALL_LOC_BUCKETS;
        format!("{}:{{l{}}}:cl:{}:{bucket}", self.prefix, bucket % LOC_SHARDS, self.partition)
    }
    /// Tenants that may have a state: an index for listing them.
    pub fn tenants(&self) -> String {
        self.global("tenants")
    }
    pub fn epoch(&self) -> String {
        self.global("epoch")
    }
    pub fn commands(&self) -> String {
        self.global("cmdq")
    }
    pub fn job(&self, id: &str) -> String {
        self.global(&format!("job:{id}"))
    }
    /// The read model's format ([`SCHEMA`]), set when the projector builds it.
    pub fn schema(&self) -> String {
        self.global(&format!("schema:{}", self.partition))
    }
    /// The settings the partition's data was stored with ([`crate::Fingerprint`]).
    pub fn fingerprint(&self) -> String {
        self.global(&format!("settings:{}", self.partition))
    }
    pub fn checkpoint(&self) -> String {
        self.global(&format!("ckpt:{}", self.partition))
    }
    pub fn lease(&self) -> String {
        self.global(&format!("lease:{}", self.partition))
    }
    /// How far partition `p` has applied the stream ([`callboard_domain::Watermark`]).
    pub fn as_of(&self) -> String {
        self.global(&format!("asof:{}", self.partition))
    }
    /// The durability marker of this partition under hash tag `tag` (one
    /// per master): the sequence of the last batch whose writes preceded it.
    pub fn marker(&self, tag: &str) -> String {
        format!("{}:{{{tag}}}:seq:{}", self.prefix, self.partition)
    }
    /// Projector processes, by the time of their last heartbeat (ms).
    pub fn members(&self) -> String {
        self.global("members")
    }

    /// Tenants quarantined by a poison event, with the event.
    pub fn poison(&self) -> String {
        self.global("poison")
    }

    pub fn progress(&self) -> String {
        self.global("progress")
    }
    /// Every key under the prefix.
    pub fn everything_pattern(&self) -> String {
        format!("{}:*", self.prefix)
    }

    /// The kind of a key named by these [`Keys`] (any partition's), or
    /// `None` for a key outside the schema.
    pub fn kind_of(&self, key: &str) -> Option<KeyKind> {
        let rest = key.strip_prefix(self.prefix.as_str())?.strip_prefix(':')?;
        let tag = tag_of(rest).filter(|_| rest.starts_with('{'))?;
        let suffix = rest[tag.len() + 2..].strip_prefix(':')?;
        let (head, tail) = match suffix.split_once(':') {
            Some((head, tail)) => (head, Some(tail)),
            None => (suffix, None),
        };
        let numbered = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        // A tag's class, then its number (`{g}` alone has none).
        let (class, number) = tag.split_at_checked(1)?;
        let kind = match (class, if tag == GLOBAL_TAG { true } else { numbered(number) }) {
            ("t", true) => match (head, tail) {
                ("z", Some(status)) => status.parse::<i64>().ok().map(|_| KeyKind::StatusCalls)?,
                ("doc", None) => KeyKind::Documents,
                ("dw", None) => KeyKind::Windows,
                ("st", None) => KeyKind::TenantStatuses,
                ("meta", None) => KeyKind::TenantMeta,
                ("ver", None) => KeyKind::TenantVersion,
                ("state", None) => KeyKind::TenantState,
                ("stv", None) => KeyKind::TenantStatusStamp,
                ("fence", None) => KeyKind::TenantFence,
                _ => return None,
            },
            ("l", true) => match (head, tail) {
                ("cl", Some(_)) => KeyKind::CallLocators,
                ("fence", Some(_)) => KeyKind::ShardFence,
                _ => return None,
            },
            ("m", true) => match (head, tail) {
                ("seq", Some(_)) => KeyKind::DurabilityMarker,
                ("fence", Some(_)) => KeyKind::ShardFence,
                _ => return None,
            },
            ("g", true) if number.is_empty() => match (head, tail) {
                ("st", None) => KeyKind::GlobalStatuses,
                ("users", None) => KeyKind::Users,
                ("uloc", None) => KeyKind::UserLocators,
                ("sloc", Some(_)) => KeyKind::StatusLocators,
                (
                    "stv" | "uv" | "tenants" | "epoch" | "cmdq" | "members" | "fence_seq" | "progress" | "poison",
                    None,
                )
                | ("job" | "settings" | "schema" | "ckpt" | "lease" | "asof", Some(_)) => KeyKind::ProjectorState,
                _ => return None,
            },
            _ => return None,
        };
        Some(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_claims_what_its_partition_and_partition_0_have_both_applied() {
        use callboard_domain::{ClusterTime, Watermark};
        let partitioning = Partitioning::new(3);
        let at = |at_ms, s| Watermark { at_ms, through: Some(ClusterTime { seconds: s, increment: 0 }) };
        let marks = [at(100, 9), at(500, 5), at(500, 5)];
        let tenant = |p| (1..).map(|t| TenantId::new(t).unwrap()).find(|t| partitioning.of(*t) == p).unwrap();
        assert_eq!(partitioning.claim(tenant(0), &marks), at(100, 9));
        // Partition 0 (the users, the global statuses) lags: so does the answer.
        assert_eq!(partitioning.claim(tenant(1), &marks), at(100, 5));
        assert_eq!(partitioning.claim(tenant(2), &marks[..1]), Watermark { at_ms: 0, through: None });
    }

    #[test]
    fn tenant_keys_share_a_hash_tag() {
        let k = Keys::new("cb");
        let t = TenantId::new(6).unwrap();
        for key in [k.zset(t, StatusKey::new(1)), k.docs(t), k.windows(t), k.statuses(t), k.meta(t)] {
            assert!(key.starts_with("cb:{t6}:"), "{key}");
        }
        assert_eq!(k.zset(t, StatusKey::new(-2)), "cb:{t6}:z:-2");
        assert!(k.users().starts_with("cb:{g}:"));
        let d = DocKey::from_stored("65f0a0a0a0a0a0a0a0a0a0a0".into());
        assert_eq!(k.call_loc(&d), k.call_loc(&d.clone()));
        assert!(k.call_loc(&d).starts_with("cb:{l"));
        assert_ne!(k.call_loc(&d), k.in_partition(1).call_loc(&d));
        assert_eq!(tag_of(&k.call_loc(&d)), tag_of(&k.in_partition(1).call_loc(&d)));
        assert_ne!(k.fence_of_tag("l3"), k.in_partition(1).fence_of_tag("l3"));
        assert_eq!(k.fence_of_tag("t6"), k.in_partition(1).fence_of_tag("t6"));
        assert_eq!(tag_of(&k.zset(t, StatusKey::new(1))), Some("t6"));
        assert_eq!(tag_of(&k.users()), Some("g"));
        assert_eq!(k.fence_of_tag("t6"), k.fence(t));
        assert_eq!(tag_of("no tag"), None);
        assert_eq!(tag_of("a{}b"), None);
    }

    #[test]
    fn every_key_of_the_schema_is_told_by_its_kind() {
        let k = Keys::new("cb").in_partition(2);
        let t = TenantId::new(6).unwrap();
        let d = DocKey::from_stored("65f0a0a0a0a0a0a0a0a0a0a0".into());
        let cases = [
            (k.zset(t, StatusKey::new(-2)), KeyKind::StatusCalls),
            (k.docs(t), KeyKind::Documents),
            (k.windows(t), KeyKind::Windows),
            (k.statuses(t), KeyKind::TenantStatuses),
            (k.meta(t), KeyKind::TenantMeta),
            (k.version(t), KeyKind::TenantVersion),
            (k.state(t), KeyKind::TenantState),
            (k.status_stamp(t), KeyKind::TenantStatusStamp),
            (k.fence(t), KeyKind::TenantFence),
            (k.call_loc(&d), KeyKind::CallLocators),
            (k.fence_of_tag("l17"), KeyKind::ShardFence),
            (k.fence_of_tag("m3"), KeyKind::ShardFence),
            (k.marker("m3"), KeyKind::DurabilityMarker),
            (k.global_statuses(), KeyKind::GlobalStatuses),
            (k.users(), KeyKind::Users),
            (k.user_loc(), KeyKind::UserLocators),
            (k.status_loc(), KeyKind::StatusLocators),
        ];
        for (key, kind) in &cases {
            assert_eq!(k.kind_of(key), Some(*kind), "{key}");
            assert_eq!(Keys::new("cb").kind_of(key), Some(*kind), "{key} from another partition's keys");
        }
        let own = [
            k.fence_seq(),
            k.global_status_stamp(),
            k.users_stamp(),
            k.tenants(),
            k.epoch(),
            k.commands(),
            k.job("j1"),
            k.schema(),
            k.fingerprint(),
            k.checkpoint(),
            k.lease(),
            k.as_of(),
            k.members(),
            k.poison(),
            k.progress(),
        ];
        for key in &own {
            assert_eq!(k.kind_of(key), Some(KeyKind::ProjectorState), "{key}");
        }
        let kinds: std::collections::BTreeSet<_> = cases.iter().map(|c| c.1.pattern()).collect();
        assert_eq!(kinds.len(), cases.len() - 1, "one pattern per kind");
        for foreign in [
            "other:{t6}:doc",
            "cb:{t6}:docs",
            "cb:{t6}:z:one",
            "cb:{tx}:doc",
            "cb:{t}:doc",
            "cb:t6:doc",
            "cb:{g}:nope",
            "cb:{l3}:cl",
            "cb:{q1}:seq:0",
            "cbx:{g}:users",
            "cb:{g}",
            "cb:{g5}:users",
            "cb:{é}:doc",
            "cb:{té}:doc",
        ] {
            assert_eq!(k.kind_of(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn a_tenants_keys_name_their_tenant() {
        let k = Keys::new("cb");
        let t = TenantId::new(61).unwrap();
        for key in [k.state(t), k.status_stamp(t), k.version(t), k.zset(t, StatusKey::new(3)), k.docs(t)] {
            assert_eq!(k.tenant_of(&key), Some(t), "{key}");
        }
        for key in [k.users_stamp(), k.global_status_stamp(), k.schema(), k.fence_of_tag("l3")] {
            assert_eq!(k.tenant_of(&key), None, "{key}");
        }
        assert_eq!(Keys::new("other").tenant_of(&k.state(t)), None, "another prefix");
        for key in ["cb:{t}:state", "cb:{t-1}:state", "cb:{t6x}:state", "cb:{t99999999999999999999}:ver", "cb:{t6"] {
            assert_eq!(k.tenant_of(key), None, "{key}");
        }
    }

    #[test]
    fn tenants_spread_over_partitions_stably() {
        let p = Partitioning::new(4);
        let mut counts = [0u32; 4];
        for t in 1..=1000 {
            let t = TenantId::new(t).unwrap();
            assert_eq!(p.of(t), p.of(t));
            counts[p.of(t) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (150..350).contains(c)), "{counts:?}");
        assert_eq!(Partitioning::new(1).of(TenantId::new(77).unwrap()), 0);
        assert_eq!(Partitioning::new(0).count(), 1);
    }

    #[test]
    fn locators_spread_over_every_shard() {
        let k = Keys::new("cb");
        let mut shards = std::collections::BTreeMap::new();
        for i in 0..100_000 {
            let d = DocKey::from_stored(format!("{:024x}", i as u128 * 7_919));
            *shards.entry(tag_of(&k.call_loc(&d)).unwrap().to_string()).or_insert(0u64) += 1;
        }
        assert_eq!(shards.len() as u64, LOC_SHARDS);
        let (min, max) = (shards.values().min().unwrap(), shards.values().max().unwrap());
        assert!(*max < *min * 2, "shards between {min} and {max} locators");
    }
}
