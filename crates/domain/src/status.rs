use bson::{Bson, Document};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{integral, DocKey, StatusKey, TenantId};
use crate::render::bson_to_json;

/// A call status as shown to tenants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub key: StatusKey,
    pub name: Value,
    pub description: Value,
    pub color: Value,
}

/// A live `call_status` document: whose it is (one tenant's, or everyone's
/// when `tenant_id` is missing or null) and what it shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusRecord {
    /// The document's `_id`, which breaks ties between documents of one
    /// scope with the same status key.
    pub doc: DocKey,
    /// `None`: global.
    pub tenant: Option<TenantId>,
    pub status: Status,
}

/// Where a `call_status` document's `tenant_id` puts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusScope {
    Global,
    Tenant(TenantId),
    /// A `tenant_id` that is not a valid tenant: shown to nobody.
    Nobody,
}

impl StatusRecord {
    /// `None` when the document is deleted, or has no usable id or scope.
    pub fn from_document(doc: &Document) -> Option<Self> {
        if is_deleted(doc) {
            return None;
        }
        let tenant = match Self::scope(doc) {
            StatusScope::Global => None,
            StatusScope::Tenant(t) => Some(t),
            StatusScope::Nobody => return None,
        };
        let field = |name: &str| doc.get(name).map(bson_to_json).unwrap_or(Value::Null);
        Some(Self {
            doc: DocKey::from_bson(doc.get("_id")?),
            tenant,
            status: Status {
                key: StatusKey::from_bson(doc.get("id")?)?,
                name: field("name"),
                description: field("description"),
                color: field("color"),
            },
        })
    }

    pub fn scope(doc: &Document) -> StatusScope {
        match doc.get("tenant_id") {
            None | Some(Bson::Null) => StatusScope::Global,
            Some(t) => {
                integral(t).and_then(|t| TenantId::new(t).ok()).map(StatusScope::Tenant).unwrap_or(StatusScope::Nobody)
            }
        }
    }
}

impl Status {
    /// The statuses `tenant` sees, ordered by status key, from `call_status`
    /// documents in any order.
    ///
    /// A document is live unless `deleted` is 1; it is global when it has
    /// no `tenant_id` (or a null one). A tenant's own status shadows a global
    /// one with the same key; among documents of one scope the smallest
    /// `_id` wins. Documents without a usable id, or of other tenants, are
    /// skipped.
    pub fn visible_to<'a>(docs: impl IntoIterator<Item = &'a Document>, tenant: TenantId) -> Vec<Status> {
        Self::visible(docs.into_iter().filter_map(StatusRecord::from_document), tenant)
    }

    /// [`Status::visible_to`] over records already parsed (the read model's).
    pub fn visible(records: impl IntoIterator<Item = StatusRecord>, tenant: TenantId) -> Vec<Status> {
        let mut candidates: Vec<(StatusKey, bool, DocKey, Status)> = records
            .into_iter()
            .filter(|r| r.tenant.is_none() || r.tenant == Some(tenant))
            .map(|r| (r.status.key, r.tenant.is_none(), r.doc, r.status))
            .collect();
        // Per key: the tenant's own first (false < true), then by _id.
        candidates.sort_by(|a, b| (a.0, a.1, &a.2).cmp(&(b.0, b.1, &b.2)));
        candidates.dedup_by_key(|c| c.0);
        candidates.into_iter().map(|c| c.3).collect()
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
            doc! {"_id": 1, "id": 2, "name": "Global two"},
            doc! {"_id": 2, "id": "2", "name": "Six's two", "tenant_id": 6},
            doc! {"_id": 3, "id": 1, "name": "One"},
            doc! {"_id": 4, "id": 3, "name": "Gone", "deleted": 1},
            doc! {"_id": 5, "id": 4, "name": "Other tenant", "tenant_id": 7},
            doc! {"_id": 6, "id": "x", "name": "No id"},
            doc! {"_id": 7, "id": 5, "name": "Null tenant", "tenant_id": null, "deleted": 0},
            doc! {"_id": 8, "id": 5, "name": "Later duplicate"},
            doc! {"_id": 9, "id": 6, "name": "Bad tenant", "tenant_id": "6"},
        ];
        let seen: Vec<(i64, Value)> =
            Status::visible_to(&docs, t6).into_iter().map(|s| (s.key.get(), s.name)).collect();
        assert_eq!(seen, vec![(1, "One".into()), (2, "Six's two".into()), (5, "Null tenant".into())]);
        let mut reversed = docs.clone();
        reversed.reverse();
        assert_eq!(Status::visible_to(&reversed, t6), Status::visible_to(&docs, t6));
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
