//! How calls, statuses and users are written into Redis values, and read
//! back. Pure functions; every encoding round-trips (tested below).

use bson::Document;
use callboard_domain::render::{self, UserFields};
use callboard_domain::{is_deleted, CallId, CallOrder, DocKey, StatusKey, TenantId, UserId};

/// The score of a call without a `start_time`: below every representable
/// date (JavaScript's limit is ±8.64e15 ms), exact as an f64.
pub const UNDATED: f64 = -1.0e16;

/// What the read model holds for one counted call.
#[derive(Debug, Clone, PartialEq)]
pub struct CallEntry {
    pub doc: DocKey,
    pub tenant: TenantId,
    pub index: IdxValue,
    /// `<owner>,<user>,<assignee>|<call JSON without details>`.
    pub stored: String,
}

/// A call's place in its tenant: the call state index entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxValue {
    pub status: StatusKey,
    /// `start_time` in ms, `None` when undated.
    pub start_ms: Option<i64>,
    pub member: String,
}

impl IdxValue {
    pub fn score(&self) -> f64 {
        self.start_ms.map(|ms| ms as f64).unwrap_or(UNDATED)
    }

    pub fn encode(&self) -> String {
        let start = self.start_ms.map(|ms| ms.to_string()).unwrap_or_else(|| "n".into());
        format!("{}|{start}|{}", self.status.get(), self.member)
    }

    pub fn decode(s: &str) -> Option<Self> {
        let mut parts = s.splitn(3, '|');
        let status = StatusKey::new(parts.next()?.parse().ok()?);
        let start_ms = match parts.next()? {
            "n" => None,
            ms => Some(ms.parse().ok()?),
        };
        Some(Self { status, start_ms, member: parts.next()?.to_string() })
    }
}

/// The ZSET member of a call: its id as 16 hex digits (so that Redis's
/// lexicographic tie-break on equal scores is `id` order), then its `_id`
/// (so that two calls never share a member).
pub fn member(id: CallId, doc: &DocKey) -> String {
    format!("{:016x}:{}", (id.get() as u64) ^ (1 << 63), doc)
}

pub fn member_call_id(member: &str) -> Option<CallId> {
    let hex = member.get(..16)?;
    u64::from_str_radix(hex, 16).ok().map(|n| CallId::new((n ^ (1 << 63)) as i64))
}

impl CallEntry {
    /// The entry of a call document, or `None` when the call counts nowhere:
    /// soft-deleted, or without an integer `id`, a valid `tenant_id` or a
    /// canonical `status_id`.
    pub fn from_document(call: &Document) -> Option<Self> {
        if is_deleted(call) {
            return None;
        }
        let doc = DocKey::from_bson(call.get("_id")?);
        let tenant = TenantId::new(CallId::from_bson(call.get("tenant_id")?)?.get()).ok()?;
        let status = StatusKey::from_bson(call.get("status_id")?)?;
        let id = CallId::from_bson(call.get("id")?)?;
        let order = CallOrder::of(call);
        let refs: Vec<String> = render::USER_REFERENCES
            .iter()
            .map(|(field, _)| {
                call.get(*field).and_then(UserId::from_bson).map(|u| u.get().to_string()).unwrap_or_default()
            })
            .collect();
        let base = serde_json::to_string(&render::call_base(call)).ok()?;
        Some(Self {
            index: IdxValue { status, start_ms: order.start_ms, member: member(id, &doc) },
            doc,
            tenant,
            stored: format!("{}|{base}", refs.join(",")),
        })
    }
}

/// A stored call split back into its user references and its JSON.
pub fn split_stored(stored: &str) -> Option<([Option<UserId>; 3], &str)> {
    let (refs, json) = stored.split_once('|')?;
    let mut out = [None; 3];
    for (slot, r) in out.iter_mut().zip(refs.split(',')) {
        *slot = r.parse().ok().map(UserId::new);
    }
    Some((out, json))
}

/// A user as cached: its id, and `<tenant>|<allowlisted JSON>` where the
/// tenant is empty for a user of no tenant. `None` when the document has no
/// integer id or an unusable `tenant_id` (such a user is shown to nobody).
pub fn user_entry(user: &Document, fields: &UserFields) -> Option<(UserId, String)> {
    let id = UserId::from_bson(user.get("id")?)?;
    let tenant = match user.get("tenant_id") {
        None | Some(bson::Bson::Null) => String::new(),
        Some(t) => TenantId::new(CallId::from_bson(t)?.get()).ok()?.get().to_string(),
    };
    Some((id, format!("{tenant}|{}", serde_json::to_string(&fields.project(user)).ok()?)))
}

/// A cached user's JSON if `tenant` may see it.
pub fn user_json_for(stored: &str, tenant: TenantId) -> Option<&str> {
    let (owner, json) = stored.split_once('|')?;
    (owner.is_empty() || owner.parse::<i64>().ok() == Some(tenant.get())).then_some(json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{doc, oid::ObjectId, DateTime};
    use proptest::prelude::*;

    #[test]
    fn entries_capture_what_the_response_needs() {
        let oid = ObjectId::new();
        let call = doc! {"_id": oid, "id": 7, "tenant_id": 6, "status_id": "2", "owner_id": 3, "assigned_to_id": 99,
        "start_time": DateTime::from_millis(1_000), "subject": "x"};
        let e = CallEntry::from_document(&call).unwrap();
        assert_eq!(e.tenant.get(), 6);
        assert_eq!(e.index.status.get(), 2);
        assert_eq!(e.index.start_ms, Some(1_000));
        assert_eq!(member_call_id(&e.index.member), Some(CallId::new(7)));
        let (refs, json) = split_stored(&e.stored).unwrap();
        assert_eq!(refs, [Some(UserId::new(3)), None, Some(UserId::new(99))]);
        assert!(!json.contains("\"_id\"") && json.contains("\"subject\":\"x\""));
        for uncounted in [
            doc! {"_id": 1, "id": 7, "tenant_id": 6, "status_id": 1, "deleted": 1},
            doc! {"_id": 1, "id": 7, "tenant_id": 6, "status_id": "01"},
            doc! {"_id": 1, "id": 7, "status_id": 1},
            doc! {"_id": 1, "tenant_id": 6, "status_id": 1},
        ] {
            assert_eq!(CallEntry::from_document(&uncounted), None, "{uncounted}");
        }
    }

    proptest! {
        #[test]
        fn member_order_is_id_order(a in any::<i64>(), b in any::<i64>()) {
            let d = DocKey::from_bson(&bson::Bson::Int32(1));
            prop_assert_eq!(member(CallId::new(a), &d).cmp(&member(CallId::new(b), &d)), a.cmp(&b));
            prop_assert_eq!(member_call_id(&member(CallId::new(a), &d)), Some(CallId::new(a)));
        }

        #[test]
        fn idx_values_round_trip(status in any::<i64>(), start in proptest::option::of(-8_640_000_000_000_000i64..8_640_000_000_000_000), m in "[0-9a-f]{16}:[ -~]{0,30}") {
            let v = IdxValue { status: StatusKey::new(status), start_ms: start, member: m };
            prop_assert_eq!(IdxValue::decode(&v.encode()), Some(v.clone()));
            prop_assert!(v.score() >= UNDATED);
        }
    }
}
