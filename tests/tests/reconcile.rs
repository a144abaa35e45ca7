//! The projectors' background verifier (`reconcile.interval_s`): keys lost
//! in Redis are found and repaired without anyone asking, and a busy,
//! healthy system is never reported as drifted.

use std::time::Duration;

use bson::{doc, Bson, DateTime, Document};
use callboard_domain::{Limit, TenantId};
use callboard_projector::verifier::ReconcileConfig;
use callboard_readmodel::Keys;
use callboard_store::{CALLS, CALL_STATUS, USERS};
use callboard_tests::dataset::generate;
use callboard_tests::{spawn_app, TestApp};
use rand::{Rng, SeedableRng};
use redis::AsyncCommands;

/// The bound: answers are correct again within this of a loss.
const REPAIRED_WITHIN: Duration = Duration::from_secs(30);

/// The app with `seed`'s data, a projector verifying every `interval`,
/// and every tenant warm.
async fn verified_app(seed: u64, interval: Duration) -> (TestApp, Vec<i64>) {
    let mut app = spawn_app().await;
    let ds = generate(seed, 60);
    app.insert(CALL_STATUS, &ds.statuses).await;
    app.insert(USERS, &ds.users).await;
    app.insert(CALLS, &ds.calls).await;
    let fields = app.settings.query.user_fields().unwrap();
    // What the API's verification compares too: min(max_limit, window).
    let calls =
        app.settings.query.max_limit().unwrap().min(callboard_readmodel::write::DocWindow::default().size as u32);
    app.start_projector_configured(fields, |c| {
        c.reconcile = Some(ReconcileConfig {
            interval,
            max_queries_per_s: 50.0,
            calls: Limit::new(i64::from(calls), calls).unwrap(),
            live_timeout: Duration::from_secs(5),
        })
    });
    for &t in &ds.tenants {
        app.grouped_as(&app.token(t), &[], false).await;
    }
    for &t in &ds.tenants {
        let (hit, _, _) = app.wait_for_projection(t, &[], REPAIRED_WITHIN).await;
        assert!(hit, "tenant {t} never became a cache hit");
    }
    (app, ds.tenants)
}

/// `callboard_reconcile_drift_total{kind="<kind>"}`.
async fn drift(app: &TestApp, kind: &str) -> u64 {
    let line = format!("callboard_reconcile_drift_total{{kind=\"{kind}\"}} ");
    let metrics = app.metrics().await;
    metrics.lines().find_map(|l| l.strip_prefix(&line)?.parse().ok()).unwrap_or(0)
}

