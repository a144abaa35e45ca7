//! From MongoDB documents to the response's JSON.
//!
//! Both the live aggregation and the read model render calls through these
//! functions, so that a cached answer and a live one are equal byte for byte.

use std::collections::HashMap;

use bson::{Bson, Document};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Number, Value};

use crate::ids::UserId;
pub use crate::response::{assemble, GroupCalls};

/// The call fields that name a user, and the response field that shows them.
pub const USER_REFERENCES: [(&str, &str); 3] =
    [("owner_id", "owner_details"), ("user_id", "user_details"), ("assigned_to_id", "assigned_to_details")];

/// A BSON value as plain JSON: dates as RFC 3339 UTC strings
/// (`2025-10-13T10:00:00Z`, with milliseconds only when they are not zero),
/// ObjectIds as hex strings, 64-bit and 32-bit integers as numbers.
pub fn bson_to_json(value: &Bson) -> Value {
    match value {
        Bson::Double(f) => Number::from_f64(*f).map(Value::Number).unwrap_or(Value::Null),
        Bson::String(s) => Value::String(s.clone()),
        Bson::Array(items) => Value::Array(items.iter().map(bson_to_json).collect()),
        Bson::Document(doc) => Value::Object(document_to_json(doc)),
        Bson::Boolean(b) => Value::Bool(*b),
        Bson::Null | Bson::Undefined | Bson::MaxKey | Bson::MinKey => Value::Null,
        Bson::Int32(n) => Value::from(*n),
        Bson::Int64(n) => Value::from(*n),
        Bson::DateTime(d) => Value::String(rfc3339(d.timestamp_millis())),
        Bson::ObjectId(oid) => Value::String(oid.to_hex()),
        Bson::Decimal128(d) => Value::String(d.to_string()),
        Bson::Timestamp(ts) => Value::from(ts.time),
        Bson::Symbol(s) | Bson::JavaScriptCode(s) => Value::String(s.clone()),
        Bson::JavaScriptCodeWithScope(c) => Value::String(c.code.clone()),
        Bson::RegularExpression(re) => Value::String(format!("/{}/{}", re.pattern, re.options)),
        Bson::Binary(bin) => Value::String(bin.bytes.iter().map(|b| format!("{b:02x}")).collect()),
        Bson::DbPointer(_) => Value::Null,
    }
}

fn document_to_json(doc: &Document) -> Map<String, Value> {
    doc.iter().map(|(k, v)| (k.clone(), bson_to_json(v))).collect()
}

/// Milliseconds since the epoch as RFC 3339 UTC.
pub fn rfc3339(ms: i64) -> String {
    match DateTime::<Utc>::from_timestamp_millis(ms) {
        Some(t) => t.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        None => ms.to_string(),
    }
}

/// Which user fields a response may show. `_id` never; by default `id`,
/// `name` and `email`, so that a password hash can never leave the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserFields(Vec<String>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserFieldsError {
    #[error("the user field allowlist is empty")]
    Empty,
    #[error("user field {0:?} may not be shown")]
    Forbidden(String),
}

impl UserFields {
    pub fn new(fields: Vec<String>) -> Result<Self, UserFieldsError> {
        if fields.is_empty() {
            return Err(UserFieldsError::Empty);
        }
        if let Some(bad) =
            fields.iter().find(|f| f.is_empty() || f.starts_with('_') || f.contains('.') || f.starts_with('$'))
        {
            return Err(UserFieldsError::Forbidden(bad.clone()));
        }
        let mut unique = Vec::with_capacity(fields.len());
        for f in fields {
            if !unique.contains(&f) {
                unique.push(f);
            }
        }
        Ok(Self(unique))
    }

    pub fn names(&self) -> &[String] {
        &self.0
    }

    /// The allowed fields of a user document, in allowlist order.
    pub fn project(&self, user: &Document) -> Map<String, Value> {
        self.0.iter().filter_map(|f| user.get(f).map(|v| (f.clone(), bson_to_json(v)))).collect()
    }
}

impl Default for UserFields {
    fn default() -> Self {
        Self(vec!["id".into(), "name".into(), "email".into()])
    }
}

/// Users by id, already cut down to the allowed fields.
#[derive(Debug, Default, Clone)]
pub struct UserDirectory(HashMap<UserId, Map<String, Value>>);

impl UserDirectory {
    /// From user documents in `_id` order; the first document with an id wins.
    pub fn from_documents<'a>(users: impl IntoIterator<Item = &'a Document>, fields: &UserFields) -> Self {
        let mut map = HashMap::new();
        for user in users {
            if let Some(id) = user.get("id").and_then(UserId::from_bson) {
                map.entry(id).or_insert_with(|| fields.project(user));
            }
        }
        Self(map)
    }

    pub fn get(&self, id: UserId) -> Option<&Map<String, Value>> {
        self.0.get(&id)
    }
}

