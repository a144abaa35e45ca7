//! Typed values that cross Redis besides calls, users and statuses: a
//! tenant's state (with the format mark), the projector's commands, and
//! warm jobs' field names. Each has one encoding and one parser.

use callboard_domain::TenantId;

use crate::keys::SCHEMA;

/// Whether a tenant's calls are in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantState {
    Cold,
    /// A snapshot is being loaded (or queued), generation `epoch`.
    Warming(u64),
    /// Snapshot loaded and the stream applied on top: reads are served.
    Warm(u64),
    /// A write of the tenant failed every time (a poison event): its calls
    /// were removed and it is answered live, and not warmed again until an
    /// operator asks (`POST /admin/cache/warm`).
    Quarantined,
}

impl TenantState {
    /// `<schema>:warm:<epoch>`, or `<schema>:warming:<epoch>:<job>` (job `-`
    /// for none). A state written in another format, or none, is cold: a
    /// reader never serves data of another format.
    pub fn parse(raw: Option<&str>) -> Self {
        let Some(rest) = raw.and_then(|r| r.strip_prefix(SCHEMA)).and_then(|r| r.strip_prefix(':')) else {
            return TenantState::Cold;
        };
        let mut parts = rest.split(':');
        let (kind, epoch) = (parts.next(), parts.next().and_then(|e| e.parse().ok()));
        match (kind, epoch) {
            (Some("warm"), Some(e)) => TenantState::Warm(e),
            (Some("warming"), Some(e)) => TenantState::Warming(e),
            (Some("quarantined"), None) => TenantState::Quarantined,
            _ => TenantState::Cold,
        }
    }

    /// The warm job recorded with a `warming` state, if any.
    pub fn job_of(raw: &str) -> Option<String> {
        let rest = raw.strip_prefix(SCHEMA)?.strip_prefix(":warming:")?;
        rest.split_once(':').map(|(_, job)| job.to_string()).filter(|j| j != "-")
    }

    /// A `warming` state of `epoch` for `job`.
    pub fn encode_warming(epoch: u64, job: Option<&str>) -> String {
        format!("{}{}", Self::warming_prefix(epoch), job.unwrap_or("-"))
    }

    /// What every state of this format starts with.
    pub fn format_prefix() -> String {
        format!("{SCHEMA}:")
    }

    /// What every `warming` state of `epoch` starts with.
    pub fn warming_prefix(epoch: u64) -> String {
        format!("{SCHEMA}:warming:{epoch}:")
    }

    pub fn encode_warm(epoch: u64) -> String {
        format!("{SCHEMA}:warm:{epoch}")
    }

    pub fn encode_quarantined() -> String {
        format!("{SCHEMA}:quarantined")
    }

    pub fn name(self) -> &'static str {
        match self {
            TenantState::Cold => "cold",
            TenantState::Warming(_) => "warming",
            TenantState::Warm(_) => "warm",
            TenantState::Quarantined => "quarantined",
        }
    }

    /// Whether the projector maintains this tenant's calls.
    pub fn is_maintained(self) -> bool {
        matches!(self, TenantState::Warming(_) | TenantState::Warm(_))
    }
}

/// The settings that shape what a partition stores: the user fields kept
/// for each user (partition 0 stores the users), and the document window.
/// A projector finding other ones re-stores the users or rebuilds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Fingerprint {
    /// `None` in a record without it (a field added later reads as unknown).
    #[serde(default)]
    pub user_fields: Option<Vec<String>>,
    #[serde(default)]
    pub doc_window: Option<u64>,
}

/// A write Redis rejected every time, and the tenant it quarantined (kept
/// in `P:{g}:poison`, one per tenant, until the tenant is warm again).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoisonEvent {
    pub tenant_id: i64,
    /// The change event's resume token (`_id`), as extended JSON.
    pub event_id: String,
    /// `insert`, `update`, `replace`, `delete`...
    pub operation: String,
    /// The changed document's `_id`, as extended JSON.
    pub document_key: String,
    /// Redis's error.
    pub error: String,
    /// When it was quarantined (ms since the epoch).
    pub at_ms: i64,
}

/// A command for the active projector, queued in `P:{g}:cmdq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Load a snapshot of `tenant` for warm generation `epoch`.
    Warm { tenant: TenantId, epoch: u64, job: Option<String> },
    /// Remove the calls of `tenant`, if it is still cold.
    Purge { tenant: TenantId },
    /// Rebuild partition `partition` (its warm tenants are warmed again):
    /// queued by verification when the partition's shared data (users and
    /// global statuses for partition 0, its tenants' own statuses) differs
    /// from MongoDB's.
    Rebuild { partition: u32 },
}

