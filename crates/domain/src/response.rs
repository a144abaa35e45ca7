use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;

pub const GROUPED_MESSAGE: &str = "Calls grouped by status retrieved successfully";

/// The body of `POST /crm/calls/get-grouped-by-status`, field for field as
/// the specification shows it.
#[derive(Debug, Serialize)]
pub struct GroupedResponse {
    pub status: u16,
    pub message: &'static str,
    pub data: Vec<StatusGroup>,
    pub summary: Summary,
}

#[derive(Debug, Serialize)]
pub struct StatusGroup {
    pub id: i64,
    pub name: Value,
    pub description: Value,
    pub color: Value,
    pub total_calls: u64,
    /// Pre-rendered calls (enriched objects, or bare ids), in response order.
    pub calls: Vec<Box<RawValue>>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Summary {
    pub total_calls: u64,
    pub total_status_groups: usize,
    pub limit_per_status: u32,
}