/// The user ids a call refers to.
pub fn user_references(call: &Document) -> impl Iterator<Item = UserId> + '_ {
    USER_REFERENCES.iter().filter_map(|(field, _)| call.get(*field).and_then(UserId::from_bson))
}

/// A call's own fields as the response shows them: every stored field but
/// `_id` and the three detail fields, which enrichment adds at the end.
pub fn call_base(call: &Document) -> Map<String, Value> {
    call.iter()
        .filter(|(k, _)| k.as_str() != "_id" && !USER_REFERENCES.iter().any(|(_, d)| d == k))
        .map(|(k, v)| (k.clone(), bson_to_json(v)))
        .collect()
}

/// [`call_base`] serialised straight from the document, without building
/// its JSON tree first: the same bytes as `serde_json::to_string(&call_base(call))`.
/// What the projector stores for every call it puts.
pub fn call_base_json(call: &Document) -> Result<String, serde_json::Error> {
    serde_json::to_string(&AsJson::Base(call))
}

/// A BSON value serialised as [`bson_to_json`] renders it.
enum AsJson<'a> {
    Value(&'a Bson),
    /// A call's document without `_id` and the detail fields.
    Base(&'a Document),
}

impl serde::Serialize for AsJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        let map = |doc: &Document, base: bool, s: S| {
            let mut m = s.serialize_map(None)?;
            for (k, v) in doc {
                if base && (k.as_str() == "_id" || USER_REFERENCES.iter().any(|(_, d)| d == k)) {
                    continue;
                }
                m.serialize_entry(k, &AsJson::Value(v))?;
            }
            m.end()
        };
        let value = match self {
            AsJson::Base(doc) => return map(doc, true, s),
            AsJson::Value(v) => *v,
        };
        match value {
            // serde_json writes NaN and the infinities as null, as `Number::from_f64` leaves them.
            Bson::Double(f) => s.serialize_f64(*f),
            Bson::String(x) | Bson::Symbol(x) | Bson::JavaScriptCode(x) => s.serialize_str(x),
            Bson::JavaScriptCodeWithScope(c) => s.serialize_str(&c.code),
            Bson::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&AsJson::Value(item))?;
                }
                seq.end()
            }
            Bson::Document(doc) => map(doc, false, s),
            Bson::Boolean(b) => s.serialize_bool(*b),
            Bson::Int32(n) => s.serialize_i32(*n),
            Bson::Int64(n) => s.serialize_i64(*n),
            Bson::Timestamp(ts) => s.serialize_u32(ts.time),
            Bson::DateTime(_)
            | Bson::ObjectId(_)
            | Bson::Decimal128(_)
            | Bson::RegularExpression(_)
            | Bson::Binary(_)
            | Bson::Null
            | Bson::Undefined
            | Bson::MaxKey
            | Bson::MinKey
            | Bson::DbPointer(_) => bson_to_json(value).serialize(s),
        }
    }
}

/// A call as the response shows it with enrichment: [`call_base`], then
/// `owner_details`, `user_details` and `assigned_to_details` (`{}` when the
/// reference is missing or names no user).
pub fn enriched_call(call: &Document, users: &UserDirectory) -> Map<String, Value> {
    let mut out = call_base(call);
    for (field, details) in USER_REFERENCES {
        let user =
            call.get(field).and_then(UserId::from_bson).and_then(|id| users.get(id)).cloned().unwrap_or_default();
        out.insert(details.to_string(), Value::Object(user));
    }
    out
}

