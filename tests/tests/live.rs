//! The live path under a herd: identical cold requests share one
//! aggregation, the number running at once is bounded, and each has a
//! deadline. MongoDB is frozen with SIGSTOP to hold queries open, so the
//! requests overlap by construction; against an external MongoDB (which a
//! test cannot freeze) the checks that need a freeze are skipped and the
//! rest still run.

use std::time::{Duration, Instant};

use callboard_store::{CALLS, CALL_STATUS, USERS};
use callboard_testkit::{Mongo, Services};
use callboard_tests::dataset::generate;
use callboard_tests::{spawn_app_configured, TestApp};
use serde_json::Value;

/// Waits (bounded) until `name` reaches `at_least`.
async fn until_counter(app: &TestApp, name: &str, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.counter(name).await < at_least {
        assert!(Instant::now() < deadline, "{name} never reached {at_least}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn freeze(app: &TestApp, stop: bool) -> bool {
    match &app.services.mongo {
        Mongo::Standin(s) => {
            s.pause(stop);
            true
        }
        Mongo::External(_) => false,
    }
}

async fn app_with_calls(configure: impl FnOnce(&mut callboard_settings::Settings)) -> TestApp {
    let app = spawn_app_configured(Services::start().unwrap(), configure).await;
    let ds = generate(21, 400);
    app.insert(CALL_STATUS, &ds.statuses).await;
    app.insert(USERS, &ds.users).await;
    app.insert(CALLS, &ds.calls).await;
    app
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_cold_requests_share_one_aggregation() {
    let app = app_with_calls(|_| {}).await;
    let token = app.token(1);
    let fields: &[(&str, &str)] = &[("limit", "7")];
    let expected = app.live(1, fields).await;
    let before = app.counter("callboard_live_queries_total").await;
    let coalesced_before = app.counter("callboard_live_coalesced_total").await;
    let frozen = freeze(&app, true);
    let requests: Vec<_> = (0..32)
        .map(|_| {
            let (client, url, token) = (app.client.clone(), app.grouped_url(), token.clone());
            tokio::spawn(async move {
                let r = client.post(url).bearer_auth(token).form(&[("limit", "7")]).send().await.unwrap();
                (r.status().as_u16(), r.json::<Value>().await.unwrap())
            })
        })
        .collect();
    if frozen {
        // Every request but the first has joined the first one's query,
        // which cannot finish while MongoDB is frozen.
        until_counter(&app, "callboard_live_coalesced_total", coalesced_before + 31).await;
        freeze(&app, false);
    }
    for r in requests {
        let (status, body) = r.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, expected, "a shared answer is the live answer");
    }
    let ran = app.counter("callboard_live_queries_total").await - before;
    let joined = app.counter("callboard_live_coalesced_total").await - coalesced_before;
    assert_eq!(ran + joined, 32, "each request ran a query or joined one");
    if frozen {
        assert_eq!(ran, 1, "32 identical concurrent requests cost one aggregation");
    }
    // Once it is done, the next request runs a query of its own.
    app.live(1, fields).await;
    assert_eq!(app.counter("callboard_live_queries_total").await - before, ran + 1, "the shared query is not kept");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_queries_are_bounded_in_number_and_time() {
    let app = app_with_calls(|s| {
        s.query.max_live_concurrency = 1;
        s.query.live_queue_wait_ms = 300;
        s.query.live_timeout_ms = 1500;
    })
    .await;
    if !freeze(&app, true) {
        eprintln!("external MongoDB: cannot freeze it, skipping");
        app.stop().await;
        return;
    }
    let before = app.counter("callboard_live_queries_total").await;
    let post = |limit: &'static str| {
        let (client, url, token) = (app.client.clone(), app.grouped_url(), app.token(1));
        tokio::spawn(async move {
            let started = Instant::now();
            let r = client.post(url).bearer_auth(token).form(&[("limit", limit)]).send().await.unwrap();
            let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
            (r.status().as_u16(), retry, r.json::<Value>().await.unwrap(), started.elapsed())
        })
    };
    // The one slot is taken by a query MongoDB cannot answer.
    let first = post("5");
    until_counter(&app, "callboard_live_queries_total", before + 1).await;
    // Other parameters: no query to join, and no slot.
    let (status, retry, body, _) = post("6").await.unwrap();
    assert_eq!((status, retry.as_deref(), body["error"].as_str()), (503, Some("1"), Some("database_busy")), "{body}");
    // The first one's deadline passes.
    let (status, _, body, took) = first.await.unwrap();
    assert_eq!((status, body["error"].as_str()), (504, Some("database_timeout")), "{body}");
    assert_eq!(body["status"], 504);
    assert!(took < Duration::from_secs(10), "the deadline held: {took:?}");
    freeze(&app, false);
    // MongoDB back: the slot was given back, and the answer is whole.
    let live = app.live(1, &[("limit", "5")]).await;
    let (_, member) = app.grouped_as(&app.token(1), &[("limit", "5")], false).await;
    assert_eq!(member, live, "the same answer through the bounded path");
    assert!(live["data"].as_array().is_some_and(|d| !d.is_empty()), "{live}");
    app.stop().await;
}
