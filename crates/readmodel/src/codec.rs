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
    pub place: Place,
    /// `start_time` in ms, `None` when undated.
    pub start_ms: Option<i64>,
    /// `<owner>,<user>,<assignee>|<call JSON without details>`.
    pub stored: String,
}

/// Where a call is held: its tenant, its status, and its `id` (which,
/// with the `_id`, makes its ZSET member). Locators hold places, so a
/// call's old member can be removed without any per-tenant index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Place {
    pub tenant: TenantId,
    pub status: StatusKey,
    pub id: CallId,
}

impl Place {
    /// `<tenant>:<status>:<id>`.
    pub fn encode(&self) -> String {
        format!("{}:{}:{}", self.tenant.get(), self.status.get(), self.id.get())
    }

    pub fn decode(s: &str) -> Option<Self> {
        let mut parts = s.split(':');
        let tenant = TenantId::new(parts.next()?.parse().ok()?).ok()?;
        let status = StatusKey::new(parts.next()?.parse().ok()?);
        let id = CallId::new(parts.next()?.parse().ok()?);
        parts.next().is_none().then_some(Self { tenant, status, id })
    }

    /// A locator value: places separated by commas.
    pub fn encode_all<'a>(places: impl IntoIterator<Item = &'a Place>) -> String {
        places.into_iter().map(Place::encode).collect::<Vec<_>>().join(",")
    }

    pub fn decode_all(s: &str) -> Option<std::collections::BTreeSet<Place>> {
        s.split(',').filter(|p| !p.is_empty()).map(Place::decode).collect()
    }
}

impl CallEntry {
    pub fn score(&self) -> f64 {
        self.start_ms.map(|ms| ms as f64).unwrap_or(UNDATED)
    }

    pub fn member(&self) -> Vec<u8> {
        member(self.place.id, &self.doc)
    }
}

/// The ZSET member of a call: its id as 8 big-endian bytes with the sign
/// bit flipped (so that Redis's byte-wise tie-break on equal scores is `id`
/// order), then its `_id` in [`DocKey::to_bytes`] form (so that two calls
/// never share a member). 21 bytes for an ObjectId.
pub fn member(id: CallId, doc: &DocKey) -> Vec<u8> {
    let mut out = ((id.get() as u64) ^ (1 << 63)).to_be_bytes().to_vec();
    out.extend(doc.to_bytes());
    out
}

/// A member's call id and `_id`.
pub fn member_parts(member: &[u8]) -> Option<(CallId, DocKey)> {
    let (id, doc) = member.split_at_checked(8)?;
    let id = CallId::new((u64::from_be_bytes(id.try_into().ok()?) ^ (1 << 63)) as i64);
    Some((id, DocKey::from_bytes(doc)?))
}

pub fn member_call_id(member: &[u8]) -> Option<CallId> {
    let id = member.get(..8)?;
    Some(CallId::new((u64::from_be_bytes(id.try_into().ok()?) ^ (1 << 63)) as i64))
}

/// The stored form of a call document, whatever its state:
/// `<owner>,<user>,<assignee>|<call JSON without _id and details>`.
pub fn stored_call(call: &Document) -> Option<String> {
    let refs: Vec<String> = render::USER_REFERENCES
        .iter()
        .map(|(field, _)| call.get(*field).and_then(UserId::from_bson).map(|u| u.get().to_string()).unwrap_or_default())
        .collect();
    let base = render::call_base_json(call).ok()?;
    Some(format!("{}|{base}", refs.join(",")))
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
        Some(Self { place: Place { tenant, status, id }, doc, start_ms: order.start_ms, stored: stored_call(call)? })
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
        assert_eq!(e.place.tenant.get(), 6);
        assert_eq!(e.place.status.get(), 2);
        assert_eq!(e.start_ms, Some(1_000));
        assert_eq!(member_parts(&e.member()), Some((CallId::new(7), DocKey::from_bson(&oid.into()))));
        assert_eq!(e.member().len(), 21);
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
        fn member_order_is_id_order(a in any::<i64>(), b in any::<i64>(), raw in any::<[u8; 12]>()) {
            let d = DocKey::from_bson(&bson::Bson::ObjectId(ObjectId::from_bytes(raw)));
            prop_assert_eq!(member(CallId::new(a), &d).cmp(&member(CallId::new(b), &d)), a.cmp(&b));
            prop_assert_eq!(member_parts(&member(CallId::new(a), &d)), Some((CallId::new(a), d)));
        }

        #[test]
        fn places_round_trip(t in 0i64..i64::MAX, s in any::<i64>(), id in any::<i64>(), more in any::<bool>()) {
            let p = Place { tenant: TenantId::new(t).unwrap(), status: StatusKey::new(s), id: CallId::new(id) };
            prop_assert_eq!(Place::decode(&p.encode()), Some(p));
            let mut all: std::collections::BTreeSet<Place> = [p].into();
            if more {
                all.insert(Place { id: CallId::new(id.wrapping_add(1)), ..p });
            }
            prop_assert_eq!(Place::decode_all(&Place::encode_all(&all)), Some(all));
        }
    }
}
