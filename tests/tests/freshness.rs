//! The freshness contract: every answer's `X-Callboard-As-Of` and
//! `X-Callboard-Lag-Ms`, read-your-writes with `min_as_of`, and bounded
//! staleness with `max_staleness_ms`.

use std::time::{Duration, Instant};

use bson::{doc, DateTime, Document};
use callboard_store::{CALLS, CALL_STATUS, USERS};
use callboard_tests::dataset::generate;
use callboard_tests::{spawn_app, TestApp};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// An answer with its freshness headers.
#[derive(Debug)]
struct Fresh {
    status: u16,
    cache: String,
    as_of_ms: Option<u64>,
    as_of: String,
    lag_ms: Option<u64>,
    body: Value,
}

/// How a request's parameters are sent.
#[derive(Debug, Clone, Copy)]
enum Encoding {
    Multipart,
    Query,
    Form,
    Json,
}

async fn ask(app: &TestApp, tenant: i64, fields: &[(&str, Value)], encoding: Encoding) -> Fresh {
    let text = |v: &Value| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
    let pairs: Vec<(String, String)> = fields.iter().map(|(k, v)| (k.to_string(), text(v))).collect();
    let req = app.client.post(app.grouped_url()).bearer_auth(app.token(tenant));
    let req = match encoding {
        Encoding::Multipart => {
            let mut form = reqwest::multipart::Form::new();
            for (k, v) in &pairs {
                form = form.text(k.clone(), v.clone());
            }
            req.multipart(form)
        }
        Encoding::Query => req.query(&pairs),
        Encoding::Form => req.form(&pairs),
        Encoding::Json => {
            let object: serde_json::Map<String, Value> =
                fields.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
            req.json(&object)
        }
    };
    let response = req.send().await.expect("request sent");
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let as_of = header("x-callboard-as-of");
    let as_of_ms = chrono::DateTime::parse_from_rfc3339(&as_of).ok().map(|t| t.timestamp_millis() as u64);
    let lag_ms = header("x-callboard-lag-ms").parse().ok();
    let cache = header("x-cache");
    let status = response.status().as_u16();
    let body = response.json().await.expect("a JSON body");
    Fresh { status, cache, as_of_ms, as_of, lag_ms, body }
}

async fn seeded(seed: u64) -> TestApp {
    let app = spawn_app().await;
    let ds = generate(seed, 60);
    app.insert(CALL_STATUS, &ds.statuses).await;
    app.insert(USERS, &ds.users).await;
    app.insert(CALLS, &ds.calls).await;
    app
}

async fn warm_up(app: &TestApp, tenant: i64) {
    app.grouped_as(&app.token(tenant), &[], false).await;
    let (hit, _, _) = app.wait_for_projection(tenant, &[], WAIT).await;
    assert!(hit, "tenant {tenant} never became a cache hit");
}

/// A seeded app with its projector running and tenant 1 warm.
async fn warm_app(seed: u64) -> TestApp {
    let mut app = seeded(seed).await;
    app.start_projector();
    warm_up(&app, 1).await;
    app
}

/// A call of tenant 1 newer than every other (so it leads its status).
fn new_call(id: i64) -> Document {
    doc! {"id": id, "tenant_id": 1, "status_id": 1, "subject": format!("new call {id}"),
    "start_time": DateTime::from_millis(2_000_000_000_000 + id)}
}

