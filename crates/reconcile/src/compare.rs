//! The differences between two grouped answers, status by status.

use callboard_domain::render::USER_REFERENCES;
use serde::Serialize;
use serde_json::Value;

/// One difference between the cached and the live answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// What differs ([`Kind`]).
    pub kind: &'static str,
    pub status_id: Value,
    pub detail: String,
}

/// The kinds of [`Difference`] (the `kind` label of
/// `callboard_reconcile_drift_total`).
pub struct Kind;

impl Kind {
    /// A status shown by one side only, or shown differently (its name,
    /// colour...): the statuses in Redis.
    pub const STATUS: &'static str = "status";
    /// A status's call count.
    pub const COUNT: &'static str = "count";
    /// The ids of a status's first calls.
    pub const ORDER: &'static str = "order";
    /// A call shown differently, besides its users' details (or unreadable
    /// in Redis).
    pub const DOCUMENT: &'static str = "document";
    /// A call whose owner, user or assignee details differ, and nothing
    /// else: the users in Redis.
    pub const USER: &'static str = "user";
    /// Every kind, for metrics.
    pub const ALL: [&'static str; 5] = [Self::STATUS, Self::COUNT, Self::ORDER, Self::DOCUMENT, Self::USER];
}

/// The differences between the cached and the live answer (JSON of the
/// grouped endpoint), status by status, in the live answer's order.
pub fn compare(cached: &Value, live: &Value) -> Vec<Difference> {
    let groups = |v: &Value| -> Vec<Value> { v["data"].as_array().cloned().unwrap_or_default() };
    let (cached, live) = (groups(cached), groups(live));
    let mut out = Vec::new();
    let find = |groups: &[Value], id: &Value| groups.iter().find(|g| g["id"] == *id).cloned();
    for g in &live {
        let id = &g["id"];
        let Some(c) = find(&cached, id) else {
            out.push(difference(Kind::STATUS, id, "missing from the cache".into()));
            continue;
        };
        if without(&c, &["calls", "total_calls"]) != without(g, &["calls", "total_calls"]) {
            out.push(difference(Kind::STATUS, id, "the status itself differs (name, colour...)".into()));
        }
        if c["total_calls"] != g["total_calls"] {
            let detail = format!("cached {} calls, MongoDB {}", c["total_calls"], g["total_calls"]);
            out.push(difference(Kind::COUNT, id, detail));
        }
        let ids = |g: &Value| -> Vec<Value> {
            g["calls"].as_array().map(|calls| calls.iter().map(|c| c["id"].clone()).collect()).unwrap_or_default()
        };
        if ids(&c) != ids(g) {
            let detail = format!("cached first calls {:?}, MongoDB {:?}", ids(&c), ids(g));
            out.push(difference(Kind::ORDER, id, detail));
        } else if let (Some(cc), Some(lc)) = (c["calls"].as_array(), g["calls"].as_array()) {
            for (a, b) in cc.iter().zip(lc) {
                if a == b {
                    continue;
                }
                let details = USER_REFERENCES.map(|(_, details)| details);
                let kind = if without(a, &details) == without(b, &details) { Kind::USER } else { Kind::DOCUMENT };
                out.push(difference(kind, id, format!("call {} differs", b["id"])));
            }
        }
    }
    for c in &cached {
        if find(&live, &c["id"]).is_none() {
            out.push(difference(Kind::STATUS, &c["id"], "not in MongoDB".into()));
        }
    }
    out
}

fn difference(kind: &'static str, status_id: &Value, detail: String) -> Difference {
    Difference { kind, status_id: status_id.clone(), detail }
}

/// `value` without `fields`.
fn without(value: &Value, fields: &[&str]) -> Value {
    let mut value = value.clone();
    if let Some(object) = value.as_object_mut() {
        for field in fields {
            object.remove(*field);
        }
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn differences_are_named_by_kind_and_status() {
        let call = |id: i64, subject: &str| json!({"id": id, "subject": subject, "owner_details": {"name": "Ann"}});
        let answer = |groups: Value| json!({"data": groups});
        let live = answer(json!([
            {"id": 1, "name": "Open", "total_calls": 2, "calls": [call(5, "a"), call(4, "b")]},
            {"id": 2, "name": "Done", "total_calls": 1, "calls": [call(3, "c")]},
        ]));
        assert!(compare(&live, &live).is_empty());
        let cached = answer(json!([
            {"id": 1, "name": "Open", "total_calls": 1, "calls": [call(5, "a")]},
            {"id": 3, "name": "Lost", "total_calls": 0, "calls": []},
        ]));
        let kinds: Vec<(&str, Value)> = compare(&cached, &live).into_iter().map(|d| (d.kind, d.status_id)).collect();
        assert_eq!(kinds, [("count", json!(1)), ("order", json!(1)), ("status", json!(2)), ("status", json!(3))]);
        let mut unnamed = call(3, "c");
        unnamed["owner_details"] = json!({});
        let changed = answer(json!([
            {"id": 1, "name": "Open", "total_calls": 2, "calls": [call(5, "a"), call(4, "x")]},
            {"id": 2, "name": "Finished", "total_calls": 1, "calls": [unnamed]},
        ]));
        let kinds: Vec<&str> = compare(&changed, &live).into_iter().map(|d| d.kind).collect();
        assert_eq!(kinds, ["document", "status", "user"]);
        let renamed = answer(json!([
            {"id": 1, "name": "Open", "total_calls": 2, "calls": [call(5, "a"), call(4, "b")]},
            {"id": 2, "name": "Finished", "total_calls": 1, "calls": [call(3, "c")]},
        ]));
        let kinds: Vec<&str> = compare(&renamed, &live).into_iter().map(|d| d.kind).collect();
        assert_eq!(kinds, ["status"]);
    }
}