/// [`enriched_call`]'s JSON from the pieces the read model stores: the
/// serialised [`call_base`] and each detail's serialised user (`{}` for none).
/// Produces the same bytes as serialising `enriched_call`.
pub fn splice_details(base: &str, details: [&str; 3]) -> String {
    let body = base.strip_suffix('}').unwrap_or(base);
    let mut out = String::with_capacity(base.len() + 64 + details.iter().map(|d| d.len()).sum::<usize>());
    out.push_str(body);
    for (i, ((_, name), value)) in USER_REFERENCES.iter().zip(details).enumerate() {
        if i > 0 || body.len() > 1 {
            out.push(',');
        }
        out.push('"');
        out.push_str(name);
        out.push_str("\":");
        out.push_str(value);
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{doc, oid::ObjectId, DateTime as BsonDate};

    #[test]
    fn dates_render_as_rfc3339_utc() {
        assert_eq!(rfc3339(1_760_349_600_000), "2025-10-13T10:00:00Z");
        assert_eq!(rfc3339(1_760_349_600_123), "2025-10-13T10:00:00.123Z");
        assert_eq!(bson_to_json(&Bson::DateTime(BsonDate::from_millis(0))), Value::from("1970-01-01T00:00:00Z"));
    }

    #[test]
    fn enriched_call_drops_id_and_shows_only_allowed_user_fields() {
        let fields = UserFields::default();
        let users =
            vec![doc! {"_id": ObjectId::new(), "id": 1, "name": "Ann", "email": "a@x", "password_hash": "secret"}];
        let dir = UserDirectory::from_documents(&users, &fields);
        let call = doc! {"_id": ObjectId::new(), "id": 9, "owner_id": 1, "user_id": 77, "subject": "Hi"};
        let out = Value::Object(enriched_call(&call, &dir));
        assert_eq!(
            out,
            serde_json::json!({"id": 9, "owner_id": 1, "user_id": 77, "subject": "Hi",
                "owner_details": {"id": 1, "name": "Ann", "email": "a@x"},
                "user_details": {}, "assigned_to_details": {}})
        );
        assert!(!out.to_string().contains("secret"));
    }

    #[test]
    fn spliced_details_equal_the_serialised_enriched_call() {
        let fields = UserFields::default();
        let users = vec![doc! {"id": 1, "name": "Ann", "email": "a@x"}];
        let dir = UserDirectory::from_documents(&users, &fields);
        for call in [
            doc! {"_id": 1, "id": 9, "owner_id": 1, "subject": "Hi", "owner_details": "stored junk"},
            doc! {"_id": 2},
            doc! {"id": 3, "assigned_to_id": 1, "when": BsonDate::from_millis(5)},
        ] {
            let expected = serde_json::to_string(&enriched_call(&call, &dir)).unwrap();
            let base = serde_json::to_string(&call_base(&call)).unwrap();
            let detail = |f: &str| {
                let user =
                    call.get(f).and_then(UserId::from_bson).and_then(|id| dir.get(id)).cloned().unwrap_or_default();
                serde_json::to_string(&user).unwrap()
            };
            let spliced = splice_details(&base, [&detail("owner_id"), &detail("user_id"), &detail("assigned_to_id")]);
            assert_eq!(spliced, expected);
        }
    }

    fn bson() -> impl proptest::strategy::Strategy<Value = Bson> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            any::<f64>().prop_map(Bson::Double),
            prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(-0.0)].prop_map(Bson::Double),
            ".{0,6}".prop_map(Bson::String),
            any::<bool>().prop_map(Bson::Boolean),
            any::<i32>().prop_map(Bson::Int32),
            any::<i64>().prop_map(Bson::Int64),
            any::<i64>().prop_map(|ms| Bson::DateTime(BsonDate::from_millis(ms))),
            any::<[u8; 12]>().prop_map(|b| Bson::ObjectId(ObjectId::from_bytes(b))),
            Just(Bson::Null),
            (any::<u32>(), any::<u32>())
                .prop_map(|(time, increment)| Bson::Timestamp(bson::Timestamp { time, increment })),
            proptest::collection::vec(any::<u8>(), 0..4)
                .prop_map(|bytes| Bson::Binary(bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes })),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Bson::Array),
                proptest::collection::vec(("[a-z_]{1,12}", inner), 0..4)
                    .prop_map(|kv| Bson::Document(kv.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// The streamed base is the tree's, byte for byte, whatever the
        /// document holds (including `_id` and detail fields to drop).
        #[test]
        fn the_streamed_base_equals_the_serialised_tree(
            fields in proptest::collection::vec(
                (proptest::prop_oneof![
                    proptest::strategy::Just("_id".to_string()),
                    proptest::strategy::Just("owner_details".to_string()),
                    proptest::strategy::Just("user_details".to_string()),
                    "[a-z_]{1,12}",
                ], bson()),
                0..8,
            )
        ) {
            let call: Document = fields.into_iter().collect();
            let tree = serde_json::to_string(&call_base(&call)).unwrap();
            proptest::prop_assert_eq!(call_base_json(&call).unwrap(), tree);
        }
    }

    #[test]
    fn allowlist_rejects_private_fields() {
        assert_eq!(UserFields::new(vec!["_id".into()]), Err(UserFieldsError::Forbidden("_id".into())));
        assert_eq!(UserFields::new(vec![]), Err(UserFieldsError::Empty));
        assert_eq!(UserFields::new(vec!["id".into(), "id".into()]).unwrap().names(), ["id".to_string()]);
    }
}