/// Polls until a hit of `tenant` reports a lag above `ms` (the projector
/// stopped), bounded.
async fn until_lag_above(app: &TestApp, tenant: i64, ms: u64) -> Fresh {
    let deadline = Instant::now() + WAIT;
    loop {
        let answer = ask(app, tenant, &[], Encoding::Multipart).await;
        if answer.lag_ms.is_some_and(|l| l > ms) || Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn every_answer_says_how_fresh_it_is_and_an_idle_watermark_keeps_up() {
    let mut app = seeded(81).await;
    app.start_projector();
    // Cold: live, as of its query's start.
    let before = now_ms();
    let live = ask(&app, 1, &[], Encoding::Multipart).await;
    let after = now_ms();
    assert_eq!((live.status, live.cache.as_str()), (200, "miss"), "{live:?}");
    let as_of = live.as_of_ms.expect("X-Callboard-As-Of is RFC 3339");
    assert!(
        (before..=after).contains(&as_of),
        "a live answer is as of its query's start: {before} <= {as_of} <= {after}"
    );
    assert!(live.as_of.ends_with('Z') && live.as_of.len() == "2026-12-01T10:00:00.123Z".len(), "{}", live.as_of);
    assert!(live.lag_ms.is_some_and(|l| l <= after - before), "{live:?}");

    warm_up(&app, 1).await;
    let first = ask(&app, 1, &[], Encoding::Multipart).await;
    assert_eq!(first.cache, "hit");
    // No writes for two seconds: the watermark moves on regardless.
    let idle = Instant::now();
    let mut hits = Vec::new();
    while idle.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        hits.push(ask(&app, 1, &[], Encoding::Multipart).await);
    }
    for hit in &hits {
        assert_eq!(hit.cache, "hit");
        let lag = hit.lag_ms.expect("X-Callboard-Lag-Ms");
        assert!(lag < 1000, "an idle projector's answers stay within a second of now: {hit:?}");
        assert!(hit.as_of_ms.unwrap() <= now_ms());
    }
    let last = hits.last().unwrap().as_of_ms.unwrap();
    assert!(last >= first.as_of_ms.unwrap() + 1500, "as_of advanced while idle: {:?} -> {last}", first.as_of_ms);
    app.stop().await;
}

#[tokio::test]
async fn min_as_of_reads_your_writes_from_the_cache() {
    let app = warm_app(82).await;
    let calls = app.db.collection::<Document>(CALLS);
    let encodings = [Encoding::Multipart, Encoding::Query, Encoding::Form, Encoding::Json];
    let rounds: i64 = std::env::var("CALLBOARD_TEST_RYW_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(20);
    let (mut hits, mut waits) = (0, Vec::new());
    for i in 0..rounds {
        calls.insert_one(new_call(700_000 + i)).await.unwrap();
        let written = now_ms();
        let min: Value = match i % 3 {
            0 => Value::from(written),
            1 => Value::from(written.to_string()),
            _ => Value::from(callboard_domain::rfc3339_ms(written)),
        };
        let sent = Instant::now();
        let answer =
            ask(&app, 1, &[("min_as_of", min.clone()), ("limit", Value::from("5"))], encodings[i as usize % 4]).await;
        waits.push(sent.elapsed());
        assert_eq!(answer.status, 200, "{answer:?}");
        assert!(answer.as_of_ms.unwrap() > written, "as_of {:?} does not pass min_as_of {written}", answer.as_of);
        // Exactly what MongoDB holds now, the new call included.
        let live = app.live(1, &[("limit", "5")]).await;
        callboard_tests::reference::assert_same(&answer.body, &live, &format!("round {i}, min_as_of {min}"));
        assert!(answer.body.to_string().contains(&format!("new call {}", 700_000 + i)), "round {i}");
        hits += i64::from(answer.cache == "hit");
    }
    // The same requests without min_as_of, for the wait's share.
    let mut plain = Vec::new();
    for _ in 0..rounds {
        let sent = Instant::now();
        assert_eq!(ask(&app, 1, &[("limit", Value::from("5"))], Encoding::Multipart).await.cache, "hit");
        plain.push(sent.elapsed());
    }
    let pct = |v: &mut Vec<Duration>, p: usize| {
        v.sort();
        v[(v.len() * p / 100).min(v.len() - 1)]
    };
    eprintln!(
        "read-your-writes over {rounds} write-then-read pairs: {hits} from the cache; request p50 {:?} p99 {:?} \
         (without min_as_of: p50 {:?} p99 {:?})",
        pct(&mut waits, 50),
        pct(&mut waits, 99),
        pct(&mut plain, 50),
        pct(&mut plain, 99)
    );
    assert!(hits >= rounds * 3 / 4, "only {hits} of {rounds} were served from the cache");
    assert!(app.counter("callboard_freshness_wait_seconds_count").await > 0, "no request waited");
    app.stop().await;
}

#[tokio::test]
async fn freshness_parameters_are_validated_in_every_encoding() {
    let app = seeded(83).await;
    let bad: Vec<(&str, Value)> = vec![
        ("min_as_of", Value::from("yesterday")),
        ("min_as_of", Value::from("-5")),
        ("min_as_of", Value::from("1.5e3")),
        ("min_as_of", Value::from("1.2.3")),
        ("min_as_of", Value::from("2026-13-01T00:00:00Z")),
        ("min_as_of", Value::from(now_ms() + 3_600_000)),
        ("max_staleness_ms", Value::from(-1)),
        ("max_staleness_ms", Value::from("soon")),
        ("max_staleness_ms", Value::from(2.5)),
    ];
    for (name, value) in bad {
        for encoding in [Encoding::Multipart, Encoding::Query, Encoding::Form, Encoding::Json] {
            let answer = ask(&app, 1, &[(name, value.clone())], encoding).await;
            assert_eq!(answer.status, 422, "{name}={value} by {encoding:?}: {answer:?}");
            assert_eq!(answer.body["error"], "invalid_parameter", "{answer:?}");
            assert!(answer.body["message"].as_str().unwrap().contains(name), "{answer:?}");
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn a_cache_older_than_max_staleness_is_not_served() {
    let mut app = warm_app(84).await;
    app.stop_projector().await;
    // Written while no projector runs: the cache cannot know it.
    app.db.collection::<Document>(CALLS).insert_one(new_call(800_001)).await.unwrap();
    let stale = until_lag_above(&app, 1, 1500).await;
    assert_eq!(stale.cache, "hit", "{stale:?}");
    assert!(stale.lag_ms.unwrap() > 1500, "{stale:?}");
    assert!(!stale.body.to_string().contains("new call 800001"));
    let bounded = ask(&app, 1, &[("max_staleness_ms", Value::from(1000))], Encoding::Json).await;
    assert_eq!(bounded.cache, "miss", "{bounded:?}");
    assert!(bounded.lag_ms.unwrap() < 5000, "as of its query's start: {bounded:?}");
    callboard_tests::reference::assert_same(&bounded.body, &app.live(1, &[]).await, "bounded staleness");
    assert!(bounded.body.to_string().contains("new call 800001"));
    // A bound the cache meets still gets the cache.
    let loose = ask(&app, 1, &[("max_staleness_ms", Value::from("600000"))], Encoding::Query).await;
    assert_eq!(loose.cache, "hit");
    assert!(app.counter("callboard_cache_misses{reason=\"stale\"}").await >= 1);
    app.stop().await;
}

#[tokio::test]
async fn a_default_staleness_bound_applies_to_requests_without_one() {
    let services = callboard_testkit::Services::start().unwrap();
    let mut app = callboard_tests::spawn_app_configured(services, |s| s.query.max_staleness_ms = Some(1000)).await;
    let ds = generate(85, 60);
    app.insert(CALL_STATUS, &ds.statuses).await;
    app.insert(USERS, &ds.users).await;
    app.insert(CALLS, &ds.calls).await;
    app.start_projector();
    warm_up(&app, 1).await;
    app.stop_projector().await;
    let deadline = Instant::now() + WAIT;
    let answer = loop {
        let sent = Instant::now();
        let answer = ask(&app, 1, &[], Encoding::Multipart).await;
        if answer.cache == "miss" || Instant::now() > deadline {
            break answer;
        }
        // Checked when served, sent a little later.
        let took = sent.elapsed().as_millis() as u64;
        assert!(answer.lag_ms.unwrap() <= 1000 + took, "a hit past the default bound: {answer:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(answer.cache, "miss", "never answered live with every projector stopped");
    let loose = ask(&app, 1, &[("max_staleness_ms", Value::from(600_000))], Encoding::Json).await;
    assert_eq!(loose.cache, "hit", "the request's own bound wins over the default");
    app.stop().await;
}

#[tokio::test]
async fn without_watermark_documents_as_of_is_coarser_but_advances() {
    let mut app = seeded(86).await;
    let fields = app.settings.query.user_fields().unwrap();
    app.start_projector_configured(fields, |c| c.watermark_collection = None);
    warm_up(&app, 1).await;
    let first = ask(&app, 1, &[], Encoding::Multipart).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = ask(&app, 1, &[], Encoding::Multipart).await;
    assert_eq!(later.cache, "hit");
    assert!(later.lag_ms.unwrap() < 2000, "{later:?}");
    assert!(later.as_of_ms.unwrap() >= first.as_of_ms.unwrap() + 1000, "{first:?} -> {later:?}");
    // Read-your-writes still holds, by waiting longer or answering live.
    app.db.collection::<Document>(CALLS).insert_one(new_call(900_001)).await.unwrap();
    let written = now_ms();
    let answer = ask(&app, 1, &[("min_as_of", Value::from(written))], Encoding::Json).await;
    assert!(answer.as_of_ms.unwrap() > written, "{answer:?}");
    assert!(answer.body.to_string().contains("new call 900001"), "{answer:?}");
    let names: Vec<String> = app.db.list_collection_names().await.unwrap();
    assert!(!names.iter().any(|n| n == "callboard_watermarks"), "{names:?}");
    app.stop().await;
}

/// A client holding the cluster time of its write (what a driver returns
/// as `operationTime` on a replica set; read here from the write's change
/// event, since the stand-in returns none) passes it as `min_as_of`.
#[tokio::test]
async fn an_operation_time_is_accepted_as_min_as_of() {
    let app = warm_app(87).await;
    let calls = app.db.collection::<Document>(CALLS);
    let mut stream = calls.watch().await.unwrap();
    calls.insert_one(new_call(950_001)).await.unwrap();
    let deadline = Instant::now() + WAIT;
    let time = loop {
        if let Some(event) = stream.next_if_any().await.unwrap() {
            break event.cluster_time.expect("a cluster time");
        }
        assert!(Instant::now() < deadline, "no event for the insert");
    };
    let min = format!("{}.{}", time.time, time.increment);
    let answer = ask(&app, 1, &[("min_as_of", Value::from(min.clone()))], Encoding::Form).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    // Served from the cache once the partition has applied that cluster
    // time (`through`), not by the live fallback.
    assert_eq!(answer.cache, "hit", "{answer:?}");
    assert!(answer.body.to_string().contains("new call 950001"), "min_as_of {min}: {answer:?}");
    callboard_tests::reference::assert_same(&answer.body, &app.live(1, &[]).await, "operationTime");
    app.stop().await;
}

async fn history(app: &TestApp) -> Value {
    let url = format!("{}/admin/cache/status?tenant_id=1", app.address);
    let response = app.client.get(url).bearer_auth(app.admin_token(1)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json::<Value>().await.unwrap()["history"].clone()
}

/// How far behind the checkpoints are, against how much history MongoDB
/// keeps: reported in `/admin/cache/status` and `/metrics`, and growing
/// while no projector runs. (The stand-in has no `local.oplog.rs`: the
/// window, and so the warning, are checked on a real replica set only,
/// and by `HistoryWindow`'s unit test.)
#[tokio::test]
async fn the_checkpoints_age_is_reported_against_the_history_window() {
    let mut app = warm_app(88).await;
    let deadline = Instant::now() + WAIT;
    let h = loop {
        let h = history(&app).await;
        if h["checkpoint_age_ms"].as_i64().is_some() || Instant::now() > deadline {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("history window: {h}");
    let age = h["checkpoint_age_ms"].as_i64().expect("every partition has a checkpoint");
    assert!(age < 5_000, "an idle projector checkpoints every 200 ms here: {h}");
    assert_eq!(h["warn_share"], 0.5);
    if let Some(window) = h["window_ms"].as_i64() {
        assert!(window > 0, "{h}");
        let used = h["used"].as_f64().unwrap();
        assert!((used - age as f64 / window as f64).abs() < 0.05, "{h}");
    } else {
        assert!(h["used"].is_null() && h["at_risk"] == false, "{h}");
    }
    assert!(app.metrics().await.contains("callboard_checkpoint_age_seconds "));
    // No projector: the checkpoints stay where they were, and age.
    app.stop_projector().await;
    let deadline = Instant::now() + WAIT;
    loop {
        let h = history(&app).await;
        if h["checkpoint_age_ms"].as_i64().is_some_and(|a| a > 2_500) {
            break;
        }
        assert!(Instant::now() < deadline, "the checkpoints' age did not grow: {h}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(app.counter("callboard_checkpoint_age_seconds").await >= 2);
    app.stop().await;
}

/// The watermark collection is callboard's own: an operator dropping it
/// rebuilds nothing (a CRM collection's drop does), and the marks go on.
#[tokio::test]
async fn dropping_the_watermark_collection_rebuilds_nothing() {
    let app = warm_app(89).await;
    app.db.collection::<Document>("callboard_watermarks").drop().await.unwrap();
    let dropped = now_ms();
    let deadline = Instant::now() + WAIT;
    loop {
        let answer = ask(&app, 1, &[], Encoding::Multipart).await;
        assert_eq!(answer.cache, "hit", "the drop sent the tenant cold: {answer:?}");
        if answer.as_of_ms.unwrap() > dropped + 500 {
            break;
        }
        assert!(Instant::now() < deadline, "the watermark stopped after the drop: {answer:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await;
}
