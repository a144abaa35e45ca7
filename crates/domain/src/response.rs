use std::fmt::Write as _;

use serde_json::Value;

use crate::params::GroupedRequest;
use crate::status::Status;

pub const GROUPED_MESSAGE: &str = "Calls grouped by status retrieved successfully";

/// The body of `POST /crm/calls/get-grouped-by-status`, already serialised:
/// field for field the specification's shape,
/// `{"status", "message", "data": [{"id", "name", "description", "color",
/// "total_calls", "calls"}], "summary": {"total_calls",
/// "total_status_groups", "limit_per_status"}}`.
///
/// Written directly rather than through serde: the calls arrive as JSON
/// text (from Redis, or rendered once by the live path), and splicing them
/// in avoids re-parsing every call on the hot path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupedBody {
    /// Shared, so that an answer kept for reuse is handed out without a
    /// copy.
    json: std::sync::Arc<str>,
    calls: usize,
}

impl GroupedBody {
    pub fn as_str(&self) -> &str {
        &self.json
    }

    /// The text, shared with every other clone of this body.
    pub fn shared(&self) -> std::sync::Arc<str> {
        self.json.clone()
    }

    /// How many bytes the text takes.
    pub fn len(&self) -> usize {
        self.json.len()
    }

    pub fn is_empty(&self) -> bool {
        self.json.is_empty()
    }

    /// How many calls the body shows, over every group.
    pub fn calls(&self) -> usize {
        self.calls
    }
}

/// One status group's figures and its calls as JSON text.
#[derive(Debug, Default)]
pub struct GroupCalls {
    pub total: u64,
    /// Each a complete JSON value (an enriched call object or an id).
    pub calls: Vec<String>,
}

/// The grouped body: every visible status in id order, with its calls.
/// Calls of statuses the tenant does not see count nowhere.
pub fn assemble(
    statuses: &[Status],
    mut groups: std::collections::BTreeMap<crate::StatusKey, GroupCalls>,
    request: &GroupedRequest,
) -> GroupedBody {
    let size: usize = groups.values().flat_map(|g| g.calls.iter().map(|c| c.len() + 1)).sum();
    let mut out = String::with_capacity(size + 160 * statuses.len() + 160);
    out.push_str("{\"status\":200,\"message\":");
    out.push_str(&Value::from(GROUPED_MESSAGE).to_string());
    out.push_str(",\"data\":[");
    let (mut total, count, mut shown) = (0_u64, statuses.len(), 0);
    for (i, s) in statuses.iter().enumerate() {
        let group = groups.remove(&s.key).unwrap_or_default();
        total += group.total;
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "{{\"id\":{},\"name\":{},\"description\":{},\"color\":{},\"total_calls\":{},\"calls\":[",
            s.key.get(),
            s.name,
            s.description,
            s.color,
            group.total
        );
        if request.include_calls {
            shown += group.calls.len();
            for (j, call) in group.calls.iter().enumerate() {
                if j > 0 {
                    out.push(',');
                }
                out.push_str(call);
            }
        }
        out.push_str("]}");
    }
    let _ = write!(
        out,
        "],\"summary\":{{\"total_calls\":{total},\"total_status_groups\":{count},\"limit_per_status\":{}}}}}",
        request.limit.get()
    );
    GroupedBody { json: out.into(), calls: shown }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Limit, StatusKey};

    #[test]
    fn the_body_is_the_specified_json() {
        let statuses = vec![
            Status {
                key: StatusKey::new(1),
                name: "Pending".into(),
                description: Value::Null,
                color: "#FFA500".into(),
            },
            Status { key: StatusKey::new(2), name: "Say \"hi\"".into(), description: "d".into(), color: Value::Null },
        ];
        let mut groups = std::collections::BTreeMap::new();
        groups
            .insert(StatusKey::new(1), GroupCalls { total: 3, calls: vec!["{\"id\":7}".into(), "{\"id\":5}".into()] });
        groups.insert(StatusKey::new(9), GroupCalls { total: 4, calls: vec!["1".into()] });
        let request =
            GroupedRequest { limit: Limit::new(2, 1000).unwrap(), include_enrichment: true, include_calls: true };
        let assembled = assemble(&statuses, groups, &request);
        assert_eq!(assembled.calls(), 2, "the calls of statuses not shown do not count");
        let body: Value = serde_json::from_str(assembled.as_str()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"status": 200, "message": GROUPED_MESSAGE, "data": [
                {"id": 1, "name": "Pending", "description": null, "color": "#FFA500", "total_calls": 3, "calls": [{"id": 7}, {"id": 5}]},
                {"id": 2, "name": "Say \"hi\"", "description": "d", "color": null, "total_calls": 0, "calls": []}],
                "summary": {"total_calls": 3, "total_status_groups": 2, "limit_per_status": 2}})
        );
    }
}
