//! `GET /crm/calls/stream`: the board at once, every change after it
//! (coalesced), `Last-Event-ID` resumes, tokens checked before the stream
//! starts and honoured until they expire, one tenant's events never on
//! another's connection.

use std::time::Duration;

use bson::{doc, DateTime, Document};
use callboard_domain::TenantId;
use callboard_store::CALLS;
use callboard_testkit::Services;
use callboard_tests::dataset::generate;
use callboard_tests::sse::{Event, EventStream, Next};
use callboard_tests::{spawn_app_configured, TestApp};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);
const LIMIT: &str = "5";

async fn warm_app(seed: u64) -> TestApp {
    let mut app = spawn_app_configured(Services::start().expect("servers"), |s| s.auth.leeway_s = 0).await;
    let ds = generate(seed, 60);
    app.insert_dataset(&ds).await;
    app.start_projector();
    for tenant in [1, 2] {
        app.grouped_as(&app.token(tenant), &[], false).await;
        let (hit, _, _) = app.wait_for_projection(tenant, &[("limit", LIMIT)], WAIT).await;
        assert!(hit, "tenant {tenant} never became a cache hit");
    }
    app
}

/// A call of `tenant` newer than every other: first in status 1.
fn new_call(tenant: i64, id: i64) -> Document {
    doc! {"id": id, "tenant_id": tenant, "status_id": 1, "subject": format!("new call {id}"),
    "start_time": DateTime::from_millis(2_000_000_000_000 + id)}
}

/// The id of the first call shown in status 1.
fn first_in_status_1(board: &Value) -> Option<i64> {
    board["data"].as_array()?.iter().find(|s| s["id"] == 1)?["calls"][0]["id"].as_i64()
}

async fn open(app: &TestApp, token: &str, last_event_id: Option<&str>) -> EventStream {
    let headers: Vec<(&str, &str)> = last_event_id.map(|id| ("Last-Event-ID", id)).into_iter().collect();
    let response = app.open_stream(&[("limit", LIMIT), ("access_token", token)], &headers).await;
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_string();
    assert!(content_type.starts_with("text/event-stream"), "{content_type}");
    EventStream::new(response)
}

/// Board events until one shows `call` first in status 1.
async fn until_first(stream: &mut EventStream, call: i64) -> (Event, usize) {
    let mut seen = 0;
    loop {
        let event = stream.expect(WAIT).await;
        assert_eq!(event.event, "board", "{event:?}");
        seen += 1;
        if first_in_status_1(&event.json()) == Some(call) {
            return (event, seen);
        }
    }
}

