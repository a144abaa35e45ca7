//! What the projector plans: per-tenant and shared operations, and the
//! state it reads before planning.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use callboard_domain::{DocKey, TenantId, UserId};

use crate::codec::{CallEntry, Place};
use crate::keys::Partitioning;
use crate::TenantState;

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
    /// The states of the tenants the batch may put calls in.
    pub tenants: HashMap<TenantId, TenantState>,
    /// What the planning projector partition owns.
    pub scope: Scope,
}

impl StateView {
    /// A tenant's state, as far as this partition goes: a tenant another
    /// partition projects is cold here.
    pub fn tenant_state(&self, t: TenantId) -> TenantState {
        if !self.scope.owns_tenant(t) {
            return TenantState::Cold;
        }
        self.tenants.get(&t).copied().unwrap_or(TenantState::Cold)
    }
}

/// The tenants (and, for partition 0, the users and global statuses) one
/// projector partition projects. Every partition reads every event and
/// applies what falls in its scope, with locators of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scope {
    pub partition: u32,
    pub partitioning: Partitioning,
}

impl Default for Scope {
    /// Everything: one partition.
    fn default() -> Self {
        Self { partition: 0, partitioning: Partitioning::new(1) }
    }
}

impl Scope {
    pub fn owns_tenant(&self, t: TenantId) -> bool {
        self.partitioning.of(t) == self.partition
    }

    /// Users and global statuses.
    pub fn owns_globals(&self) -> bool {
        Partitioning::owns_globals(self.partition)
    }

    pub fn owns_status_place(&self, place: &StatusPlace) -> bool {
        match place.parse::<i64>().ok().and_then(|t| TenantId::new(t).ok()) {
            Some(t) => self.owns_tenant(t),
            None => self.owns_globals(),
        }
    }
}

/// Which locator hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locator {
    Call,
    User,
    Status,
}

pub(crate) fn encode_places<T: ToString>(places: impl IntoIterator<Item = T>) -> String {
    places.into_iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",")
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
