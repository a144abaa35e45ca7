//! Per-process copies of what every read needs but rarely changes: each
//! tenant's visible statuses and the cached users. Each copy is labelled
//! with the stamp Redis held when it was read (`P:{tN}:stv`, `P:{g}:stv`,
//! `P:{g}:uv`); every read fetches the current stamps in the same atomic
//! round trip as the calls and uses a copy only when its label matches, so
//! a copy is never used after the data under it changed.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use callboard_domain::{Status, TenantId, UserId};

/// The stamps a read saw, in one atomic step with its calls.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stamps {
    pub global_statuses: Option<String>,
    pub tenant_statuses: Option<String>,
    pub users: Option<String>,
}

/// One tenant's visible statuses, as of two status stamps.
#[derive(Debug)]
pub struct TenantStatuses {
    pub global_stamp: Option<String>,
    pub tenant_stamp: Option<String>,
    pub visible: Vec<Status>,
}

impl TenantStatuses {
    pub fn is_current(&self, stamps: &Stamps) -> bool {
        self.global_stamp == stamps.global_statuses && self.tenant_stamp == stamps.tenant_statuses
    }
}

/// Cached users keyed by id, as stored (`<tenant>|<JSON>`), `None` when
/// Redis has no such user.
#[derive(Debug, Default)]
struct Users {
    stamp: Option<String>,
    by_id: HashMap<UserId, Option<Arc<str>>>,
}

/// The most users one process keeps before it starts over.
const MAX_USERS: usize = 200_000;
/// The most tenants' statuses one process keeps before it starts over.
const MAX_TENANTS: usize = 100_000;

#[derive(Debug, Default, Clone)]
pub struct LocalCopies {
    statuses: Arc<RwLock<HashMap<TenantId, Arc<TenantStatuses>>>>,
    users: Arc<RwLock<Users>>,
}

impl LocalCopies {
    pub fn statuses(&self, tenant: TenantId) -> Option<Arc<TenantStatuses>> {
        self.statuses.read().ok()?.get(&tenant).cloned()
    }

    pub fn put_statuses(&self, tenant: TenantId, entry: TenantStatuses) -> Arc<TenantStatuses> {
        let entry = Arc::new(entry);
        if let Ok(mut map) = self.statuses.write() {
            if map.len() >= MAX_TENANTS {
                map.clear();
            }
            map.insert(tenant, entry.clone());
        }
        entry
    }

    /// The cached users among `ids` if the copy is labelled `stamp`, and
    /// the ids it lacks (all of them under another stamp; [`Self::put_users`]
    /// then starts the copy over).
    pub fn users(
        &self,
        stamp: &Option<String>,
        ids: impl IntoIterator<Item = UserId>,
    ) -> (HashMap<UserId, Option<Arc<str>>>, Vec<UserId>) {
        let (mut found, mut missing) = (HashMap::new(), Vec::new());
        let Ok(users) = self.users.read() else { return (found, ids.into_iter().collect()) };
        let current = users.stamp == *stamp;
        for id in ids {
            match users.by_id.get(&id).filter(|_| current) {
                Some(u) => {
                    found.insert(id, u.clone());
                }
                None => missing.push(id),
            }
        }
        (found, missing)
    }

    /// Remembers users read after seeing `stamp`. Values read after a
    /// newer write are harmless: that write replaced the stamp, so the next
    /// read drops this copy.
    pub fn put_users(&self, stamp: &Option<String>, read: impl IntoIterator<Item = (UserId, Option<Arc<str>>)>) {
        let Ok(mut users) = self.users.write() else { return };
        if users.stamp != *stamp || users.by_id.len() >= MAX_USERS {
            users.stamp = stamp.clone();
            users.by_id.clear();
        }
        users.by_id.extend(read);
    }
}