async fn error_of(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("an error envelope");
    assert_eq!(body["status"], status, "{body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    (status, body["error"].as_str().unwrap_or_default().to_string())
}

#[tokio::test]
async fn the_stream_sends_the_board_then_each_change_and_a_reconnect_misses_none() {
    let app = warm_app(91).await;
    let token = app.token(1);
    let limit = [("limit", LIMIT)];

    let mut stream = open(&app, &token, None).await;
    let first = stream.expect(WAIT).await;
    assert_eq!(first.event, "board");
    assert_eq!(stream.retry, Some(1000), "the stream tells EventSource when to reconnect");
    // Exactly what the endpoint answers, and what MongoDB says.
    let (cache, endpoint) = app.grouped_as(&token, &limit, false).await;
    assert_eq!(cache, "hit");
    assert_eq!(first.json(), endpoint);
    assert_eq!(first.json(), app.live(1, &limit).await);
    assert!(first.as_of_ms().is_some(), "the id carries as_of: {:?}", first.id);

    // A write reaches the open stream.
    app.insert(CALLS, &[new_call(1, 900_001)]).await;
    let (changed, _) = until_first(&mut stream, 900_001).await;
    assert_eq!(changed.json(), app.live(1, &limit).await);
    assert_ne!(changed.id, first.id);
    assert!(changed.as_of_ms() >= first.as_of_ms());
    drop(stream);

    // A write while disconnected: the reconnect gets it at once.
    app.insert(CALLS, &[new_call(1, 900_002)]).await;
    let (hit, _, _) = app.wait_for_projection(1, &limit, WAIT).await;
    assert!(hit);
    let mut stream = open(&app, &token, changed.id.as_deref()).await;
    let resumed = stream.expect(Duration::from_secs(5)).await;
    assert_eq!(first_in_status_1(&resumed.json()), Some(900_002), "{}", resumed.data);
    assert_eq!(resumed.json(), app.live(1, &limit).await);
    drop(stream);

    // A reconnect that missed nothing gets no board until the next change:
    // its first event already shows the write made after it connected.
    let mut stream = open(&app, &token, resumed.id.as_deref()).await;
    app.insert(CALLS, &[new_call(1, 900_003)]).await;
    let next = stream.expect(WAIT).await;
    assert_eq!(first_in_status_1(&next.json()), Some(900_003), "a board the client had was sent again: {}", next.data);
    assert_eq!(next.json(), app.live(1, &limit).await);
    app.stop().await;
}

#[tokio::test]
async fn bursts_of_writes_are_coalesced_to_the_rate_and_the_last_event_is_complete() {
    let app = warm_app(92).await;
    let mut stream = open(&app, &app.token(1), None).await;
    stream.expect(WAIT).await;
    let rate = app.settings.stream.max_events_per_s;
    let burst = 20;
    let started = std::time::Instant::now();
    // Written beside the reader, so that events are timed as they come.
    let calls = app.db.collection::<Document>(CALLS);
    let writer = tokio::spawn(async move {
        for i in 0..burst {
            calls.insert_one(new_call(1, 910_000 + i)).await.expect("insert");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let mut events = Vec::new();
    loop {
        let event = stream.expect(WAIT).await;
        let done = first_in_status_1(&event.json()) == Some(910_000 + burst - 1);
        events.push(event);
        if done {
            break;
        }
    }
    let spent = started.elapsed();
    writer.await.expect("writer");
    let gap = Duration::from_secs(1) / rate;
    for pair in events.windows(2) {
        let apart = pair[1].at - pair[0].at;
        // Sent at least `gap` apart; read a little closer at worst.
        assert!(apart >= gap.mul_f64(0.8), "two events {apart:?} apart, under 1/{rate} s");
    }
    let most = (spent.as_secs_f64() * f64::from(rate)).ceil() as usize + 1;
    assert!(events.len() <= most, "{} events in {spent:?} at {rate}/s", events.len());
    assert!(events.len() < burst as usize, "{burst} writes were not coalesced: {} events", events.len());
    assert_eq!(events.last().unwrap().json(), app.live(1, &[("limit", LIMIT)]).await);
    app.stop().await;
}

#[tokio::test]
async fn many_connections_share_one_poll_and_each_tenant_sees_only_its_board() {
    let app = warm_app(93).await;
    let before = app.counter("callboard_stream_connections").await;
    let mut ones = Vec::new();
    for _ in 0..30 {
        let mut s = open(&app, &app.token(1), None).await;
        s.expect(WAIT).await;
        ones.push(s);
    }
    let mut twos = Vec::new();
    for _ in 0..5 {
        let mut s = open(&app, &app.token(2), None).await;
        let board = s.expect(WAIT).await;
        assert_eq!(board.json(), app.live(2, &[("limit", LIMIT)]).await);
        twos.push(s);
    }
    assert_eq!(app.counter("callboard_stream_connections").await, before + 35);

    app.insert(CALLS, &[new_call(1, 920_001)]).await;
    let live = app.live(1, &[("limit", LIMIT)]).await;
    for s in &mut ones {
        let (event, _) = until_first(s, 920_001).await;
        assert_eq!(event.json(), live);
    }
    // Tenant 2's connections: their next event is their own write, with
    // nothing of tenant 1's.
    app.insert(CALLS, &[new_call(2, 920_002)]).await;
    let live = app.live(2, &[("limit", LIMIT)]).await;
    for s in &mut twos {
        let (event, _) = until_first(s, 920_002).await;
        assert_eq!(event.json(), live);
        assert!(!event.data.contains("920001"), "tenant 1's call on tenant 2's stream");
    }
    drop(ones);
    drop(twos);
    app.stop().await;
}

#[tokio::test]
async fn bad_tokens_are_refused_before_the_stream_starts_and_an_expiring_one_ends_it() {
    let app = warm_app(94).await;
    let stream = |query: &'static [(&'static str, &'static str)]| app.open_stream(query, &[]);
    assert_eq!(error_of(stream(&[("limit", LIMIT)]).await).await, (401, "missing_token".into()));
    assert_eq!(error_of(stream(&[("access_token", "not.a.jwt")]).await).await, (401, "invalid_token".into()));
    let token = app.token(1);
    let past = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() - 60;
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"tenant_id": 1, "exp": past}),
        &jsonwebtoken::EncodingKey::from_secret(callboard_tests::SECRET.as_bytes()),
    )
    .unwrap();
    let response = app.open_stream(&[("access_token", &expired)], &[]).await;
    assert_eq!(error_of(response).await, (401, "token_expired".into()));
    // One token, not two.
    let both = app.open_stream(&[("access_token", &token)], &[("Authorization", &format!("Bearer {token}"))]).await;
    assert_eq!(error_of(both).await, (401, "invalid_token".into()));
    let twice = app.open_stream(&[("access_token", &token), ("access_token", &token)], &[]).await;
    assert_eq!(error_of(twice).await, (401, "invalid_token".into()));
    // Bad parameters, in the envelope too.
    let bad = app.open_stream(&[("access_token", &token), ("limit", "0")], &[]).await;
    assert_eq!(error_of(bad).await, (422, "invalid_parameter".into()));
    let unknown = app.open_stream(&[("access_token", &token), ("min_as_of", "1")], &[]).await;
    assert_eq!(error_of(unknown).await, (422, "invalid_parameter".into()));
    // The header works as well as the parameter.
    let header = app.open_stream(&[("limit", LIMIT)], &[("Authorization", &format!("Bearer {token}"))]).await;
    assert_eq!(header.status(), 200);
    let mut header = EventStream::new(header);
    assert_eq!(header.expect(WAIT).await.json(), app.live(1, &[("limit", LIMIT)]).await);

    // A token that expires mid-stream ends it, saying so.
    let short = app.keys.mint(TenantId::new(1).unwrap(), false, Duration::from_secs(2));
    let mut s = open(&app, &short, None).await;
    assert_eq!(s.expect(WAIT).await.event, "board");
    let ended = s.expect(Duration::from_secs(10)).await;
    assert_eq!(ended.event, "error", "{ended:?}");
    assert_eq!(ended.json()["error"], "token_expired");
    assert!(matches!(s.next(Duration::from_secs(5)).await, Next::End), "the stream goes on past its token");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_board_answered_live_keeps_following_mongodb_and_is_never_resumed_as_current() {
    let mut app = warm_app(98).await;
    // Redis may evict: every answer is live, and with the projector
    // stopped no write moves a version. Only the stream's own re-renders
    // can show a change.
    app.services.redis.config_set("maxmemory-policy", "allkeys-lru").unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while app.grouped_as(&app.token(1), &[], false).await.0 != "miss" {
        assert!(std::time::Instant::now() < deadline, "the API never noticed the policy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop_projector().await;
    let mut stream = open(&app, &app.token(1), None).await;
    let first = stream.expect(WAIT).await;
    assert_eq!(first.json(), app.live(1, &[("limit", LIMIT)]).await);
    // Its id vouches for no version: a reconnect with it gets the board.
    assert!(first.id.as_deref().is_some_and(|id| id.ends_with("-0000000000000000")), "{:?}", first.id);
    // Ten more watch it: they share its renders, one live query a second
    // (unshared, eleven connections would run eleven a second).
    let mut others = Vec::new();
    for _ in 0..10 {
        let mut s = open(&app, &app.token(1), None).await;
        s.expect(WAIT).await;
        others.push(s);
    }
    // Several re-renders without a change come first (each one is a live
    // query), then a write: it must still come through.
    let queries = app.counter("callboard_live_queries_total").await;
    let counting = std::time::Instant::now();
    let deadline = counting + WAIT;
    while app.counter("callboard_live_queries_total").await < queries + 3 {
        assert!(std::time::Instant::now() < deadline, "the stream stopped re-rendering a live board");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let three = counting.elapsed();
    assert!(
        three > Duration::from_millis(1500),
        "3 live queries in {three:?}: the connections' renders are not shared"
    );
    drop(others);
    app.insert(CALLS, &[new_call(1, 930_001)]).await;
    let (event, _) = until_first(&mut stream, 930_001).await;
    assert_eq!(event.json(), app.live(1, &[("limit", LIMIT)]).await);
    drop(stream);
    let mut resumed = open(&app, &app.token(1), event.id.as_deref()).await;
    assert_eq!(first_in_status_1(&resumed.expect(Duration::from_secs(5)).await.json()), Some(930_001));
    app.stop().await;
}
