//! The hot path's pure parts, without I/O: rendering a cached response,
//! planning one change event, parsing a request.

use std::collections::BTreeMap;

use bson::{doc, Bson, DateTime, Document};
use callboard_domain::render::{self, GroupCalls, UserDirectory, UserFields};
use callboard_domain::{GroupedRequest, Limit, ParamValue, Status, StatusKey};
use callboard_projector::transform::{plan, Change};
use callboard_readmodel::codec::{split_stored, CallEntry};
use callboard_readmodel::write::StateView;
use callboard_readmodel::TenantState;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

fn call(i: i64) -> Document {
    doc! {"_id": bson::oid::ObjectId::new(), "id": i, "tenant_id": 6, "subject": "Follow-up call", "type": "outbound",
    "status_id": (i % 5 + 1).to_string(), "duration_seconds": 390, "start_time": DateTime::from_millis(1_760_349_600_000 - i * 1000),
    "owner_id": i % 100 + 1, "user_id": (i + 7) % 100 + 1, "assigned_to_id": (i + 13) % 100 + 1, "deleted": 0}
}

/// What the read path does once Redis has answered: split each stored
/// call, splice its users, assemble and serialise the response.
fn render_cached(stored: &[Vec<String>], users: &std::collections::HashMap<i64, String>, limit: u32) -> String {
    let statuses: Vec<Status> = (1..=5)
        .map(|k| Status {
            key: StatusKey::new(k),
            name: "Pending".into(),
            description: "Calls".into(),
            color: "#FFA500".into(),
        })
        .collect();
    let mut groups = BTreeMap::new();
    for (k, calls) in stored.iter().enumerate() {
        let rendered: Vec<String> = calls
            .iter()
            .map(|s| {
                let (refs, json) = split_stored(s).expect("stored");
                let d = |r: Option<callboard_domain::UserId>| {
                    r.and_then(|u| users.get(&u.get())).map(String::as_str).unwrap_or("{}")
                };
                render::splice_details(json, [d(refs[0]), d(refs[1]), d(refs[2])])
            })
            .collect();
        groups.insert(StatusKey::new(k as i64 + 1), GroupCalls { total: 2_000, calls: rendered });
    }
    let request = GroupedRequest {
        limit: Limit::new(i64::from(limit), 1000).expect("limit"),
        include_enrichment: true,
        include_calls: true,
    };
    render::assemble(&statuses, groups, &request).as_str().to_owned()
}

fn benches(c: &mut Criterion) {
    let fields = UserFields::default();
    let users: std::collections::HashMap<i64, String> = (1..=100)
        .map(|i| (i, format!("{{\"id\":{i},\"name\":\"User {i}\",\"email\":\"user{i}@example.com\"}}")))
        .collect();
    let mut group = c.benchmark_group("render_cached_response");
    for per_status in [20_u32, 100] {
        let stored: Vec<Vec<String>> = (0..5)
            .map(|s| {
                (0..per_status as i64)
                    .map(|i| CallEntry::from_document(&call(s * 1000 + i)).expect("entry").stored)
                    .collect()
            })
            .collect();
        let bytes = render_cached(&stored, &users, per_status).len();
        group.bench_with_input(
            BenchmarkId::new(format!("5x{per_status}"), format!("{bytes}B")),
            &stored,
            |b, stored| b.iter(|| render_cached(stored, &users, per_status)),
        );
    }
    group.finish();

    // Live path's rendering of the same calls, for comparison.
    let docs: Vec<Document> = (0..20).map(call).collect();
    let dir = UserDirectory::from_documents(
        &(1..=100).map(|i| doc! {"id": i, "name": format!("User {i}"), "email": "x"}).collect::<Vec<_>>(),
        &fields,
    );
    c.bench_function("render_live_call_x20", |b| {
        b.iter(|| {
            docs.iter()
                .map(|d| serde_json::Value::Object(render::enriched_call(d, &dir)).to_string())
                .collect::<Vec<_>>()
        })
    });

    let mut view = StateView::default();
    view.tenants.insert(callboard_domain::TenantId::new(6).expect("tenant"), TenantState::Warm(1));
    let event = call(42);
    c.bench_function("plan_one_change_event", |b| {
        b.iter(|| {
            let change = Change::Call {
                doc: callboard_domain::DocKey::from_bson(event.get("_id").unwrap_or(&Bson::Null)),
                state: Some(CallEntry::from_document(&event)),
            };
            plan(std::slice::from_ref(&change), &view, 0)
        })
    });

    let default = Limit::new(100, 1000).expect("limit");
    c.bench_function("parse_request_params", |b| {
        b.iter(|| {
            let pairs: Vec<(String, String)> =
                serde_urlencoded::from_str("limit=20&include_enrichment=true&include_calls=true").expect("form");
            GroupedRequest::from_params(pairs.into_iter().map(|(k, v)| (k, ParamValue::Text(v))), default, 1000)
        })
    });
}

criterion_group!(hot_path, benches);
criterion_main!(hot_path);
