//! The expected grouped response, recomputed from raw documents with none
//! of the service's code: the oracle for parity tests.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};

use bson::{Bson, Document};
use chrono::{DateTime, Utc};
use serde_json::{json, Map, Value};

use crate::dataset::Dataset;

pub struct Query {
    pub tenant: i64,
    pub limit: usize,
    pub include_enrichment: bool,
    pub include_calls: bool,
}

fn as_int(v: &Bson) -> Option<i64> {
    match v {
        Bson::Int32(n) => Some(*n as i64),
        Bson::Int64(n) => Some(*n),
        Bson::Double(f) if f.fract() == 0.0 => Some(*f as i64),
        _ => None,
    }
}

fn status_key(v: &Bson) -> Option<i64> {
    match v {
        Bson::String(s) => s.parse::<i64>().ok().filter(|n| n.to_string() == *s),
        other => as_int(other),
    }
}

fn live(doc: &Document) -> bool {
    doc.get("deleted").and_then(as_int) != Some(1)
}

fn to_json(v: &Bson) -> Value {
    match v {
        Bson::Int32(n) => json!(n),
        Bson::Int64(n) => json!(n),
        Bson::Double(f) => json!(f),
        Bson::String(s) => json!(s),
        Bson::Boolean(b) => json!(b),
        Bson::Null => Value::Null,
        Bson::DateTime(d) => {
            let t: DateTime<Utc> = DateTime::from_timestamp_millis(d.timestamp_millis()).expect("valid date");
            let fmt = if d.timestamp_millis() % 1000 == 0 { "%Y-%m-%dT%H:%M:%SZ" } else { "%Y-%m-%dT%H:%M:%S%.3fZ" };
            json!(t.format(fmt).to_string())
        }
        Bson::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        Bson::Document(d) => Value::Object(d.iter().map(|(k, v)| (k.clone(), to_json(v))).collect()),
        Bson::ObjectId(o) => json!(o.to_hex()),
        other => panic!("the reference does not render {other:?}"),
    }
}

/// What `POST /crm/calls/get-grouped-by-status` must answer.
pub fn expected(ds: &Dataset, q: &Query, user_fields: &[&str]) -> Value {
    // Statuses: the tenant's own beat global ones with the same id; within a
    // scope the first document wins.
    let mut statuses: BTreeMap<i64, (bool, &Document)> = BTreeMap::new();
    for s in ds.statuses.iter().filter(|s| live(s)) {
        let own = match s.get("tenant_id") {
            None | Some(Bson::Null) => false,
            Some(t) if as_int(t) == Some(q.tenant) => true,
            _ => continue,
        };
        let Some(key) = s.get("id").and_then(status_key) else { continue };
        match statuses.get(&key) {
            Some((true, _)) => {}
            Some((false, _)) if !own => {}
            _ => {
                statuses.insert(key, (own, s));
            }
        }
    }
    // Users a tenant may see: its own and those of no tenant.
    let mut users: HashMap<i64, &Document> = HashMap::new();
    for u in ds.users.iter().filter(|u| match u.get("tenant_id") {
        None | Some(Bson::Null) => true,
        Some(t) => as_int(t) == Some(q.tenant),
    }) {
        if let Some(id) = u.get("id").and_then(as_int) {
            users.entry(id).or_insert(u);
        }
    }
    let mut by_status: HashMap<i64, Vec<&Document>> = HashMap::new();
    for c in ds.calls.iter().filter(|c| live(c) && c.get("tenant_id").and_then(as_int) == Some(q.tenant)) {
        if let Some(key) = c.get("status_id").and_then(status_key) {
            by_status.entry(key).or_default().push(c);
        }
    }
    let details = |call: &Document, field: &str| -> Value {
        let user = call.get(field).and_then(as_int).and_then(|id| users.get(&id));
        let mut out = Map::new();
        if let Some(u) = user {
            for f in user_fields {
                if let Some(v) = u.get(*f) {
                    out.insert(f.to_string(), to_json(v));
                }
            }
        }
        Value::Object(out)
    };
    let mut total = 0;
    let data: Vec<Value> = statuses
        .iter()
        .map(|(key, (_, s))| {
            let mut calls = by_status.remove(key).unwrap_or_default();
            total += calls.len();
            calls.sort_by_key(|c| {
                let start = match c.get("start_time") {
                    Some(Bson::DateTime(d)) => Some(d.timestamp_millis()),
                    _ => None,
                };
                (Reverse(start), Reverse(c.get("id").and_then(as_int)))
            });
            let shown: Vec<Value> = if !q.include_calls {
                vec![]
            } else {
                calls
                    .iter()
                    .take(q.limit)
                    .map(|c| {
                        if !q.include_enrichment {
                            return to_json(c.get("id").expect("calls have ids"));
                        }
                        let mut m: Map<String, Value> =
                            c.iter().filter(|(k, _)| *k != "_id").map(|(k, v)| (k.clone(), to_json(v))).collect();
                        m.insert("owner_details".into(), details(c, "owner_id"));
                        m.insert("user_details".into(), details(c, "user_id"));
                        m.insert("assigned_to_details".into(), details(c, "assigned_to_id"));
                        Value::Object(m)
                    })
                    .collect()
            };
            let field = |name: &str| s.get(name).map(to_json).unwrap_or(Value::Null);
            json!({
                "id": key, "name": field("name"), "description": field("description"), "color": field("color"),
                "total_calls": calls.len(), "calls": shown,
            })
        })
        .collect();
    let summary = json!({"total_calls": total, "total_status_groups": data.len(), "limit_per_status": q.limit});
    json!({
        "status": 200,
        "message": "Calls grouped by status retrieved successfully",
        "data": data,
        "summary": summary,
    })
}

/// Panics with both documents, pretty-printed, when they differ.
/// Compares the serialised forms, so that key order counts too.
pub fn assert_same(actual: &Value, expected: &Value, context: &str) {
    let serialised = |v: &Value| serde_json::to_string(v).unwrap_or_default();
    if serialised(actual) != serialised(expected) {
        let a = serde_json::to_string_pretty(actual).unwrap_or_default();
        let e = serde_json::to_string_pretty(expected).unwrap_or_default();
        let first = a.lines().zip(e.lines()).position(|(x, y)| x != y).unwrap_or(0);
        panic!(
            "{context}: response differs from the reference at line {first}\n--- actual (from line {first}) ---\n{}\n--- expected ---\n{}",
            a.lines().skip(first.saturating_sub(5)).take(30).collect::<Vec<_>>().join("\n"),
            e.lines().skip(first.saturating_sub(5)).take(30).collect::<Vec<_>>().join("\n")
        );
    }
}
