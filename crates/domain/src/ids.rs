use std::fmt;

use bson::Bson;
use serde::{Deserialize, Serialize};

/// A tenant. Only ever built from a verified token or from operator input
/// that was itself authorised; never from a request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct TenantId(i64);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("tenant id must be a non-negative integer, got {0}")]
pub struct InvalidTenant(pub i64);

impl TenantId {
    pub fn new(value: i64) -> Result<Self, InvalidTenant> {
        if value < 0 {
            return Err(InvalidTenant(value));
        }
        Ok(Self(value))
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

impl TryFrom<i64> for TenantId {
    type Error = InvalidTenant;
    fn try_from(value: i64) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<TenantId> for i64 {
    fn from(t: TenantId) -> i64 {
        t.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The canonical form of a status id.
///
/// Real data stores `calls.status_id` and `call_status.id` either as an
/// integer or as a numeric string (`1` and `"1"`); both name the same status.
/// The canonical form is the integer. A string is numeric only in its
/// canonical decimal spelling (`"1"`, `"-3"`; not `"01"`, `" 1"` or `"1.0"`),
/// so that the mapping is one-to-one and reversible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StatusKey(i64);

impl StatusKey {
    pub fn new(value: i64) -> Self {
        Self(value)
    }

    pub fn get(self) -> i64 {
        self.0
    }

    /// The status a BSON value names, if any.
    pub fn from_bson(value: &Bson) -> Option<Self> {
        match value {
            Bson::String(s) => Self::parse_str(s),
            other => integral(other).map(Self),
        }
    }

    /// A numeric string in canonical decimal form.
    pub fn parse_str(s: &str) -> Option<Self> {
        let n: i64 = s.parse().ok()?;
        (n.to_string() == s).then_some(Self(n))
    }
}

impl fmt::Display for StatusKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A call's `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CallId(i64);

impl CallId {
    pub fn new(value: i64) -> Self {
        Self(value)
    }
    pub fn get(self) -> i64 {
        self.0
    }
    pub fn from_bson(value: &Bson) -> Option<Self> {
        integral(value).map(Self)
    }
}

/// A user's `id`, as referenced by `owner_id`, `user_id` and `assigned_to_id`.
///
/// MongoDB's equality treats `5`, `Int64(5)` and `5.0` as equal and `"5"` as
/// different, so a reference is an integral number or nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UserId(i64);

impl UserId {
    pub fn new(value: i64) -> Self {
        Self(value)
    }
    pub fn get(self) -> i64 {
        self.0
    }
    pub fn from_bson(value: &Bson) -> Option<Self> {
        integral(value).map(Self)
    }
}

/// A document's `_id` as a string key: an ObjectId as its 24 hex digits
/// (so string order is `_id` order), any other `_id` as `~` plus a type tag
/// and its value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DocKey(String);

impl DocKey {
    pub fn from_bson(id: &Bson) -> Self {
        Self(match id {
            Bson::ObjectId(oid) => oid.to_hex(),
            Bson::String(s) => format!("~s:{s}"),
            other => match integral(other) {
                Some(n) => format!("~i:{n}"),
                None => format!("~j:{}", other.clone().into_relaxed_extjson()),
            },
        })
    }

    /// A key read back from storage.
    pub fn from_stored(s: String) -> Self {
        Self(s)
    }

    /// The `_id` this key was made from (an integral `_id` comes back as
    /// an Int64, which MongoDB matches against any numeric type).
    pub fn to_bson(&self) -> Option<Bson> {
        if let Some(s) = self.0.strip_prefix("~s:") {
            return Some(Bson::String(s.to_string()));
        }
        if let Some(n) = self.0.strip_prefix("~i:") {
            return n.parse().ok().map(Bson::Int64);
        }
        if let Some(j) = self.0.strip_prefix("~j:") {
            let value: serde_json::Value = serde_json::from_str(j).ok()?;
            return Bson::try_from(value).ok();
        }
        bson::oid::ObjectId::parse_str(&self.0).ok().map(Bson::ObjectId)
    }

    /// A compact binary form: an ObjectId as `o` and its 12 bytes, any
    /// other key as its text (which starts with `~`).
    pub fn to_bytes(&self) -> Vec<u8> {
        match bson::oid::ObjectId::parse_str(&self.0) {
            Ok(oid) if !self.0.starts_with('~') => {
                let mut out = Vec::with_capacity(13);
                out.push(b'o');
                out.extend_from_slice(&oid.bytes());
                out
            }
            _ => self.0.as_bytes().to_vec(),
        }
    }

    /// The key back from [`DocKey::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        match bytes.split_first()? {
            (b'o', raw) => Some(Self(bson::oid::ObjectId::from_bytes(raw.try_into().ok()?).to_hex())),
            (b'~', _) => std::str::from_utf8(bytes).ok().map(|s| Self(s.to_string())),
            _ => None,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DocKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An integer held in any BSON numeric type (an integral double counts).
pub(crate) fn integral(value: &Bson) -> Option<i64> {
    match value {
        Bson::Int32(n) => Some(i64::from(*n)),
        Bson::Int64(n) => Some(*n),
        Bson::Double(f) if f.fract() == 0.0 && f.is_finite() && f.abs() < 9.0e15 => Some(*f as i64),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn status_key_accepts_ints_and_canonical_numeric_strings_only() {
        assert_eq!(StatusKey::from_bson(&Bson::Int32(1)), Some(StatusKey(1)));
        assert_eq!(StatusKey::from_bson(&Bson::Int64(7)), Some(StatusKey(7)));
        assert_eq!(StatusKey::from_bson(&Bson::Double(2.0)), Some(StatusKey(2)));
        assert_eq!(StatusKey::from_bson(&Bson::String("3".into())), Some(StatusKey(3)));
        assert_eq!(StatusKey::from_bson(&Bson::String("-3".into())), Some(StatusKey(-3)));
        for bad in ["01", " 1", "1 ", "1.0", "+1", "", "abc"] {
            assert_eq!(StatusKey::from_bson(&Bson::String(bad.into())), None, "{bad:?}");
        }
        assert_eq!(StatusKey::from_bson(&Bson::Double(2.5)), None);
        assert_eq!(StatusKey::from_bson(&Bson::Null), None);
        assert_eq!(StatusKey::from_bson(&Bson::Boolean(true)), None);
    }

    #[test]
    fn tenant_rejects_negative() {
        assert!(TenantId::new(-1).is_err());
        assert_eq!(TenantId::new(6).unwrap().get(), 6);
    }

    proptest! {
        #[test]
        fn int_and_its_string_name_the_same_status(n in any::<i64>()) {
            prop_assert_eq!(
                StatusKey::from_bson(&Bson::Int64(n)),
                StatusKey::from_bson(&Bson::String(n.to_string()))
            );
        }

        #[test]
        fn doc_keys_round_trip_through_bytes_and_bson(raw in any::<[u8; 12]>(), n in any::<i64>(), s in "\\PC{0,20}") {
            for id in [Bson::ObjectId(bson::oid::ObjectId::from_bytes(raw)), Bson::Int64(n), Bson::String(s.clone()),
                       Bson::Boolean(n % 2 == 0)] {
                let key = DocKey::from_bson(&id);
                prop_assert_eq!(DocKey::from_bytes(&key.to_bytes()), Some(key.clone()));
                prop_assert_eq!(DocKey::from_bson(&key.to_bson().unwrap()), key);
            }
        }

        #[test]
        fn any_accepted_string_round_trips(s in "\\PC{0,6}") {
            if let Some(k) = StatusKey::parse_str(&s) {
                prop_assert_eq!(k.get().to_string(), s);
            }
        }
    }
}
