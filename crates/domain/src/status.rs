use bson::{Bson, Document};
use serde_json::Value;

use crate::ids::{integral, StatusKey, TenantId};
use crate::render::bson_to_json;

/// A call status as shown to one tenant.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub key: StatusKey,
    pub name: Value,
    pub description: Value,
    pub color: Value,
}

/// Whose a `call_status` document is: one tenant's, or every tenant's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Tenant,
    Global,
}

impl Status {
    fn from_document(doc: &Document) -> Option<Self> {
        let field = |name: &str| doc.get(name).map(bson_to_json).unwrap_or(Value::Null);
        Some(Self {
            key: StatusKey::from_bson(doc.get("id")?)?,
            name: field("name"),
            description: field("description"),
            color: field("color"),
        })
    }

    /// The statuses `tenant` sees, ordered by status id, from `call_status`
    /// documents in `_id` order.
    ///
    /// A document is live unless `deleted` is 1; it is global when it has
    /// no `tenant_id` (or a null one). A tenant's own status shadows a global
    /// one with the same id; among documents of one scope the first wins.
    /// Documents without a usable id, or of other tenants, are skipped.
    pub fn visible_to<'a>(docs: impl IntoIterator<Item = &'a Document>, tenant: TenantId) -> Vec<Status> {
        let mut chosen: std::collections::BTreeMap<StatusKey, (Scope, Status)> = Default::default();
        for doc in docs {
            if is_deleted(doc) {
                continue;
            }
            let scope = match doc.get("tenant_id") {
                None | Some(Bson::Null) => Scope::Global,
                Some(t) if integral(t) == Some(tenant.get()) => Scope::Tenant,
                Some(_) => continue,
            };
            let Some(status) = Status::from_document(doc) else { continue };
            match chosen.get(&status.key) {
                Some((Scope::Tenant, _)) => {}
                Some((Scope::Global, _)) if scope == Scope::Global => {}
                _ => {
                    chosen.insert(status.key, (scope, status));
                }
            }
        }
        chosen.into_values().map(|(_, s)| s).collect()
    }
}

/// `deleted: 1` marks a soft-deleted document (any numeric 1, as MongoDB's
/// `{deleted: {$ne: 1}}` reads it); 0, missing or anything else is live.
pub fn is_deleted(doc: &Document) -> bool {
    doc.get("deleted").and_then(integral) == Some(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    #[test]
    fn tenant_status_shadows_global_and_deleted_ones_vanish() {
        let t6 = TenantId::new(6).unwrap();
        let docs = vec![
            doc! {"id": 2, "name": "Global two"},
            doc! {"id": "2", "name": "Six's two", "tenant_id": 6},
            doc! {"id": 1, "name": "One"},
            doc! {"id": 3, "name": "Gone", "deleted": 1},
            doc! {"id": 4, "name": "Other tenant", "tenant_id": 7},
            doc! {"id": "x", "name": "No id"},
            doc! {"id": 5, "name": "Null tenant", "tenant_id": null, "deleted": 0},
            doc! {"id": 5, "name": "Later duplicate"},
        ];
        let seen: Vec<(i64, Value)> =
            Status::visible_to(&docs, t6).into_iter().map(|s| (s.key.get(), s.name)).collect();
        assert_eq!(seen, vec![(1, "One".into()), (2, "Six's two".into()), (5, "Null tenant".into())]);
    }

    #[test]
    fn deleted_is_numeric_one_only() {
        assert!(is_deleted(&doc! {"deleted": 1}));
        assert!(is_deleted(&doc! {"deleted": 1_i64}));
        assert!(is_deleted(&doc! {"deleted": 1.0}));
        assert!(!is_deleted(&doc! {"deleted": 0}));
        assert!(!is_deleted(&doc! {"deleted": "1"}));
        assert!(!is_deleted(&doc! {"deleted": true}));
        assert!(!is_deleted(&doc! {}));
    }
}
