//! The read model: cached answers equal live ones through every kind of
//! change, warm and cold, single-flight warms, the admin API, and MongoDB
//! going away.

use std::time::Duration;

use bson::{doc, Bson, DateTime, Document};
use callboard_readmodel::{Command, TenantState};
use callboard_store::{CALLS, CALL_STATUS, USERS};
use callboard_testkit::Mongo;
use callboard_tests::dataset::{generate, Dataset};
use callboard_tests::{spawn_app, TestApp};
use redis::AsyncCommands;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

fn combos() -> Vec<Vec<(&'static str, &'static str)>> {
    let mut all = Vec::new();
    for limit in ["1", "7", "100"] {
        for enrichment in ["true", "false"] {
            all.push(vec![("limit", limit), ("include_enrichment", enrichment)]);
        }
    }
    all.push(vec![("include_calls", "false")]);
    all
}

async fn seeded(seed: u64) -> (TestApp, Dataset) {
    let app = spawn_app().await;
    let ds = generate(seed, 200);
    app.insert(CALL_STATUS, &ds.statuses).await;
    app.insert(USERS, &ds.users).await;
    app.insert(CALLS, &ds.calls).await;
    (app, ds)
}

async fn assert_all_cached_equal_live(app: &TestApp, tenants: &[i64], context: &str) {
    for &tenant in tenants {
        for fields in combos() {
            let (hit, cached, live) = app.wait_for_projection(tenant, &fields, WAIT).await;
            assert!(hit, "{context}: tenant {tenant} {fields:?} never became a cache hit");
            callboard_tests::reference::assert_same(&cached, &live, &format!("{context}: tenant {tenant} {fields:?}"));
        }
    }
}

/// Sends a tenant's first request (which queues its warm) and waits until
/// `fields` are answered from the cache.
async fn warm_up(app: &TestApp, tenant: i64, fields: &[(&str, &str)]) {
    app.grouped_as(&app.token(tenant), &[], false).await;
    let (hit, _, _) = app.wait_for_projection(tenant, fields, WAIT).await;
    assert!(hit, "tenant {tenant} never became a cache hit");
}

/// Inserts `calls`, starts the projector and warms each of `tenants`.
async fn project_and_warm(app: &mut TestApp, calls: &[Document], fields: &[(&str, &str)], tenants: &[i64]) {
    app.insert(CALLS, calls).await;
    app.start_projector();
    for t in tenants {
        warm_up(app, *t, fields).await;
    }
}

async fn redis(app: &TestApp) -> callboard_readmodel::Conn {
    app.redis().await
}

/// The fence counter: it moves whenever a leadership starts.
async fn fence_seq(app: &TestApp) -> Option<u64> {
    let keys = callboard_readmodel::Keys::new(&app.settings.redis.key_prefix);
    redis::AsyncCommands::get(&mut redis(app).await, keys.fence_seq()).await.unwrap()
}

#[tokio::test]
async fn cached_answers_equal_live_ones_through_every_kind_of_change() {
    let (mut app, ds) = seeded(21).await;
    app.start_projector();
    // The first request of a cold tenant is answered live and warms it.
    for &t in &ds.tenants {
        let (cache, _) = app.grouped_as(&app.token(t), &[], false).await;
        assert_eq!(cache, "miss");
    }
    assert_all_cached_equal_live(&app, &ds.tenants, "after warm").await;

    let calls = app.db.collection::<Document>(CALLS);
    let users = app.db.collection::<Document>(USERS);
    let statuses = app.db.collection::<Document>(CALL_STATUS);
    let live_ids: Vec<i64> = ds
        .calls
        .iter()
        .filter(|c| c.get("deleted").and_then(Bson::as_i32) != Some(1) && c.get("status_id") == Some(&Bson::Int32(1)))
        .filter_map(|c| c.get_i64("id").ok())
        .take(8)
        .collect();
    assert!(live_ids.len() >= 6, "dataset too small: {live_ids:?}");
    // Status move (int -> numeric string of another status).
    calls.update_one(doc! {"id": live_ids[0]}, doc! {"$set": {"status_id": "3"}}).await.unwrap();
    // Soft delete, and undelete of a deleted call.
    calls.update_one(doc! {"id": live_ids[1]}, doc! {"$set": {"deleted": 1}}).await.unwrap();
    let deleted = ds.calls.iter().find(|c| c.get("deleted") == Some(&Bson::Int32(1))).unwrap();
    calls.update_one(doc! {"id": deleted.get_i64("id").unwrap()}, doc! {"$set": {"deleted": 0}}).await.unwrap();
    // Move between tenants, both ways.
    calls.update_one(doc! {"id": live_ids[2]}, doc! {"$set": {"tenant_id": 2}}).await.unwrap();
    calls
        .update_one(
            doc! {"id": live_ids[3]},
            doc! {"$set": {"tenant_id": 3, "start_time": DateTime::from_millis(1_800_000_000_000)}},
        )
        .await
        .unwrap();
    // Hard delete: the event carries only the _id.
    calls.delete_one(doc! {"id": live_ids[4]}).await.unwrap();
    // Replace, and insert.
    calls
        .replace_one(
            doc! {"id": live_ids[5]},
            doc! {"id": live_ids[5], "tenant_id": 1, "status_id": 2, "subject": "Replaced", "owner_id": 1},
        )
        .await
        .unwrap();
    calls
        .insert_one(doc! {"id": 99_001, "tenant_id": 1, "status_id": 1, "subject": "New", "start_time": DateTime::from_millis(1_900_000_000_000), "owner_id": 2})
        .await
        .unwrap();
    // Users: a rename shows on every call, a delete empties the details.
    users.update_one(doc! {"id": 1}, doc! {"$set": {"name": "Renamed One"}}).await.unwrap();
    users.delete_one(doc! {"id": 2}).await.unwrap();
    // Statuses: add (the calls already pointing at 9 appear), rename,
    // recolour, delete.
    statuses.insert_one(doc! {"id": 9, "name": "Nine", "description": "New", "color": "#999999"}).await.unwrap();
    statuses
        .update_one(
            doc! {"id": 1, "tenant_id": {"$exists": false}},
            doc! {"$set": {"name": "Pending!", "color": "#000001"}},
        )
        .await
        .unwrap();
    statuses.update_one(doc! {"id": 3_i64}, doc! {"$set": {"deleted": 1}}).await.unwrap();
    assert_all_cached_equal_live(&app, &ds.tenants, "after changes").await;

    let (_, body) = app.grouped_as(&app.token(1), &[("limit", "100")], false).await;
    let text = body.to_string();
    assert!(
        text.contains("Renamed One") && text.contains("Pending!") && text.contains("\"subject\":\"New\""),
        "{text}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_warm_tenant_is_served_from_redis_with_mongodb_down() {
    let (mut app, _) = seeded(22).await;
    if app.services.mongo.is_external() {
        eprintln!("skipped: cannot stop an external MongoDB");
        return;
    }
    app.start_projector();
    app.grouped_as(&app.token(1), &[], false).await;
    let fields = [("limit", "7")];
    let (hit, cached, _) = app.wait_for_projection(1, &fields, WAIT).await;
    assert!(hit);
    app.stop_projector().await;
    if let Mongo::Standin(s) = &mut app.services.mongo {
        s.kill();
    }
    for _ in 0..3 {
        let (cache, body) = app.grouped_as(&app.token(1), &fields, false).await;
        assert_eq!(cache, "hit");
        callboard_tests::reference::assert_same(&body, &cached, "MongoDB down");
    }
    // A cold tenant cannot be answered: a clear 503, not a hang or a 500.
    let r = app.post_grouped_form(Some(&app.token(2)), &[]).await;
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "database_unavailable");
    app.stop().await;
}

