//! `POST /admin/cache/verify`: a tenant's cached answer compared with
//! MongoDB's, drift found and repaired, changes in flight not taken for
//! drift.

use std::time::Duration;

use bson::{doc, DateTime, Document};
use callboard_store::{CALLS, CALL_STATUS, USERS};
use callboard_tests::dataset::generate;
use callboard_tests::{spawn_app, TestApp};
use redis::AsyncCommands;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

async fn warm_app(seed: u64) -> TestApp {
    let mut app = spawn_app().await;
    let ds = generate(seed, 60);
    app.insert(CALL_STATUS, &ds.statuses).await;
    app.insert(USERS, &ds.users).await;
    app.insert(CALLS, &ds.calls).await;
    app.start_projector();
    app.grouped_as(&app.token(1), &[], false).await;
    let (hit, _, _) = app.wait_for_projection(1, &[], WAIT).await;
    assert!(hit, "tenant 1 never became a cache hit");
    app
}

async fn verify(app: &TestApp, body: Value) -> (u16, Value) {
    let response = app
        .client
        .post(format!("{}/admin/cache/verify", app.address))
        .bearer_auth(app.admin_token(1))
        .json(&body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test]
async fn a_healthy_tenant_verifies_equal_even_while_it_changes() {
    let app = warm_app(91).await;
    let (status, v) = verify(&app, json!({"tenant_id": 1})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["tenant_id"].clone(), v["state"].clone(), v["equal"].clone()),
        (json!(1), json!("warm"), json!(true)),
        "{v}"
    );
    assert_eq!(v["differences"], json!([]));
    assert!(v["as_of"].as_str().is_some_and(|s| s.ends_with('Z')), "{v}");
    // Writes in flight while verifying: never drift.
    let db = app.db.clone();
    let writer = tokio::spawn(async move {
        for i in 0..60_i64 {
            db.collection::<Document>(CALLS)
                .insert_one(doc! {"id": 600_000 + i, "tenant_id": 1, "status_id": 1 + i % 3,
                "start_time": DateTime::from_millis(2_000_000_000_000 + i)})
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    while !writer.is_finished() {
        let (status, v) = verify(&app, json!({"tenant_id": 1})).await;
        assert_eq!(status, 200, "{v}");
        assert_ne!(v["equal"], json!(false), "a change in flight taken for drift: {v}");
    }
    assert_eq!(app.counter("callboard_reconcile_drift_total").await, 0);
    let (_, v) = verify(&app, json!({"tenant_id": 1})).await;
    assert_eq!(v["equal"], json!(true), "once the writes stop: {v}");
    // A cold tenant has nothing cached to compare.
    let (_, v) = verify(&app, json!({"tenant_id": 2})).await;
    assert_eq!((v["state"].clone(), v["equal"].clone()), (json!("cold"), Value::Null), "{v}");
    // Bad bodies.
    for bad in [json!({"all": true}), json!({"tenant_id": "x"}), json!({"tenant_id": -1}), json!({})] {
        let (status, v) = verify(&app, bad.clone()).await;
        assert_eq!(status, 422, "{bad}: {v}");
        assert_eq!(v["error"], "invalid_parameter", "{bad}: {v}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_lost_sorted_set_is_found_and_repaired() {
    let app = warm_app(92).await;
    let keys = callboard_readmodel::Keys::new(&app.settings.redis.key_prefix);
    let one = callboard_domain::TenantId::new(1).unwrap();
    let live = app.live(1, &[]).await;
    // The status with the most calls loses its sorted set.
    let groups = live["data"].as_array().unwrap();
    let biggest = groups.iter().max_by_key(|g| g["total_calls"].as_i64()).unwrap();
    let status = callboard_domain::StatusKey::new(biggest["id"].as_i64().unwrap());
    let mut r = app.redis().await;
    let removed: i64 = r.del(keys.zset(one, status)).await.unwrap();
    assert_eq!(removed, 1);
    let (code, v) = verify(&app, json!({"tenant_id": 1})).await;
    assert_eq!(code, 200, "{v}");
    assert_eq!((v["equal"].clone(), v["repaired"].clone()), (json!(false), json!(true)), "{v}");
    let kinds: Vec<&str> = v["differences"].as_array().unwrap().iter().filter_map(|d| d["kind"].as_str()).collect();
    assert!(kinds.contains(&"count"), "{v}");
    assert!(v["differences"].as_array().unwrap().iter().all(|d| d["status_id"] == biggest["id"]), "{v}");
    assert!(app.counter("callboard_reconcile_drift_total").await >= 1);
    // Repaired: answered live meanwhile, then from the cache again, exactly.
    let (hit, cached, live) = app.wait_for_projection(1, &[], WAIT).await;
    assert!(hit, "never warm again after the repair");
    callboard_tests::reference::assert_same(&cached, &live, "after the repair");
    let (_, v) = verify(&app, json!({"tenant_id": 1})).await;
    assert_eq!(v["equal"], json!(true), "{v}");
    app.stop().await;
}