impl Command {
    /// `warm <tenant> <epoch> <job or ->`, `purge <tenant>` or `rebuild <partition>`.
    pub fn encode(&self) -> String {
        match self {
            Command::Warm { tenant, epoch, job } => {
                format!("warm {} {epoch} {}", tenant.get(), job.as_deref().unwrap_or("-"))
            }
            Command::Purge { tenant } => format!("purge {}", tenant.get()),
            Command::Rebuild { partition } => format!("rebuild {partition}"),
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        let tenant = |t: &str| t.parse().ok().and_then(|t| TenantId::new(t).ok());
        match raw.split(' ').collect::<Vec<_>>().as_slice() {
            ["warm", t, epoch, job] => Some(Command::Warm {
                tenant: tenant(t)?,
                epoch: epoch.parse().ok()?,
                job: (*job != "-").then(|| job.to_string()).filter(|j| is_job_id(j)),
            }),
            ["purge", t] => Some(Command::Purge { tenant: tenant(t)? }),
            ["rebuild", p] => Some(Command::Rebuild { partition: p.parse().ok()? }),
            _ => None,
        }
    }
}

/// Field names of a warm job's hash (`P:{g}:job:<id>`).
pub mod job {
    pub const TOTAL: &str = "total";
    pub const DONE: &str = "done";
    pub const CREATED_MS: &str = "created_ms";
}

/// The fields of a partition's watermark hash (`P:{g}:asof:<p>`).
pub mod as_of {
    /// Every change committed before this (ms since the epoch) is applied.
    pub const AT_MS: &str = "at_ms";
    /// Every change at or before this cluster time (seconds, increment).
    pub const THROUGH_S: &str = "through_s";
    pub const THROUGH_I: &str = "through_i";
}

/// Field names of the projectors' progress hash (`P:{g}:progress`) and of
/// a tenant's `P:{tN}:meta`.
pub mod progress {
    pub const HEARTBEAT_MS: &str = "heartbeat_ms";
    pub const LAST_EVENT_MS: &str = "last_event_ms";
    pub const LAG_MS: &str = "lag_ms";
    pub const EVENTS_APPLIED: &str = "events_applied";
    pub const WARMS: &str = "warms_total";
    pub const HISTORY_LOST: &str = "history_lost_total";
    pub const WINDOW_REFILLS: &str = "window_refills_total";
    pub const WRITES_LOST: &str = "writes_lost_total";
    pub const POISON_EVENTS: &str = "poison_events_total";
    /// The cluster time (s) of the oldest and newest oplog entries, as
    /// partition 0's leader last read them (absent: unknown).
    pub const OPLOG_FIRST_S: &str = "oplog_first_s";
    pub const OPLOG_LAST_S: &str = "oplog_last_s";
    /// Verifications that compared a tenant's cached answer with MongoDB's
    /// (by the projectors' background verifier and `POST /admin/cache/verify`).
    pub const RECONCILE_CHECKS: &str = "reconcile_checks_total";

    /// Differences of `kind` found by verification ([`RECONCILE_CHECKS`]).
    pub fn reconcile_drift(kind: &str) -> String {
        format!("{RECONCILE_DRIFT_PREFIX}{kind}")
    }
    pub const RECONCILE_DRIFT_PREFIX: &str = "reconcile_drift_total:";

    /// Where partition `p`'s checkpoint stands in the stream (ms): its
    /// last event's commit time, or the time an idle stream's position
    /// was saved.
    pub fn checkpoint_at(p: u32) -> String {
        format!("checkpoint_at_ms:{p}")
    }
}

/// Whether `id` is a warm job id (`w` and digits).
pub fn is_job_id(id: &str) -> bool {
    id.len() >= 2 && id.starts_with('w') && id[1..].bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_other_formats_are_cold() {
        assert_eq!(TenantState::parse(Some(&TenantState::encode_warm(7))), TenantState::Warm(7));
        let warming = TenantState::encode_warming(8, Some("w3"));
        assert_eq!(TenantState::parse(Some(&warming)), TenantState::Warming(8));
        assert_eq!(TenantState::job_of(&warming), Some("w3".into()));
        assert_eq!(TenantState::job_of(&TenantState::encode_warming(8, None)), None);
        assert!(warming.starts_with(&TenantState::warming_prefix(8)));
        for other in ["warm:7", "2:warm:7", "", "3:warm:x"] {
            assert_eq!(TenantState::parse(Some(other)), TenantState::Cold, "{other}");
        }
        assert_eq!(TenantState::parse(None), TenantState::Cold);
    }

    #[test]
    fn commands_round_trip() {
        let t = TenantId::new(6).unwrap();
        for c in [
            Command::Warm { tenant: t, epoch: 3, job: None },
            Command::Warm { tenant: t, epoch: 3, job: Some("w12".into()) },
            Command::Purge { tenant: t },
            Command::Rebuild { partition: 3 },
        ] {
            assert_eq!(Command::parse(&c.encode()), Some(c));
        }
        for bad in ["warm 6 x -", "purge -1", "warm 6 3", "drop 6", "rebuild x", "rebuild -1", ""] {
            assert_eq!(Command::parse(bad), None, "{bad}");
        }
    }
}