#[tokio::test]
async fn concurrent_cold_requests_start_exactly_one_warm() {
    let (mut app, _) = seeded(23).await;
    let token = app.token(2);
    let requests = (0..20).map(|_| app.grouped_as(&token, &[], false));
    let outcomes = futures::future::join_all(requests).await;
    assert!(outcomes.iter().all(|(cache, _)| cache == "miss"));
    let mut r = redis(&app).await;
    let queued: Vec<String> = r.lrange("cb:{g}:cmdq", 0, -1).await.unwrap();
    assert_eq!(queued.len(), 1, "one warm, whatever the number of requests: {queued:?}");
    let Some(Command::Warm { tenant, epoch, job: None }) = Command::parse(&queued[0]) else {
        panic!("not a warm: {queued:?}")
    };
    assert_eq!(tenant.get(), 2);
    let state: String = r.get("cb:{t2}:state").await.unwrap();
    assert_eq!(state, TenantState::encode_warming(epoch, None));
    // A member's no-cache header changes nothing; an admin's forces live.
    app.start_projector();
    let (hit, _, _) = app.wait_for_projection(2, &[], WAIT).await;
    assert!(hit);
    let (cache, _) = app.grouped_as(&token, &[], true).await;
    assert_eq!(cache, "hit");
    let (cache, _) = app.grouped_as(&app.admin_token(2), &[], true).await;
    assert_eq!(cache, "miss");
    let (cache, _) = app.grouped_as(&app.admin_token(2), &[], false).await;
    assert_eq!(cache, "hit");
    app.stop().await;
}