/// Waits until drift of `kind` has been counted past `before` and
/// `tenant`'s cached answer is a hit equal to the live one again; returns
/// how long that took.
async fn repaired(app: &TestApp, tenant: i64, kind: &str, before: u64, lost: &str) -> Duration {
    let started = tokio::time::Instant::now();
    let deadline = started + REPAIRED_WITHIN;
    while drift(app, kind).await <= before {
        assert!(tokio::time::Instant::now() < deadline, "{lost}: no {kind} drift found in {REPAIRED_WITHIN:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left = deadline - tokio::time::Instant::now();
    let (hit, cached, live) = app.wait_for_projection(tenant, &[], left).await;
    assert!(hit, "{lost}: not a cache hit again within {REPAIRED_WITHIN:?}");
    callboard_tests::reference::assert_same(&cached, &live, lost);
    started.elapsed()
}

#[tokio::test]
async fn lost_keys_are_found_and_repaired_without_being_asked() {
    let (app, _) = verified_app(95, Duration::from_secs(5)).await;
    let keys = Keys::new(&app.settings.redis.key_prefix);
    let one = TenantId::new(1).unwrap();
    let mut r = app.redis().await;

    // A sorted set: the counts and order of its status go wrong.
    let live = app.live(1, &[]).await;
    let biggest = live["data"].as_array().unwrap().iter().max_by_key(|g| g["total_calls"].as_i64()).unwrap().clone();
    let status = callboard_domain::StatusKey::new(biggest["id"].as_i64().unwrap());
    let before = drift(&app, "count").await;
    let removed: i64 = r.del(keys.zset(one, status)).await.unwrap();
    assert_eq!(removed, 1);
    let took = repaired(&app, 1, "count", before, "a deleted sorted set").await;
    eprintln!("a deleted sorted set: repaired in {took:?}");

    // A document: the read cannot be served (the API goes live), and the
    // verifier finds it.
    let live = app.live(1, &[]).await;
    let shown = live["data"][0]["calls"][0]["id"].as_i64().expect("a call shown");
    let members: Vec<Vec<u8>> = r.hkeys(keys.docs(one)).await.unwrap();
    let member = members
        .iter()
        .find(|m| callboard_readmodel::codec::member_call_id(m).map(|id| id.get()) == Some(shown))
        .expect("the shown call's document");
    let before = drift(&app, "document").await;
    let removed: i64 = r.hdel(keys.docs(one), member).await.unwrap();
    assert_eq!(removed, 1);
    let took = repaired(&app, 1, "document", before, "a deleted document").await;
    eprintln!("a deleted document: repaired in {took:?}");

    // The users hash: the API's own copies would hide it, the verifier
    // reads Redis itself; partition 0 is rebuilt, the users with it.
    let users: i64 = r.hlen(keys.users()).await.unwrap();
    assert!(users > 0);
    let before = drift(&app, "user").await;
    let removed: i64 = r.del(keys.users()).await.unwrap();
    assert_eq!(removed, 1);
    // A reader without copies of its own before the repair (it copies the
    // users it finds, none, under the current stamp): it must read them
    // again once they are back.
    let fresh = callboard_readmodel::ReadModel::new(app.settings.redis.connect().await.unwrap(), keys.clone())
        .with_user_fields(app.settings.query.user_fields().unwrap());
    let request = callboard_domain::GroupedRequest {
        limit: app.settings.query.default_limit().unwrap(),
        include_enrichment: true,
        include_calls: true,
    };
    let _ = fresh.grouped(one, &request).await.unwrap();
    let took = repaired(&app, 1, "user", before, "the deleted users hash").await;
    let deadline = tokio::time::Instant::now() + REPAIRED_WITHIN;
    while r.hlen::<_, i64>(keys.users()).await.unwrap() != users {
        assert!(tokio::time::Instant::now() < deadline, "the users were not stored again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = tokio::time::Instant::now() + REPAIRED_WITHIN;
    loop {
        let read = fresh.grouped(one, &request).await.unwrap();
        let live = app.live(1, &[]).await;
        match read {
            callboard_readmodel::Read::Hit(body)
                if serde_json::from_str::<serde_json::Value>(body.as_str()).unwrap() == live =>
            {
                break
            }
            other => assert!(tokio::time::Instant::now() < deadline, "a fresh reader after the repair: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("the deleted users hash: repaired in {took:?}");
    app.stop().await;
}

#[tokio::test]
async fn a_busy_healthy_system_is_never_reported_drifted() {
    // Every tenant checked every second: an hour at the default interval
    // (300 s) is 12 rounds; this runs about 15 per tenant while written
    // to (`CALLBOARD_TEST_RECONCILE_ROUNDS` writes, 400 by default).
    let (app, tenants) = verified_app(96, Duration::from_secs(1)).await;
    let checks = app.counter("callboard_reconcile_checks_total").await;
    let calls = app.db.collection::<Document>(CALLS);
    let users = app.db.collection::<Document>(USERS);
    let statuses = app.db.collection::<Document>(CALL_STATUS);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(96);
    let rounds: usize =
        std::env::var("CALLBOARD_TEST_RECONCILE_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(400);
    let started = tokio::time::Instant::now();
    for i in 0..rounds as i64 {
        let tenant = tenants[rng.gen_range(0..tenants.len())];
        let id = rng.gen_range(0..80_i64);
        let status: Bson =
            [Bson::Int32(1), Bson::String("2".into()), Bson::Int32(3), Bson::Int32(5)][rng.gen_range(0..4)].clone();
        let at = DateTime::from_millis(1_760_000_000_000 + rng.gen_range(0..10_000_000_i64));
        match rng.gen_range(0..10) {
            0..=2 => {
                calls.insert_one(doc! {"id": 700_000 + i, "tenant_id": tenant, "status_id": status, "subject": format!("w{i}"), "start_time": at, "owner_id": rng.gen_range(1..9)}).await.unwrap();
            }
            3..=4 => {
                calls
                    .update_one(doc! {"id": id}, doc! {"$set": {"status_id": status, "start_time": at}})
                    .await
                    .unwrap();
            }
            5 => {
                calls.update_one(doc! {"id": id}, doc! {"$set": {"deleted": rng.gen_range(0..2)}}).await.unwrap();
            }
            6 => {
                calls.update_one(doc! {"id": id}, doc! {"$set": {"tenant_id": tenant}}).await.unwrap();
            }
            7 => {
                calls.delete_one(doc! {"id": 700_000 + rng.gen_range(0..=i)}).await.unwrap();
            }
            8 => {
                users
                    .update_one(doc! {"id": rng.gen_range(1..9)}, doc! {"$set": {"name": format!("User {i}")}})
                    .await
                    .unwrap();
            }
            _ => {
                statuses
                    .update_one(
                        doc! {"id": 1, "tenant_id": {"$exists": false}},
                        doc! {"$set": {"color": format!("#{:06X}", i)}},
                    )
                    .await
                    .unwrap();
            }
        }
        // Bursts and pauses, so that some checks find the tenants still.
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..60))).await;
    }
    let busy = started.elapsed();
    // As many comparisons again as there are tenants after the last write
    // (about one each at this interval).
    let at_end = app.counter("callboard_reconcile_checks_total").await;
    let deadline = tokio::time::Instant::now() + REPAIRED_WITHIN;
    while app.counter("callboard_reconcile_checks_total").await < at_end + tenants.len() as u64 {
        assert!(tokio::time::Instant::now() < deadline, "the verifier stopped comparing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let compared = app.counter("callboard_reconcile_checks_total").await - checks;
    assert_eq!(app.counter("callboard_reconcile_drift_total").await, 0, "drift reported on a healthy system");
    let least = (rounds as u64 / 20).min(20);
    assert!(compared >= least, "only {compared} checks compared in {busy:?}: the test proves nothing");
    eprintln!("{rounds} writes in {busy:?}: {compared} checks compared, no drift");
    for &t in &tenants {
        let (hit, cached, live) = app.wait_for_projection(t, &[], REPAIRED_WITHIN).await;
        assert!(hit, "tenant {t} is no longer a hit");
        callboard_tests::reference::assert_same(&cached, &live, &format!("tenant {t} after the workload"));
    }
    app.stop().await;
}