/// Warms queued before the projector first leads (an operator's "warm
/// all" while it starts): its bootstrap empties the read model, and each
/// warming tenant keeps its warm, epoch and job. Given a new one instead,
/// the queued command would be skipped as superseded and count the job
/// done while the tenant was still warming.
#[tokio::test]
async fn warms_queued_before_a_bootstrap_keep_their_epoch_and_job() {
    let (mut app, ds) = seeded(26).await;
    let admin = app.admin_token(1);
    let r = app
        .client
        .post(format!("{}/admin/cache/warm", app.address))
        .bearer_auth(&admin)
        .json(&json!({"all": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let job: Value = r.json().await.unwrap();
    let job_id = job["job_id"].as_str().unwrap().to_string();
    let keys = callboard_readmodel::Keys::new(&app.settings.redis.key_prefix);
    let mut r = redis(&app).await;
    let mut epochs = Vec::new();
    for &t in &ds.tenants {
        let raw: Option<String> = r.get(keys.state(callboard_domain::TenantId::new(t).unwrap())).await.unwrap();
        let TenantState::Warming(epoch) = TenantState::parse(raw.as_deref()) else { panic!("tenant {t}: {raw:?}") };
        epochs.push((t, epoch));
    }
    app.start_projector();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let job: Value = app
            .client
            .get(format!("{}/admin/cache/warm/{job_id}", app.address))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if job["state"] == "done" {
            assert_eq!(job["done"], ds.tenants.len(), "{job}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the job never finished: {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Done means warm, under the warm the job queued.
    for (t, epoch) in epochs {
        let raw: Option<String> = r.get(keys.state(callboard_domain::TenantId::new(t).unwrap())).await.unwrap();
        assert_eq!(TenantState::parse(raw.as_deref()), TenantState::Warm(epoch), "tenant {t}: {raw:?}");
        let (cache, cached) = app.grouped_as(&app.token(t), &[], false).await;
        assert_eq!(cache, "hit", "tenant {t}");
        callboard_tests::reference::assert_same(&cached, &app.live(t, &[]).await, &format!("tenant {t}"));
    }
    app.stop().await;
}

#[tokio::test]
async fn admin_api_warms_reports_and_invalidates() {
    let (mut app, ds) = seeded(24).await;
    app.start_projector();
    let admin = app.admin_token(1);
    let member = app.token(1);
    let url = |p: &str| format!("{}{p}", app.address);
    // Members are refused everywhere.
    for (method, path) in [
        ("POST", "/admin/cache/warm"),
        ("GET", "/admin/cache/status"),
        ("POST", "/admin/cache/invalidate"),
        ("GET", "/admin/cache/warm/w1"),
    ] {
        let req = if method == "POST" {
            app.client.post(url(path)).json(&json!({"all": true}))
        } else {
            app.client.get(url(path))
        };
        let r = req.bearer_auth(&member).send().await.unwrap();
        assert_eq!(r.status(), 403, "{path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "forbidden");
        let r = app.client.get(url(path)).send().await.unwrap();
        let expected = if method == "GET" { 401 } else { 405 };
        assert_eq!(r.status(), expected, "{path} without a token");
    }
    // Bad bodies.
    for bad in [
        json!({}),
        json!({"tenant_id": 1, "all": true}),
        json!({"tenant_id": -1}),
        json!({"all": false}),
        json!({"tenant": 1}),
    ] {
        let r = app.client.post(url("/admin/cache/warm")).bearer_auth(&admin).json(&bad).send().await.unwrap();
        assert_eq!(r.status(), 422, "{bad}");
    }
    // Warm everything; the job reaches done.
    let r =
        app.client.post(url("/admin/cache/warm")).bearer_auth(&admin).json(&json!({"all": true})).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let job: Value = r.json().await.unwrap();
    assert_eq!(job["tenants"], ds.tenants.len());
    let job_id = job["job_id"].as_str().unwrap().to_string();
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last = Value::Null;
    while tokio::time::Instant::now() < deadline {
        last = app
            .client
            .get(url(&format!("/admin/cache/warm/{job_id}")))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if last["state"] == "done" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last["state"], "done", "{last}");
    assert_eq!(last["done"], ds.tenants.len());
    let r = app.client.get(url("/admin/cache/warm/w999999")).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // Status: every tenant warm, with its indexed call count.
    let status: Value =
        app.client.get(url("/admin/cache/status")).bearer_auth(&admin).send().await.unwrap().json().await.unwrap();
    let rows = status["tenants"].as_array().unwrap();
    assert_eq!(rows.len(), ds.tenants.len(), "{status}");
    for row in rows {
        let t = row["tenant_id"].as_i64().unwrap();
        let expected = ds
            .calls
            .iter()
            .filter(|c| {
                callboard_readmodel::codec::CallEntry::from_document(&with_id(c))
                    .is_some_and(|e| e.place.tenant.get() == t)
            })
            .count();
        assert_eq!(row["state"], "warm", "{row}");
        assert_eq!(row["calls"], expected, "{row}");
    }
    assert!(status["projector"]["events_applied"].is_u64());
    let r = app.client.get(url("/admin/cache/status?tenant_id=abc")).bearer_auth(&admin).send().await.unwrap();
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "invalid_parameter");
    let one: Value = app
        .client
        .get(url("/admin/cache/status?tenant_id=2"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["tenants"].as_array().unwrap().len(), 1);
    // Invalidate one tenant: its next answer is live, then it warms again.
    let (cache, _) = app.grouped_as(&app.token(2), &[], false).await;
    assert_eq!(cache, "hit");
    let r = app
        .client
        .post(url("/admin/cache/invalidate"))
        .bearer_auth(&admin)
        .json(&json!({"tenant_id": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (cache, _) = app.grouped_as(&app.token(2), &[], false).await;
    assert_eq!(cache, "miss");
    let (hit, cached, live) = app.wait_for_projection(2, &[], WAIT).await;
    assert!(hit);
    callboard_tests::reference::assert_same(&cached, &live, "re-warmed after invalidate");
    // Readiness with a projector, and the metrics.
    let r = app.client.get(url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["dependencies"], json!({"mongodb": true, "projector": true}));
    let r = app.client.get(url("/projectorz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["status"], "up");
    assert!(body["heartbeat_age_ms"].as_i64().is_some_and(|a| (0..15_000).contains(&a)), "{body}");
    let metrics = app.client.get(url("/metrics")).send().await.unwrap().text().await.unwrap();
    for name in [
        "callboard_grouped_request_duration_seconds_bucket{cache=\"hit\"",
        "callboard_grouped_request_duration_seconds_bucket{cache=\"miss\"",
        "callboard_projector_events_applied",
        "callboard_projection_lag_ms",
        "callboard_warms_run",
    ] {
        assert!(metrics.contains(name), "missing {name} in\n{metrics}");
    }
    app.stop().await;
}

/// Generated documents get their `_id` from the server; the entry needs one.
fn with_id(call: &Document) -> Document {
    let mut c = call.clone();
    c.insert("_id", 1);
    c
}

#[tokio::test]
async fn lost_change_stream_history_marks_cold_and_rewarms() {
    let (mut app, _) = seeded(25).await;
    app.start_projector();
    warm_up(&app, 3, &[]).await;
    app.stop_projector().await;
    // A checkpoint MongoDB cannot resume from.
    let bogus = bson::to_vec(&doc! {"t": {"_data": "826000000000000000000000000000000000000000"}}).unwrap();
    let mut r = redis(&app).await;
    let _: () = r.set("cb:{g}:ckpt:0", bogus).await.unwrap();
    app.db
        .collection::<Document>(CALLS)
        .insert_one(doc! {"id": 77_777, "tenant_id": 3, "status_id": 1, "subject": "while down"})
        .await
        .unwrap();
    app.start_projector();
    let (hit, cached, live) = app.wait_for_projection(3, &[], WAIT).await;
    assert!(hit, "tenant 3 did not come back warm");
    callboard_tests::reference::assert_same(&cached, &live, "after history loss");
    assert!(cached.to_string().contains("while down"));
    let lost: Option<i64> = r.hget("cb:{g}:progress", "history_lost_total").await.unwrap();
    assert_eq!(lost, Some(1));
    app.stop().await;
}

/// A read model left by an older version (another format, or none
/// recorded) is never served: reads go live until the projector, finding a
/// checkpoint beside a foreign format, rebuilds and re-warms.
#[tokio::test]
async fn a_read_model_in_another_format_is_rebuilt_not_served() {
    let (mut app, _) = seeded(27).await;
    app.start_projector();
    warm_up(&app, 2, &[]).await;
    app.stop_projector().await;
    // What an older version leaves: no format mark, a state of another
    // format, text members, its keys.
    let mut r = redis(&app).await;
    for p in 0..8 {
        let _: () = r.del(format!("cb:{{g}}:schema:{p}")).await.unwrap();
    }
    let _: () = r.set("cb:{t2}:state", "2:warm:1").await.unwrap();
    let _: () = r.hset("cb:{g}:tstate", 2, "warm:1").await.unwrap();
    let _: () = r.zadd("cb:{t2}:z:1", "8000000000000063:legacy-member", 1.9e12).await.unwrap();
    let _: () = r.hset("cb:{t2}:idx", "legacy", "1|n|x").await.unwrap();
    let fields = [("limit", "7"), ("include_enrichment", "false")];
    let (cache, _) = app.grouped_as(&app.token(2), &fields, false).await;
    assert_eq!(cache, "miss", "data in another format must not be served");
    app.start_projector();
    let (hit, cached, live) = app.wait_for_projection(2, &fields, WAIT).await;
    assert!(hit, "tenant 2 did not come back warm after the rebuild");
    callboard_tests::reference::assert_same(&cached, &live, "after the format rebuild");
    for legacy in ["cb:{t2}:idx", "cb:{g}:tstate"] {
        let left: bool = r.exists(legacy).await.unwrap();
        assert!(!left, "the rebuild leaves no key of the old format: {legacy}");
    }
    app.stop().await;
}

/// On an idle stream the projector re-saves the stream's post-batch token.
/// Real MongoDB advances that token with cluster time; the stand-in returns
/// the last event's, so this pins that the idle saves are harmless: the
/// projector resumes from them with nothing lost and no history loss.
#[tokio::test]
async fn idle_checkpoints_resume_cleanly() {
    let (mut app, _) = seeded(26).await;
    app.start_projector();
    warm_up(&app, 1, &[]).await;
    // One event, so that a batch checkpoint exists, then idle long enough
    // for several idle checkpoints.
    app.db
        .collection::<Document>(CALLS)
        .insert_one(doc! {"id": 88_887, "tenant_id": 1, "status_id": 1, "subject": "before idling"})
        .await
        .unwrap();
    let (hit, cached, _) = app.wait_for_projection(1, &[], WAIT).await;
    assert!(hit && cached.to_string().contains("before idling"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    app.stop_projector().await;
    let mut r = redis(&app).await;
    let saved: Option<Vec<u8>> = r.get("cb:{g}:ckpt:0").await.unwrap();
    assert!(saved.is_some_and(|c| !c.is_empty()), "no checkpoint after idling");
    // Writes while no projector runs are applied from the checkpoint.
    app.db
        .collection::<Document>(CALLS)
        .insert_one(doc! {"id": 88_888, "tenant_id": 1, "status_id": 1, "subject": "while stopped"})
        .await
        .unwrap();
    app.start_projector();
    let (hit, cached, live) = app.wait_for_projection(1, &[], WAIT).await;
    assert!(hit);
    callboard_tests::reference::assert_same(&cached, &live, "resumed from an idle checkpoint");
    assert!(cached.to_string().contains("while stopped"));
    let lost: Option<i64> = r.hget("cb:{g}:progress", "history_lost_total").await.unwrap();
    assert_eq!(lost, None, "resuming from an idle checkpoint must not count as history lost");
    app.stop().await;
}

/// Documents are kept only for the first calls of each status (here 4,
/// refilled below 3). Removals near the top shrink the window and the
/// projector refills it from MongoDB; reads never show a call without its
/// document, and limits past the window are answered live.
#[tokio::test]
async fn document_windows_are_refilled_and_bounded() {
    use callboard_readmodel::write::DocWindow;
    let mut app = spawn_app().await;
    app.insert(CALL_STATUS, &[doc! {"id": 1, "name": "Open"}, doc! {"id": 2, "name": "Done"}]).await;
    app.insert(USERS, &[doc! {"id": 1, "name": "Ann", "email": "a@x"}]).await;
    let calls: Vec<Document> = (1..=12_i64)
        .map(|i| {
            doc! {"id": i, "tenant_id": 1, "status_id": if i % 4 == 0 { 2 } else { 1 }, "owner_id": 1,
            "subject": format!("call {i}"), "start_time": DateTime::from_millis(1_700_000_000_000 + i * 60_000)}
        })
        .collect();
    app.insert(CALLS, &calls).await;
    app.start_projector_with(DocWindow { size: 4, floor: 3 });
    let (cache, _) = app.grouped_as(&app.token(1), &[], false).await;
    assert_eq!(cache, "miss");
    let within = [vec![("limit", "3")], vec![("limit", "1")], vec![("limit", "9"), ("include_enrichment", "false")]];
    let check = |context: &'static str| {
        let app = &app;
        let within = within.clone();
        async move {
            for fields in &within {
                let (hit, cached, live) = app.wait_for_projection(1, fields, WAIT).await;
                assert!(hit, "{context}: {fields:?} never became a hit");
                callboard_tests::reference::assert_same(&cached, &live, &format!("{context}: {fields:?}"));
            }
            // Past the window: answered live, and right.
            let live = app.live(1, &[("limit", "9")]).await;
            let longest = live["data"].as_array().unwrap().iter().map(|g| g["total_calls"].as_u64().unwrap()).max();
            let (cache, cached) = app.grouped_as(&app.token(1), &[("limit", "9")], false).await;
            let expected = if longest > Some(4) { "miss" } else { "hit" };
            assert_eq!(cache, expected, "{context}: limit 9 over 4-call windows, longest status {longest:?}");
            callboard_tests::reference::assert_same(&cached, &live, context);
            let mut r = redis(app).await;
            let docs: u64 = r.hlen("cb:{t1}:doc").await.unwrap();
            assert!(docs <= 8, "{context}: {docs} documents kept for two 4-call windows");
        }
    };
    check("after warm").await;

    let coll = app.db.collection::<Document>(CALLS);
    // Newest first in status 1: 11, 10, 9, 7, 6, 5, 3, 2, 1. A call deep in
    // the list changes while it has no document in Redis.
    coll.update_one(doc! {"id": 2}, doc! {"$set": {"subject": "edited outside the window"}}).await.unwrap();
    coll.delete_one(doc! {"id": 11}).await.unwrap();
    coll.update_one(doc! {"id": 10}, doc! {"$set": {"deleted": 1}}).await.unwrap();
    coll.update_one(doc! {"id": 9}, doc! {"$set": {"status_id": 2}}).await.unwrap();
    check("after the top three left").await;
    for id in [7, 6, 5, 3] {
        coll.delete_one(doc! {"id": id}).await.unwrap();
    }
    check("after the window emptied").await;
    let (_, body) = app.grouped_as(&app.token(1), &[("limit", "3")], false).await;
    assert!(body.to_string().contains("edited outside the window"), "{body}");
    // Newer and older calls arrive; the window keeps the newest.
    coll.insert_many([
        doc! {"id": 20, "tenant_id": 1, "status_id": 1, "start_time": DateTime::from_millis(1_800_000_000_000)},
        doc! {"id": 21, "tenant_id": 1, "status_id": 1, "start_time": DateTime::from_millis(1_600_000_000_000)},
        doc! {"id": 22, "tenant_id": 1, "status_id": 1},
    ])
    .await
    .unwrap();
    check("after inserts").await;
    app.stop().await;
}

/// Redis dies: reads degrade to live answers (never an error), and once an
/// empty Redis is back the API's connections recover, the projector
/// rebuilds, and the tenant is served from the cache again.
#[tokio::test]
async fn a_redis_restart_degrades_to_live_answers_then_recovers() {
    let (mut app, ds) = seeded(5).await;
    app.start_projector();
    let t = ds.tenants[0];
    app.grouped_as(&app.token(t), &[], false).await;
    assert_all_cached_equal_live(&app, &[t], "before the outage").await;

    if app.services.redis.is_cluster() {
        eprintln!("a Redis restart is a single-node fault; the cluster's are tested in cluster.rs");
        return app.stop().await;
    }
    app.services.redis.single().expect("a single node").kill();
    let fields = [("limit", "7")];
    let (cache, cached) = app.grouped_as(&app.token(t), &fields, false).await;
    assert_eq!(cache, "miss", "with Redis down the answer is live");
    callboard_tests::reference::assert_same(&cached, &app.live(t, &fields).await, "Redis down");

    let dir = app.services.dir.path().to_path_buf();
    app.services.redis.single().expect("a single node").restart(&dir).expect("restart Redis");
    // Empty again: the first request finds the tenant cold and warms it.
    app.grouped_as(&app.token(t), &[], false).await;
    assert_all_cached_equal_live(&app, &[t], "after Redis came back empty").await;
    app.stop().await;
}

/// A cached read takes two round trips (members, then documents), and a
/// kept answer is reused while its label holds; writes racing either must
/// never show a call under a status it is not in at that moment. Calls
/// move between two statuses while reads run; every hit must list each
/// call under its own status, once, with totals that add up; the hits must
/// follow the writes, and the last equal the final data. Run without the
/// response cache (every hit is a racing read: the version check) and with
/// it (most hits are reuses: the label check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_racing_writes_see_one_moment() {
    // No cache; reuse after a label read; and with tracking too (the
    // default), where most reuses take no round trip.
    for (response_cache_mb, track_ms) in [(0, 0), (64, 0), (64, 10)] {
        let services = callboard_testkit::Services::start().expect("start Redis and MongoDB");
        let mut app = callboard_tests::spawn_app_configured(services, |s| {
            s.query.response_cache_mb = response_cache_mb;
            s.query.response_cache_track_ms = track_ms;
        })
        .await;
        let tracked_before = app.counter(TRACKED_REUSES).await;
        race_reads_against_writes(&mut app, response_cache_mb).await;
        let tracked = app.counter(TRACKED_REUSES).await - tracked_before;
        eprintln!("tracking {track_ms} ms: {tracked} reuses with no round trip during the race");
        // Tracking is for a single node; a cluster reads the label. Once
        // the writes have stopped, the last answer is reused with no round
        // trip (so the pass did run with tracking on), and is still right.
        if track_ms > 0 && !app.settings.redis.is_cluster() {
            let fields = [("limit", "100")];
            let live = app.live(1, &fields).await;
            tracked_reuse(&app, &app.token(1), &fields, &live).await;
        } else {
            assert_eq!(tracked, 0, "reuses with no round trip without tracking");
        }
        app.stop().await;
    }
}

/// Kept answers reused with no round trip (Redis's tracking vouched for
/// them).
const TRACKED_REUSES: &str = "callboard_response_cache_reuses_total{check=\"tracking\"}";

async fn race_reads_against_writes(app: &mut TestApp, response_cache_mb: u64) {
    app.insert(CALL_STATUS, &[doc! {"id": 1, "name": "Open"}, doc! {"id": 2, "name": "Done"}]).await;
    let calls: Vec<Document> = (1..=30_i64)
        .map(|i| doc! {"id": i, "tenant_id": 1, "status_id": 1, "start_time": DateTime::from_millis(1_700_000_000_000 + i)})
        .collect();
    app.insert(CALLS, &calls).await;
    app.start_projector();
    let fields = [("limit", "100")];
    warm_up(app, 1, &fields).await;

    let coll = app.db.collection::<Document>(CALLS);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0_i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let id = 26 + n % 5; // among the newest, so always shown
                let status = if n % 2 == 0 { 1 } else { 2 };
                coll.update_one(doc! {"id": id}, doc! {"$set": {"status_id": status, "n": n}}).await.unwrap();
            }
            n
        })
    };
    let token = app.token(1);
    let (mut hits, started) = (0, std::time::Instant::now());
    let mut answers = std::collections::HashSet::new();
    // 3 s, or until enough hits raced the writes on a loaded machine.
    while started.elapsed() < Duration::from_secs(3) || (hits <= 100 && started.elapsed() < Duration::from_secs(30)) {
        let (cache, body) = app.grouped_as(&token, &fields, false).await;
        if cache != "hit" {
            continue;
        }
        hits += 1;
        let mut seen = std::collections::BTreeSet::new();
        let mut total = 0;
        for group in body["data"].as_array().unwrap() {
            let status = group["id"].as_i64().unwrap();
            total += group["total_calls"].as_i64().unwrap();
            for call in group["calls"].as_array().unwrap() {
                assert_eq!(call["status_id"].as_i64(), Some(status), "call listed under another status: {body}");
                assert!(seen.insert(call["id"].as_i64().unwrap()), "call listed twice: {body}");
            }
        }
        assert_eq!((total, seen.len()), (30, 30), "{body}");
        answers.insert(body.to_string());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.await.unwrap();
    eprintln!(
        "response cache {response_cache_mb} MiB: {hits} cached reads ({} different answers) checked against \
         {writes} concurrent moves",
        answers.len()
    );
    assert!(hits > 100 && writes > 20, "too little overlap to mean anything: {hits} reads, {writes} writes");
    assert!(answers.len() > 1, "every hit was the same answer: the reads did not follow the writes");
    let (hit, cached, live) = app.wait_for_projection(1, &fields, WAIT).await;
    assert!(hit, "the last answer never became a hit");
    callboard_tests::reference::assert_same(&cached, &live, "after the writes");
}

/// Each API process keeps rendered answers and reuses one while the keys it
/// was read from are unchanged: repeated requests are reuses, a write to
/// another tenant leaves the answer reusable, and each kind of change to
/// what it shows (a call, a user, a global status, the tenant's own status)
/// is in the next answer once projected. Fails if the label misses any of
/// the keys those changes write.
#[tokio::test]
async fn kept_answers_are_reused_until_what_they_show_changes() {
    let mut app = spawn_app().await;
    app.insert(
        CALL_STATUS,
        &[
            doc! {"id": 1, "name": "Open"},
            doc! {"id": 2, "name": "Done"},
            doc! {"id": 7, "name": "Mine", "tenant_id": 1},
        ],
    )
    .await;
    app.insert(USERS, &(1..=3).map(|u| doc! {"id": u, "name": format!("User {u}")}).collect::<Vec<_>>()).await;
    let calls: Vec<Document> = (1..=12_i64)
        .map(|i| {
            let (tenant, status) = (if i <= 9 { 1 } else { 2 }, [1, 2, 7][i as usize % 3]);
            doc! {"id": i, "tenant_id": tenant, "status_id": status,
            "owner_id": 1 + i % 3, "start_time": DateTime::from_millis(1_700_000_000_000 + i)}
        })
        .collect();
    let fields = [("limit", "20")];
    project_and_warm(&mut app, &calls, &fields, &[1, 2]).await;
    let hits = "callboard_response_cache_lookups_total{result=\"hit\"}";
    let stale = "callboard_response_cache_lookups_total{result=\"stale\"}";

    let token = app.token(1);
    let (_, first) = app.grouped_as(&token, &fields, false).await;
    let before = app.counter(hits).await;
    for _ in 0..5 {
        let (cache, body) = app.grouped_as(&token, &fields, false).await;
        assert_eq!((cache.as_str(), &body), ("hit", &first), "a repeated request");
    }
    assert_eq!(app.counter(hits).await, before + 5, "five repeated requests, each a reuse");

    // Counts-only answers are kept per limit too: it is in their summary.
    for limit in ["5", "50"] {
        let counts = [("limit", limit), ("include_calls", "false")];
        for _ in 0..2 {
            let (hit, cached, live) = app.wait_for_projection(1, &counts, WAIT).await;
            assert!(hit, "counts-only, limit {limit}: not a hit");
            callboard_tests::reference::assert_same(&cached, &live, &format!("counts-only, limit {limit}"));
        }
    }

    // Another tenant's write leaves tenant 1's answer as it was.
    app.insert(CALLS, &[doc! {"id": 50, "tenant_id": 2, "status_id": 1, "owner_id": 1}]).await;
    let (hit, cached, live) = app.wait_for_projection(2, &fields, WAIT).await;
    assert!(hit, "tenant 2 never showed its new call");
    callboard_tests::reference::assert_same(&cached, &live, "tenant 2");
    let before = app.counter(hits).await;
    let (_, body) = app.grouped_as(&token, &fields, false).await;
    assert_eq!((&body, app.counter(hits).await), (&first, before + 1), "tenant 1 after tenant 2's write");

    let calls = app.db.collection::<Document>(CALLS);
    let users = app.db.collection::<Document>(USERS);
    let statuses = app.db.collection::<Document>(CALL_STATUS);
    let changes: [(&str, &str); 4] = [
        ("a call moved", "\"subject\":\"Moved\""),
        ("a user renamed", "Renamed"),
        ("a global status renamed", "Closed"),
        ("the tenant's status renamed", "Mine!"),
    ];
    for (change, shows) in changes {
        let stale_before = app.counter(stale).await;
        match change {
            "a call moved" => {
                calls.update_one(doc! {"id": 3}, doc! {"$set": {"status_id": 2, "subject": "Moved"}}).await.unwrap()
            }
            "a user renamed" => users.update_one(doc! {"id": 1}, doc! {"$set": {"name": "Renamed"}}).await.unwrap(),
            "a global status renamed" => {
                statuses.update_one(doc! {"id": 2}, doc! {"$set": {"name": "Closed"}}).await.unwrap()
            }
            _ => statuses.update_one(doc! {"id": 7}, doc! {"$set": {"name": "Mine!"}}).await.unwrap(),
        };
        let (hit, cached, live) = app.wait_for_projection(1, &fields, WAIT).await;
        assert!(hit && cached.to_string().contains(shows), "{change}: never shown: {cached}");
        callboard_tests::reference::assert_same(&cached, &live, change);
        assert!(app.counter(stale).await > stale_before, "{change}: the kept answer was not found stale");
    }
    app.stop().await;
}

/// With tracking, a kept answer is reused with no round trip until Redis
/// pushes an invalidation of a key of its label, or the tracking
/// connection is lost (whatever changed meanwhile was never pushed). The
/// keys here are written straight to Redis with the projector stopped, so
/// its watermark does not move, and only the invalidation (or the loss)
/// can end the reuse. Each change must be found stale, and the
/// answer must still be the live one. Fails if invalidations are ignored
/// or if a lost connection's confirmations outlive it.
#[tokio::test]
async fn tracked_reuses_end_with_an_invalidation_or_the_connection() {
    // The widest bound (a heartbeat every 500 ms), so that a late one
    // (a slow machine) does not have a request read the label anyway.
    let services = callboard_testkit::Services::start().expect("start Redis and MongoDB");
    let mut app = callboard_tests::spawn_app_configured(services, |s| s.query.response_cache_track_ms = 1_000).await;
    if app.settings.redis.is_cluster() {
        eprintln!("tracking is for a single node: on a cluster every reuse reads its label");
        return app.stop().await;
    }
    app.insert(CALL_STATUS, &[doc! {"id": 1, "name": "Open"}, doc! {"id": 2, "name": "Done"}]).await;
    app.insert(USERS, &[doc! {"id": 1, "name": "User 1"}]).await;
    let calls: Vec<Document> = (1..=6_i64)
        .map(|i| {
            doc! {"id": i, "tenant_id": 1 + i % 2, "status_id": 1 + i % 2, "owner_id": 1,
            "start_time": DateTime::from_millis(1_700_000_000_000 + i)}
        })
        .collect();
    let fields = [("limit", "20")];
    project_and_warm(&mut app, &calls, &fields, &[1, 2]).await;
    let token = app.token(1);
    let live = app.live(1, &fields).await;
    // Its watermarks (which it publishes while idle too) stop: a new one
    // would have the next request read the label anyway.
    app.stop_projector().await;
    let keys = callboard_readmodel::Keys::new(&app.settings.redis.key_prefix);
    let (one, two) = (callboard_domain::TenantId::new(1).unwrap(), callboard_domain::TenantId::new(2).unwrap());
    let mut conn = redis(&app).await;
    let mut stamp = 0;
    let mut touch = |key: String| {
        stamp += 1;
        redis::cmd("SET").arg(key).arg(format!("test-{stamp}")).to_owned()
    };

    tracked_reuse(&app, &token, &fields, &live).await;
    // Another tenant's key: tenant 1's answer is still right, and reused.
    let _: () = touch(keys.status_stamp(two)).query_async(&mut conn).await.unwrap();
    tracked_reuse(&app, &token, &fields, &live).await;
    for (change, key) in
        [("the tenant's status stamp", keys.status_stamp(one)), ("the users' stamp", keys.users_stamp())]
    {
        let _: () = touch(key).query_async(&mut conn).await.unwrap();
        found_stale(&app, &token, &fields, &live, change).await;
        tracked_reuse(&app, &token, &fields, &live).await;
    }

    // The connection lost: the next one has read none of the keys, so
    // nothing confirmed on the old one may be trusted on it.
    let old = tracking_connections(&mut conn).await;
    assert_eq!(old.len(), 1, "one tracking connection");
    let killed: u64 = redis::cmd("CLIENT").arg("KILL").arg("ID").arg(&old[0]).query_async(&mut conn).await.unwrap();
    assert_eq!(killed, 1);
    let deadline = std::time::Instant::now() + WAIT;
    while tracking_connections(&mut conn).await.iter().all(|id| *id == old[0]) {
        assert!(std::time::Instant::now() < deadline, "no new tracking connection");
        tokio::task::yield_now().await;
    }
    tracked_reuse(&app, &token, &fields, &live).await;
    let _: () = touch(keys.users_stamp()).query_async(&mut conn).await.unwrap();
    found_stale(&app, &token, &fields, &live, "the users' stamp, after a new connection").await;
    tracked_reuse(&app, &token, &fields, &live).await;
    app.stop().await;
}

/// The ids of the response cache's tracking connections (`CLIENT LIST`).
async fn tracking_connections(conn: &mut callboard_readmodel::Conn) -> Vec<String> {
    let clients: String = redis::cmd("CLIENT").arg("LIST").query_async(conn).await.unwrap();
    let name = format!("name={}", callboard_readmodel::tracking::CLIENT_NAME);
    clients
        .lines()
        .filter(|l| l.split(' ').any(|f| f == name))
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")).map(str::to_string))
        .collect()
}

/// Requests until one is a reuse with no round trip; each must be `live`.
async fn tracked_reuse(app: &TestApp, token: &str, fields: &[(&str, &str)], live: &Value) {
    let before = app.counter(TRACKED_REUSES).await;
    let deadline = std::time::Instant::now() + WAIT;
    while app.counter(TRACKED_REUSES).await == before {
        assert!(std::time::Instant::now() < deadline, "no reuse without a round trip");
        let (cache, body) = app.grouped_as(token, fields, false).await;
        assert_eq!(cache, "hit");
        callboard_tests::reference::assert_same(&body, live, "a reuse");
    }
}

/// Requests until the kept answer is found stale (its label read again
/// and changed); each must be `live`.
async fn found_stale(app: &TestApp, token: &str, fields: &[(&str, &str)], live: &Value, change: &str) {
    let stale = "callboard_response_cache_lookups_total{result=\"stale\"}";
    let before = app.counter(stale).await;
    let deadline = std::time::Instant::now() + WAIT;
    while app.counter(stale).await == before {
        assert!(std::time::Instant::now() < deadline, "{change}: the kept answer was never found stale");
        let (cache, body) = app.grouped_as(token, fields, false).await;
        // Redis is up: never live (a failed label read would be).
        assert_eq!(cache, "hit", "{change}");
        callboard_tests::reference::assert_same(&body, live, change);
    }
}

/// Redis going back in time (every key but the leases restored from a
/// snapshot, as from an older RDB) does not bring back a label a kept
/// answer was read at: the projector replays from the restored checkpoint,
/// the replay's version is new, and the answer shows every call. With the
/// version a plain counter the replay (one batch) counts it back to the
/// kept answer's, and the answer without the last call is reused.
#[tokio::test]
async fn a_redis_restored_from_an_older_snapshot_brings_no_kept_answer_back() {
    let mut app = spawn_app().await;
    app.insert(CALL_STATUS, &[doc! {"id": 1, "name": "Open"}]).await;
    app.insert(USERS, &[doc! {"id": 1, "name": "User 1"}]).await;
    let call = |id: i64| {
        doc! {"id": id, "tenant_id": 1, "status_id": 1, "owner_id": 1,
        "start_time": DateTime::from_millis(1_700_000_000_000 + id)}
    };
    app.insert(CALLS, &(1..=3).map(call).collect::<Vec<_>>()).await;
    app.start_projector();
    let fields = [("limit", "20")];
    warm_up(&app, 1, &fields).await;

    // The snapshot: every key of this app but the leases, with its TTL.
    let model = app.settings.redis.connect().await.unwrap();
    let prefix = app.settings.redis.key_prefix.clone();
    let mut conn = redis(&app).await;
    let mut snapshot: Vec<(String, Vec<u8>, i64)> = Vec::new();
    for key in model.scan(&format!("{prefix}:*")).await.unwrap() {
        if key.contains(":lease:") {
            continue;
        }
        let dump: Option<Vec<u8>> = redis::cmd("DUMP").arg(&key).query_async(&mut conn).await.unwrap();
        let ttl: i64 = redis::cmd("PTTL").arg(&key).query_async(&mut conn).await.unwrap();
        if let Some(dump) = dump {
            snapshot.push((key, dump, ttl.max(0)));
        }
    }
    assert!(!snapshot.is_empty(), "nothing to snapshot under {prefix}");

    // A call after the snapshot, shown and kept.
    app.insert(CALLS, &[call(4)]).await;
    let (hit, kept, live) = app.wait_for_projection(1, &fields, WAIT).await;
    assert!(hit, "call 4 never shown");
    callboard_tests::reference::assert_same(&kept, &live, "after call 4");

    // Redis back at the snapshot, a call written meanwhile, the projector
    // started again: it resumes from the restored checkpoint.
    app.stop_projector().await;
    app.insert(CALLS, &[call(5)]).await;
    for key in model.scan(&format!("{prefix}:*")).await.unwrap() {
        if !key.contains(":lease:") {
            let _: () = conn.del(&key).await.unwrap();
        }
    }
    for (key, dump, ttl) in &snapshot {
        let _: () =
            redis::cmd("RESTORE").arg(key).arg(ttl).arg(dump).arg("REPLACE").query_async(&mut conn).await.unwrap();
    }
    // No read until the replay has written: a read of the restored state
    // would replace the kept answer (its label differs) and hide the case.
    let version = callboard_readmodel::Keys::new(&prefix).version(callboard_domain::TenantId::new(1).unwrap());
    let restored: Option<String> = conn.get(&version).await.unwrap();
    app.start_projector();
    let deadline = std::time::Instant::now() + WAIT;
    while conn.get::<_, Option<String>>(&version).await.unwrap() == restored {
        assert!(std::time::Instant::now() < deadline, "the projector never replayed onto the restored state");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (hit, cached, live) = app.wait_for_projection(1, &fields, WAIT).await;
    assert!(hit, "tenant 1 is not a hit after the restore");
    callboard_tests::reference::assert_same(&cached, &live, "after the restore and the replay");
    assert_ne!(cached, kept, "the answer kept before the restore");
    app.stop().await;
}

/// Concurrent requests for one tenant share the reads of its label: every
/// answer is the reused one, and Redis saw fewer label reads (`MGET`s)
/// than there were requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_label_reads() {
    let mut app = spawn_app().await;
    app.insert(CALL_STATUS, &[doc! {"id": 1, "name": "Open"}]).await;
    let calls: Vec<Document> =
        (1..=5_i64).map(|i| doc! {"id": i, "tenant_id": 1, "status_id": 1, "owner_id": 1}).collect();
    app.insert(CALLS, &calls).await;
    app.start_projector();
    let fields = [("limit", "20")];
    warm_up(&app, 1, &fields).await;
    let token = app.token(1);
    let (_, expected) = app.grouped_as(&token, &fields, false).await;
    // Summed over every node: a cluster answers INFO with one text per node.
    let mgets = || async {
        let info: redis::Value =
            redis::cmd("INFO").arg("commandstats").query_async(&mut redis(&app).await).await.unwrap();
        let texts: Vec<String> = match info {
            redis::Value::Map(nodes) => nodes.into_iter().map(|(_, v)| redis::from_redis_value(v).unwrap()).collect(),
            text => vec![redis::from_redis_value(text).unwrap()],
        };
        texts
            .iter()
            .flat_map(|t| t.lines())
            .filter_map(|l| l.strip_prefix("cmdstat_mget:calls="))
            .filter_map(|l| l.split(',').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    let before = mgets().await;
    let requests = 400;
    let answers = futures::future::join_all((0..requests).map(|_| app.grouped_as(&token, &fields, false))).await;
    let reads = mgets().await - before;
    for (cache, body) in &answers {
        assert_eq!((cache.as_str(), body), ("hit", &expected), "a concurrent request");
    }
    // A label read is one MGET on a single node, one per slot on a cluster.
    let per_read = if app.settings.redis.is_cluster() { 2 } else { 1 };
    eprintln!("{requests} concurrent requests, {reads} MGETs ({per_read} per label read)");
    assert!(reads > 0, "no label read reached Redis");
    assert!(reads < requests * per_read, "{reads} MGETs for {requests} concurrent requests: no label read was shared");
    app.stop().await;
}

/// A change stream whose server-side cursor goes away (killed by an
/// operator, or closed with the connection that opened it) carries on from
/// where it stopped, with no event lost or repeated. Real MongoDB answers
/// the next getMore with CursorNotFound, which the driver resumes; the
/// stand-in answers with cursor id 0 and no error, which ends the driver's
/// stream, so `Source` reopens it after its last token.
#[tokio::test]
async fn a_change_stream_whose_cursor_is_killed_carries_on() {
    use callboard_projector::source::{Source, StartAt};
    use std::sync::{Arc, Mutex};
    let app = spawn_app().await;
    let cursors: Arc<Mutex<Vec<i64>>> = Arc::default();
    let mut options = mongodb::options::ClientOptions::parse(app.services.mongo.uri()).await.unwrap();
    let seen = cursors.clone();
    options.command_event_handler = Some(mongodb::event::EventHandler::callback(move |e| {
        if let mongodb::event::command::CommandEvent::Succeeded(s) = e {
            if let Ok(id) = s.reply.get_document("cursor").and_then(|c| c.get_i64("id")) {
                if id != 0 && s.command_name == "aggregate" {
                    seen.lock().unwrap().push(id);
                }
            }
        }
    }));
    let db = mongodb::Client::with_options(options).unwrap().database(app.db.name());
    let calls = app.db.collection::<Document>(CALLS);
    let mut source = Source::open(&db, StartAt::Now, None).await.unwrap();
    let ids = |events: &[mongodb::change_stream::event::ChangeStreamEvent<Document>]| -> Vec<i64> {
        // Numbers below 2^31 may come back as Int32 (the stand-in).
        events
            .iter()
            .filter_map(|e| callboard_domain::CallId::from_bson(e.full_document.as_ref()?.get("id")?))
            .map(|c| c.get())
            .collect()
    };
    let mut got = Vec::new();
    for id in 1..=3_i64 {
        calls.insert_one(doc! {"id": id, "tenant_id": 1, "status_id": 1}).await.unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while got.len() < 3 && std::time::Instant::now() < deadline {
        got.extend(ids(&source.next_batch(10, Duration::from_millis(500)).await.unwrap()));
    }
    assert_eq!(got, vec![1, 2, 3], "the stream before the kill");
    let cursor = *cursors.lock().unwrap().last().expect("the stream's cursor id");
    let killed = app.db.run_command(doc! {"killCursors": "$cmd.aggregate", "cursors": [cursor]}).await.unwrap();
    assert_eq!(killed.get_array("cursorsKilled").unwrap(), &vec![Bson::Int64(cursor)], "{killed}");
    for id in 4..=6_i64 {
        calls.insert_one(doc! {"id": id, "tenant_id": 1, "status_id": 1}).await.unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while got.len() < 6 && std::time::Instant::now() < deadline {
        got.extend(ids(&source.next_batch(10, Duration::from_millis(500)).await.unwrap()));
    }
    assert_eq!(got, (1..=6).collect::<Vec<_>>(), "every event once, in order, across the killed cursor");
    app.stop().await;
}

/// A renewal that fails (here: Redis refusing writes, `NOREPLICAS`) is
/// retried while the lease still runs, rather than given up at the first
/// error: once Redis takes writes again the lease is renewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_survives_renewals_that_fail_for_a_while() {
    use callboard_projector::lease::Lease;
    let services = callboard_testkit::Services::start().unwrap();
    let redis = callboard_tests::test_settings(&services, "lease").redis.connect().await.unwrap();
    let keys = callboard_readmodel::Keys::new("lease");
    let mut lease = Lease::new(redis.clone(), &keys, "me".into(), Duration::from_millis(3000));
    assert!(lease.acquire().await.unwrap());
    let (keeper, renewer) = lease.keep_alive();
    let pttl = || async {
        let mut c = redis.get().await.unwrap();
        let ms: i64 = redis::cmd("PTTL").arg(keys.lease()).query_async(&mut c).await.unwrap();
        ms
    };
    // More good replicas than there are: every write is refused. Renewals
    // are due every second, so a PTTL under 1.8 s means one failed.
    services.redis.config_set("min-replicas-to-write", "10").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pttl().await > 1800 {
        assert!(std::time::Instant::now() < deadline, "the lease kept being renewed with writes refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    services.redis.config_set("min-replicas-to-write", "0").unwrap();
    // Writes taken again: the renewer, still trying, renews it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pttl().await < 2200 {
        assert!(std::time::Instant::now() < deadline, "the lease was never renewed: the renewer gave up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(keeper.wait_safe().await, "the leader may write again");
    assert!(!renewer.is_finished(), "still renewing");
    renewer.abort();
}

/// A write Redis rejects every time (here tenant 1's documents hash
/// replaced by a string, so every write of its calls fails with WRONGTYPE)
/// is a poison event: the tenant is quarantined and answered live, the
/// event and the error are reported, the rest of the stream goes on, and
/// only an operator's warm brings the tenant back.
#[tokio::test]
async fn a_poison_event_quarantines_its_tenant_and_the_stream_goes_on() {
    let (mut app, _) = seeded(31).await;
    app.start_projector();
    warm_up(&app, 1, &[]).await;
    warm_up(&app, 2, &[]).await;
    let keys = callboard_readmodel::Keys::new(&app.settings.redis.key_prefix);
    let one = callboard_domain::TenantId::new(1).unwrap();
    let mut r = redis(&app).await;
    let _: () = r.del(keys.docs(one)).await.unwrap();
    let _: () = r.set(keys.docs(one), "not a hash").await.unwrap();
    let calls = app.db.collection::<Document>(CALLS);
    let poison_id = bson::oid::ObjectId::new();
    calls
        .insert_one(doc! {"_id": poison_id, "id": 880_001, "tenant_id": 1, "status_id": 1,
        "start_time": DateTime::from_millis(1_800_000_000_000), "subject": "poison"})
        .await
        .unwrap();
    // Written after the poison event: shown once the stream goes past it.
    calls
        .insert_one(doc! {"id": 880_002, "tenant_id": 2, "status_id": 1,
        "start_time": DateTime::from_millis(1_800_000_000_000), "subject": "after the poison"})
        .await
        .unwrap();
    let (hit, cached, live) = app.wait_for_projection(2, &[], WAIT).await;
    assert!(hit, "the stream stopped at the poison event");
    callboard_tests::reference::assert_same(&cached, &live, "tenant 2 after the poison event");
    assert!(cached.to_string().contains("after the poison"));

    // Tenant 1 is quarantined: answered live, exactly, and not re-warmed.
    let (cache, answer) = app.grouped_as(&app.token(1), &[], false).await;
    assert_eq!(cache, "miss");
    callboard_tests::reference::assert_same(&answer, &app.live(1, &[]).await, "quarantined tenant 1");
    assert!(answer.to_string().contains("poison"), "the live answer has the call");
    let admin = app.admin_token(1);
    let status = |tenant: i64| {
        let req = app.client.get(format!("{}/admin/cache/status?tenant_id={tenant}", app.address)).bearer_auth(&admin);
        async move { req.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    // Another write of tenant 2, applied after the projector ran the
    // commands the miss above may have queued.
    calls
        .insert_one(doc! {"id": 880_003, "tenant_id": 2, "status_id": 1,
        "start_time": DateTime::from_millis(1_800_000_100_000), "subject": "later still"})
        .await
        .unwrap();
    let (hit, cached, _) = app.wait_for_projection(2, &[], WAIT).await;
    assert!(hit && cached.to_string().contains("later still"));
    let s = status(1).await;
    assert_eq!(s["tenants"][0]["state"], "quarantined", "{s}");
    assert_eq!(s["tenants"][0]["calls"], 0, "its calls were removed: {s}");
    let poison = s["poison_events"].as_array().expect("poison events");
    assert_eq!(poison.len(), 1, "{s}");
    assert_eq!(poison[0]["tenant_id"], 1);
    assert_eq!(poison[0]["operation"], "insert");
    assert!(poison[0]["document_key"].as_str().unwrap().contains(&poison_id.to_hex()), "{s}");
    assert!(poison[0]["event_id"].as_str().unwrap().contains("_data"), "{s}");
    assert!(poison[0]["error"].as_str().unwrap().contains("WRONGTYPE"), "{s}");
    let metrics = app.metrics().await;
    assert!(metrics.contains("callboard_poison_events_total 1\n"), "{metrics}");
    assert!(metrics.contains("callboard_cache_misses{reason=\"quarantined\"}"), "{metrics}");

    // An operator's warm brings it back, exactly, and clears the report.
    let r = app
        .client
        .post(format!("{}/admin/cache/warm", app.address))
        .bearer_auth(&admin)
        .json(&json!({"tenant_id": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let (hit, cached, live) = app.wait_for_projection(1, &[], WAIT).await;
    assert!(hit, "tenant 1 never warm again");
    callboard_tests::reference::assert_same(&cached, &live, "tenant 1 warmed again");
    let deadline = tokio::time::Instant::now() + WAIT;
    while !status(1).await["poison_events"].as_array().unwrap().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the poison report was never cleared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;
}

/// The settings that shape stored data are recorded with it. A projector
/// started with another `query.user_fields` stores the users again; one
/// with another `projector.doc_window` rebuilds; and an API process never
/// shows a user field outside its own allowlist, whatever Redis holds.
#[tokio::test]
async fn settings_that_shape_stored_data_are_applied_when_they_change() {
    use callboard_domain::render::UserFields;
    use callboard_readmodel::write::DocWindow;
    let (mut app, _) = seeded(37).await;
    let fields = |f: &[&str]| UserFields::new(f.iter().map(|s| s.to_string()).collect()).unwrap();
    // A projector with a longer allowlist than the API's, and a small
    // window: users stored with `password_hash`, windows of 2 calls.
    let window = |size| DocWindow { size, floor: size };
    app.start_projector_using(window(2), fields(&["id", "name", "email", "password_hash"]));
    let small = [("limit", "2")];
    warm_up(&app, 1, &small).await;
    let (cache, body) = app.grouped_as(&app.token(1), &small, false).await;
    assert_eq!(cache, "hit");
    assert!(body.to_string().contains("@example.com"), "enriched with emails: {body}");
    assert!(!body.to_string().contains("password_hash"), "the API showed a field outside its allowlist: {body}");
    callboard_tests::reference::assert_same(&body, &app.live(1, &small).await, "API allowlist over Redis's users");
    // Limits past the window are answered live meanwhile.
    let (cache, _) = app.grouped_as(&app.token(1), &[("limit", "50")], false).await;
    assert_eq!(cache, "miss", "a window of 2 cannot serve limit 50");

    // The same window, a shorter allowlist than the API's: users are
    // stored again without email, which the API then cannot show.
    app.stop_projector().await;
    app.start_projector_using(window(2), fields(&["id", "name"]));
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (cache, body) = app.grouped_as(&app.token(1), &small, false).await;
        if cache == "hit" && !body.to_string().contains("@example.com") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "users were not stored again: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The API's allowlist and the default window: users stored again with
    // email, the partition rebuilt with full windows, and limit 50 is a
    // hit equal to the live answer.
    app.stop_projector().await;
    app.start_projector();
    for fields in [&small[..], &[("limit", "50")][..]] {
        let (hit, cached, live) = app.wait_for_projection(1, fields, WAIT).await;
        assert!(hit, "{fields:?} never a hit after the settings changed");
        callboard_tests::reference::assert_same(&cached, &live, &format!("{fields:?} after the settings changed"));
    }
    app.stop().await;
}

/// A write that quarantining its tenant does not stop (here tenant 2's own
/// statuses hash replaced by a string: status writes are planned for every
/// tenant, cold or not) is skipped, counted and checkpointed past; the
/// stream goes on for the other tenants.
#[tokio::test]
async fn a_poison_event_that_quarantine_cannot_stop_is_skipped() {
    let (mut app, _) = seeded(41).await;
    app.start_projector();
    warm_up(&app, 2, &[]).await;
    // Tenant 3 comes after tenant 2 in a batch's writes: its writes show
    // only once the stream is past the event.
    warm_up(&app, 3, &[]).await;
    let keys = callboard_readmodel::Keys::new(&app.settings.redis.key_prefix);
    let two = callboard_domain::TenantId::new(2).unwrap();
    let mut r = redis(&app).await;
    let _: () = r.del(keys.statuses(two)).await.unwrap();
    let _: () = r.set(keys.statuses(two), "not a hash").await.unwrap();
    app.insert(CALL_STATUS, &[doc! {"id": 77, "name": "Two's new status", "tenant_id": 2}]).await;
    app.db
        .collection::<Document>(CALLS)
        .insert_one(doc! {"id": 880_101, "tenant_id": 3, "status_id": 1,
        "start_time": DateTime::from_millis(1_800_000_000_000), "subject": "after the skipped event"})
        .await
        .unwrap();
    // Quarantined, then skipped: counted twice.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let metrics = app.metrics().await;
        if metrics.contains("callboard_poison_events_total 2\n") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never quarantined and skipped: {metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A write after it shows: the stream went on past the event.
    app.db
        .collection::<Document>(CALLS)
        .insert_one(doc! {"id": 880_102, "tenant_id": 3, "status_id": 1,
        "start_time": DateTime::from_millis(1_800_000_100_000), "subject": "later still"})
        .await
        .unwrap();
    let (hit, cached, live) = app.wait_for_projection(3, &[], WAIT).await;
    assert!(hit, "the stream stopped at the event");
    callboard_tests::reference::assert_same(&cached, &live, "tenant 3 after the skipped event");
    assert!(cached.to_string().contains("later still"));
    let (cache, answer) = app.grouped_as(&app.token(2), &[], false).await;
    assert_eq!(cache, "miss", "tenant 2 is quarantined");
    callboard_tests::reference::assert_same(&answer, &app.live(2, &[]).await, "quarantined tenant 2");
    app.stop().await;
}

/// Every client's connection killed (a proxy restart, a network fault):
/// the API answers live meanwhile, the projector is led again from its
/// checkpoint (a lost connection is not retried in place: Redis may have
/// been restarted from older data), and writes made meanwhile show.
#[tokio::test]
async fn killed_redis_connections_lose_no_write() {
    let (mut app, _) = seeded(43).await;
    app.start_projector();
    warm_up(&app, 1, &[]).await;
    let fence = || fence_seq(&app);
    let before = fence().await;
    assert!(before.is_some());
    for round in 0..3 {
        app.services.redis.cli_each(&["CLIENT", "KILL", "TYPE", "normal"]).unwrap();
        app.db
            .collection::<Document>(CALLS)
            .insert_one(doc! {"id": 880_200 + round, "tenant_id": 1, "status_id": 1,
            "start_time": DateTime::from_millis(1_800_000_000_000 + round * 1000), "subject": format!("blip {round}")})
            .await
            .unwrap();
        let (hit, cached, live) = app.wait_for_projection(1, &[], WAIT).await;
        assert!(hit, "round {round}: never a hit again");
        callboard_tests::reference::assert_same(&cached, &live, &format!("after blip {round}"));
        assert!(cached.to_string().contains(&format!("blip {round}")));
    }
    app.stop().await;
}

/// Redis refusing writes for a moment (here `NOREPLICAS`, as during a
/// failover or with too few replicas) is retried in place by the leader:
/// the write made meanwhile shows once Redis takes writes again, and no new
/// leadership was needed (the fence counter did not move).
#[tokio::test]
async fn writes_refused_for_a_moment_are_retried_in_place() {
    let (mut app, _) = seeded(47).await;
    app.start_projector();
    warm_up(&app, 1, &[]).await;
    let fence = || fence_seq(&app);
    let refused = || {
        // `errorstat_NOREPLICAS:count=N` on every node, summed.
        let info = app.services.redis.cli_each(&["INFO", "errorstats"]).unwrap();
        info.iter()
            .flat_map(|(_, text)| text.lines().filter_map(|l| l.strip_prefix("errorstat_NOREPLICAS:count=")))
            .filter_map(|n| n.trim().parse::<u64>().ok())
            .sum::<u64>()
    };
    let before = fence().await;
    let refused_before = refused();
    app.services.redis.config_set("min-replicas-to-write", "10").unwrap();
    app.db
        .collection::<Document>(CALLS)
        .insert_one(doc! {"id": 880_300, "tenant_id": 1, "status_id": 1,
        "start_time": DateTime::from_millis(1_800_000_000_000), "subject": "while refused"})
        .await
        .unwrap();
    // The leader's writes were refused several times (the lease renewer
    // alone is refused once a second).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while refused() < refused_before + 4 {
        assert!(std::time::Instant::now() < deadline, "Redis never refused the projector's writes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.services.redis.config_set("min-replicas-to-write", "0").unwrap();
    let (hit, cached, live) = app.wait_for_projection(1, &[], WAIT).await;
    assert!(hit, "never a hit again");
    callboard_tests::reference::assert_same(&cached, &live, "after writes were refused");
    assert!(cached.to_string().contains("while refused"));
    assert_eq!(fence().await, before, "refused writes ended a leadership (a new fence token was taken)");
    app.stop().await;
}

/// While partition 0 rebuilds the users and global statuses (its format
/// mark `P:{g}:schema:0` deleted with them, set again once they are
/// loaded), no answer comes from the cache, whichever partition the
/// tenant is in: a half-loaded users hash is never shown.
#[tokio::test]
async fn no_answer_is_cached_while_partition_0_rebuilds_the_shared_data() {
    let (mut app, ds) = seeded(31).await;
    app.start_projector();
    for &t in &ds.tenants {
        warm_up(&app, t, &[]).await;
    }
    let keys = callboard_readmodel::Keys::new(&app.settings.redis.key_prefix).in_partition(0);
    let mut r = redis(&app).await;
    let mark: String = redis::AsyncCommands::get(&mut r, keys.schema()).await.unwrap();
    let _: () = redis::AsyncCommands::del(&mut r, keys.schema()).await.unwrap();
    let before = app.counter("callboard_cache_misses{reason=\"rebuilding\"}").await;
    for &t in &ds.tenants {
        let (cache, body) = app.grouped_as(&app.token(t), &[], false).await;
        assert_eq!(cache, "miss", "tenant {t} served from the cache while partition 0 rebuilds");
        callboard_tests::reference::assert_same(&body, &app.live(t, &[]).await, &format!("tenant {t}, answered live"));
    }
    let after = app.counter("callboard_cache_misses{reason=\"rebuilding\"}").await;
    assert_eq!(after - before, ds.tenants.len() as u64);
    let _: () = redis::AsyncCommands::set(&mut r, keys.schema(), mark).await.unwrap();
    for &t in &ds.tenants {
        let (cache, _) = app.grouped_as(&app.token(t), &[], false).await;
        assert_eq!(cache, "hit", "tenant {t} once the mark is back");
    }
    app.stop().await;
}
