//! The HTTP contract: the specification's examples, auth, bad input, tenant
//! isolation.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bson::{doc, DateTime};
use callboard_store::{CALLS, CALL_STATUS, USERS};
use callboard_tests::dataset::generate;
use callboard_tests::reference::{assert_same, expected, Query};
use callboard_tests::{spawn_app, TestApp, SECRET};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

async fn seeded_app() -> (TestApp, callboard_tests::dataset::Dataset) {
    let app = spawn_app().await;
    let ds = generate(11, 400);
    app.insert(CALL_STATUS, &ds.statuses).await;
    app.insert(USERS, &ds.users).await;
    app.insert(CALLS, &ds.calls).await;
    (app, ds)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn sign(alg: Algorithm, claims: Value, secret: &str) -> String {
    jsonwebtoken::encode(&Header::new(alg), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

#[tokio::test]
async fn the_specifications_three_curl_examples() {
    let (app, ds) = seeded_app().await;
    let tenant = 2;
    type Fields<'a> = &'a [(&'a str, &'a str)];
    let examples: [(Fields, usize, bool); 3] = [
        (&[("limit", "100"), ("include_enrichment", "true")], 100, true),
        (&[("include_enrichment", "false")], 100, false),
        (&[("limit", "50"), ("include_enrichment", "true")], 50, true),
    ];
    for (fields, limit, enrichment) in examples {
        let response = app.post_grouped_form(Some(&app.token(tenant)), fields).await;
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "application/json");
        let body: Value = response.json().await.unwrap();
        let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["status", "message", "data", "summary"]);
        for group in body["data"].as_array().unwrap() {
            let keys: Vec<&String> = group.as_object().unwrap().keys().collect();
            assert_eq!(keys, ["id", "name", "description", "color", "total_calls", "calls"]);
            for call in group["calls"].as_array().unwrap() {
                if enrichment {
                    let call = call.as_object().unwrap();
                    assert!(!call.contains_key("_id"));
                    for details in ["owner_details", "user_details", "assigned_to_details"] {
                        assert!(call[details].is_object(), "{details} missing");
                    }
                } else {
                    assert!(call.is_i64(), "ids only: {call}");
                }
            }
        }
        let want = expected(
            &ds,
            &Query { tenant, limit, include_enrichment: enrichment, include_calls: true },
            &["id", "name", "email"],
        );
        assert_same(&body, &want, &format!("example {fields:?}"));
    }
    app.stop().await;
}

#[tokio::test]
async fn every_way_of_sending_parameters_gives_the_same_answer() {
    let (app, ds) = seeded_app().await;
    let token = app.token(1);
    let want = expected(
        &ds,
        &Query { tenant: 1, limit: 3, include_enrichment: false, include_calls: true },
        &["id", "name", "email"],
    );
    let url = app.grouped_url();
    let requests = [
        app.client.post(&url).bearer_auth(&token).form(&[("limit", "3"), ("include_enrichment", "false")]),
        app.client.post(&url).bearer_auth(&token).json(&json!({"limit": 3, "include_enrichment": false})),
        app.client.post(&url).bearer_auth(&token).json(&json!({"limit": "3", "include_enrichment": "false"})),
        app.client.post(format!("{url}?limit=3&include_enrichment=false")).bearer_auth(&token),
        app.client.post(format!("{url}?limit=3")).bearer_auth(&token).form(&[("include_enrichment", "FALSE")]),
    ];
    for (i, req) in requests.into_iter().enumerate() {
        let response = req.send().await.unwrap();
        assert_eq!(response.status(), 200, "request {i}");
        assert_same(&response.json().await.unwrap(), &want, &format!("request {i}"));
    }
    app.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_json_error_and_nothing_else() {
    let (app, _) = seeded_app().await;
    let token = app.token(1);
    let url = app.grouped_url();
    let exp_past = now() - 3600;
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "limit 0",
            app.client.post(&url).bearer_auth(&token).multipart(form(&[("limit", "0")])),
            422,
            "invalid_parameter",
        ),
        (
            "limit -1",
            app.client.post(&url).bearer_auth(&token).multipart(form(&[("limit", "-1")])),
            422,
            "invalid_parameter",
        ),
        (
            "limit 1001",
            app.client.post(&url).bearer_auth(&token).multipart(form(&[("limit", "1001")])),
            422,
            "invalid_parameter",
        ),
        (
            "limit abc",
            app.client.post(&url).bearer_auth(&token).multipart(form(&[("limit", "abc")])),
            422,
            "invalid_parameter",
        ),
        (
            "limit 1.5",
            app.client.post(&url).bearer_auth(&token).multipart(form(&[("limit", "1.5")])),
            422,
            "invalid_parameter",
        ),
        (
            "limit empty",
            app.client.post(&url).bearer_auth(&token).multipart(form(&[("limit", "")])),
            422,
            "invalid_parameter",
        ),
        (
            "limit twice",
            app.client.post(&url).bearer_auth(&token).multipart(form(&[("limit", "5"), ("limit", "6")])),
            422,
            "invalid_parameter",
        ),
        (
            "json limit 1.5",
            app.client.post(&url).bearer_auth(&token).json(&json!({"limit": 1.5})),
            422,
            "invalid_parameter",
        ),
        (
            "enrichment maybe",
            app.client.post(&url).bearer_auth(&token).multipart(form(&[("include_enrichment", "maybe")])),
            422,
            "invalid_parameter",
        ),
        (
            "include_calls 2",
            app.client.post(&url).bearer_auth(&token).multipart(form(&[("include_calls", "2")])),
            422,
            "invalid_parameter",
        ),
        ("no token", app.client.post(&url).multipart(form(&[("limit", "5")])), 401, "missing_token"),
        ("basic auth", app.client.post(&url).basic_auth("a", Some("b")), 401, "missing_token"),
        ("garbage token", app.client.post(&url).bearer_auth("not.a.jwt"), 401, "invalid_token"),
        (
            "expired",
            app.client.post(&url).bearer_auth(sign(Algorithm::HS256, json!({"tenant_id": 1, "exp": exp_past}), SECRET)),
            401,
            "token_expired",
        ),
        (
            "wrong signature",
            app.client.post(&url).bearer_auth(sign(
                Algorithm::HS256,
                json!({"tenant_id": 1, "exp": now() + 600}),
                "another-secret-another-secret-xx",
            )),
            401,
            "invalid_token",
        ),
        (
            "alg none",
            app.client.post(&url).bearer_auth(alg_none(json!({"tenant_id": 1, "exp": now() + 600}))),
            401,
            "invalid_token",
        ),
        (
            "HS512",
            app.client.post(&url).bearer_auth(sign(
                Algorithm::HS512,
                json!({"tenant_id": 1, "exp": now() + 600}),
                SECRET,
            )),
            401,
            "invalid_token",
        ),
        (
            "no exp",
            app.client.post(&url).bearer_auth(sign(Algorithm::HS256, json!({"tenant_id": 1}), SECRET)),
            401,
            "invalid_token",
        ),
        (
            "string tenant",
            app.client.post(&url).bearer_auth(sign(
                Algorithm::HS256,
                json!({"tenant_id": "1", "exp": now() + 600}),
                SECRET,
            )),
            401,
            "invalid_token",
        ),
        (
            "body over 64 KB",
            app.client.post(&url).bearer_auth(&token).multipart(form(&[("limit", "5"), ("pad", &"x".repeat(70_000))])),
            413,
            "payload_too_large",
        ),
        (
            "malformed JSON",
            app.client.post(&url).bearer_auth(&token).header("content-type", "application/json").body("{\"limit\": "),
            400,
            "malformed_body",
        ),
        ("JSON array", app.client.post(&url).bearer_auth(&token).json(&json!([1, 2])), 400, "malformed_body"),
        (
            "multipart, 1-char boundary",
            app.client
                .post(&url)
                .bearer_auth(&token)
                .header("content-type", "multipart/form-data; boundary=a")
                .body("--\n"),
            400,
            "malformed_body",
        ),
        (
            "multipart, empty boundary",
            app.client
                .post(&url)
                .bearer_auth(&token)
                .header("content-type", "multipart/form-data; boundary=\"\"")
                .body("\n"),
            400,
            "malformed_body",
        ),
        (
            "chunked body over 64 KB",
            app.client.post(&url).bearer_auth(&token).header("content-type", "application/x-www-form-urlencoded").body(
                reqwest::Body::wrap_stream(futures::stream::iter(
                    (0..70).map(|_| Ok::<_, std::io::Error>(vec![b'a'; 1024])),
                )),
            ),
            413,
            "payload_too_large",
        ),
        (
            "broken multipart",
            app.client
                .post(&url)
                .bearer_auth(&token)
                .header("content-type", "multipart/form-data; boundary=xyz")
                .body("--xyz\r\nnonsense"),
            400,
            "malformed_body",
        ),
        (
            "text/plain body",
            app.client.post(&url).bearer_auth(&token).header("content-type", "text/plain").body("limit=5"),
            415,
            "unsupported_media_type",
        ),
        ("GET", app.client.get(&url).bearer_auth(&token), 405, "method_not_allowed"),
        (
            "unknown route",
            app.client.post(format!("{}/crm/calls/nope", app.address)).bearer_auth(&token),
            404,
            "not_found",
        ),
    ];
    for (name, request, status, code) in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{name}");
        assert_eq!(response.headers()["content-type"], "application/json", "{name}");
        if status == 401 {
            assert!(response.headers().contains_key("www-authenticate"), "{name}");
        }
        if !matches!(status, 404 | 405) {
            assert_eq!(
                response.headers()["x-cache"],
                "miss",
                "{name}: every answer of the endpoint says where it came from"
            );
        }
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["status"], status, "{name}: {body}");
        assert_eq!(body["error"], code, "{name}: {body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{name}: {body}");
        assert_eq!(body.as_object().unwrap().len(), 3, "{name}: only status, message, error: {body}");
    }
    // The server is still well after all of that.
    assert_eq!(app.post_grouped_form(Some(&token), &[]).await.status(), 200);
    app.stop().await;
}

fn form(fields: &[(&str, &str)]) -> reqwest::multipart::Form {
    fields.iter().fold(reqwest::multipart::Form::new(), |f, (k, v)| f.text(k.to_string(), v.to_string()))
}

fn alg_none(claims: Value) -> String {
    format!("{}.{}.", base64_url(br#"{"alg":"none","typ":"JWT"}"#), base64_url(claims.to_string().as_bytes()))
}

fn base64_url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test]
async fn a_tenant_sees_only_its_own_data_whatever_it_sends() {
    let app = spawn_app().await;
    app.insert(
        CALL_STATUS,
        &[doc! {"id": 1, "name": "Open"}, doc! {"id": 2, "name": "B's secret status", "tenant_id": 20}],
    )
    .await;
    app.insert(USERS, &[doc! {"id": 1, "name": "Ann", "email": "ann@a", "password_hash": "pw"}]).await;
    let t = DateTime::from_millis(1_760_000_000_000);
    app.insert(
        CALLS,
        &[
            doc! {"id": 1, "tenant_id": 10, "status_id": 1, "start_time": t, "owner_id": 1, "subject": "A's call"},
            doc! {"id": 2, "tenant_id": 20, "status_id": 1, "start_time": t, "subject": "B's call"},
            doc! {"id": 3, "tenant_id": 20, "status_id": 2, "start_time": t, "subject": "B's other call"},
        ],
    )
    .await;
    let token_a = app.token(10);
    for request in [
        app.client.post(app.grouped_url()).bearer_auth(&token_a).form(&[("tenant_id", "20")]),
        app.client.post(format!("{}?tenant_id=20", app.grouped_url())).bearer_auth(&token_a),
        app.client.post(app.grouped_url()).bearer_auth(&token_a).json(&json!({"tenant_id": 20})),
    ] {
        let body: Value = request.send().await.unwrap().json().await.unwrap();
        let text = body.to_string();
        assert!(!text.contains("B's"), "tenant 10 saw tenant 20's data: {text}");
        assert_eq!(body["summary"]["total_calls"], 1);
        assert_eq!(body["data"][0]["calls"][0]["subject"], "A's call");
        assert_eq!(body["data"][0]["calls"][0]["owner_details"], json!({"id": 1, "name": "Ann", "email": "ann@a"}));
        assert!(!text.contains("pw"));
    }
    let b = app.grouped(20, &[]).await;
    assert_eq!(b["summary"], json!({"total_calls": 2, "total_status_groups": 2, "limit_per_status": 100}));
    let other = app.grouped(30, &[]).await;
    assert_eq!(other["summary"]["total_calls"], 0);
    assert_eq!(
        other["data"],
        json!([{"id": 1, "name": "Open", "description": null, "color": null, "total_calls": 0, "calls": []}])
    );
    app.stop().await;
}

/// Readiness is whether this process can serve: with Redis up and no
/// projector, it is ready (hits may go stale, cold tenants are answered
/// live); the projector's absence is reported, and `/projectorz` fails.
#[tokio::test]
async fn ready_without_a_projector_which_projectorz_reports_down() {
    let app = spawn_app().await;
    let r = app.client.get(format!("{}/healthz", app.address)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = app.client.get(format!("{}/readyz", app.address)).send().await.unwrap();
    assert_eq!(r.status(), 200, "a missing projector does not take the API out of rotation");
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body,
        json!({"status": "ready", "checks": {"redis": true, "redis_noeviction": true, "shutting_down": false},
            "dependencies": {"mongodb": true, "projector": false}})
    );
    let r = app.client.get(format!("{}/projectorz", app.address)).send().await.unwrap();
    assert_eq!(r.status(), 503, "no projector runs");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body, json!({"status": "down", "heartbeat_age_ms": null, "lag_ms": null}));
    app.stop().await;
}

/// `maxmemory-policy` on every node of the test's Redis.
fn set_policy(services: &callboard_testkit::Services, policy: &str) {
    services.redis.config_set("maxmemory-policy", policy).unwrap();
}

/// A Redis that may evict keys would turn an evicted key into a confident
/// wrong answer. The API refuses to start on one; if the policy changes
/// while it runs, it stops serving hits, `/readyz` fails and
/// `callboard_redis_noeviction` says 0; back to `noeviction`, it recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_may_evict_keys_is_refused_and_noticed() {
    let services = callboard_testkit::Services::start().unwrap();
    set_policy(&services, "allkeys-lru");
    let settings = callboard_tests::test_settings(&services, "evict");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let refused = callboard_api::Application::with_listener(&settings, listener).await.err().expect("refused");
    let message = refused.to_string();
    assert!(message.contains("maxmemory-policy") && message.contains("allkeys-lru"), "{message}");

    set_policy(&services, "noeviction");
    let mut app = callboard_tests::spawn_app_on(services).await;
    let ds = generate(12, 100);
    app.insert(CALL_STATUS, &ds.statuses).await;
    app.insert(USERS, &ds.users).await;
    app.insert(CALLS, &ds.calls).await;
    app.start_projector();
    let (hit, cached, live) = app.wait_for_projection(1, &[], Duration::from_secs(20)).await;
    assert!(hit && cached == live, "warm first");

    set_policy(&app.services, "volatile-lru");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let readyz = loop {
        let body: Value = app.client.get(format!("{}/readyz", app.address)).send().await.unwrap().json().await.unwrap();
        if body["checks"]["redis_noeviction"] == false || std::time::Instant::now() > deadline {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (readyz["status"].as_str(), &readyz["checks"]["redis_noeviction"]),
        (Some("unavailable"), &json!(false))
    );
    let metrics = app.metrics().await;
    assert!(metrics.lines().any(|l| l == "callboard_redis_noeviction 0"), "{metrics}");
    let (cache, body) = app.grouped_as(&app.token(1), &[], false).await;
    assert_eq!((cache.as_str(), &body), ("miss", &live), "the cache is not trusted: answered live");

    set_policy(&app.services, "noeviction");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while app.grouped_as(&app.token(1), &[], false).await.0 != "hit" {
        assert!(std::time::Instant::now() < deadline, "hits come back with noeviction");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await;
}

/// A client that sends its body one byte at a time gets 408 in the
/// envelope once `http.body_timeout_ms` has passed, instead of holding the
/// connection for as long as it likes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_trickles_in_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = callboard_tests::spawn_app_configured(callboard_testkit::Services::start().unwrap(), |s| {
        s.http.body_timeout_ms = 500
    })
    .await;
    let stream = tokio::net::TcpStream::connect(app.address.trim_start_matches("http://")).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: callboard\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\n",
        callboard_api::GROUPED_PATH,
        app.token(1)
    );
    write.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    // The slow client: a byte every 100 ms, 10 s for the whole body.
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            if write.write_all(b"x").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut answer = Vec::new();
    let mut chunk = [0_u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("request_timeout") {
        match tokio::time::timeout(Duration::from_secs(20), read.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&chunk[..n]),
            other => panic!("no 408 before {other:?}: {}", String::from_utf8_lossy(&answer)),
        }
    }
    let took = started.elapsed();
    trickle.abort();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains(r#""status":408"#) && text.contains(r#""error":"request_timeout""#), "{text}");
    assert!(took < Duration::from_secs(5), "cut off after the body timeout, not the whole body: {took:?}");
    app.stop().await;
}

/// Commands Redis has processed, summed over every node of the test's Redis.
fn commands_processed(services: &callboard_testkit::Services) -> u64 {
    services
        .redis
        .cli_each(&["INFO", "stats"])
        .unwrap()
        .iter()
        .map(|(port, info)| {
            info.lines()
                .find_map(|l| l.strip_prefix("total_commands_processed:"))
                .and_then(|n| n.trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no total_commands_processed from {port}"))
        })
        .sum()
}

/// With `CALLBOARD_METRICS_ADDR`, `/metrics` is served there and not on the
/// API's address; and a scrape costs Redis a few single-key reads, not one
/// per tenant (the tenant counts are refreshed in the background).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_an_address_of_their_own_and_a_scrape_does_no_per_tenant_work() {
    let services = callboard_testkit::Services::start().unwrap();
    let mut settings = callboard_tests::test_settings(&services, "metrics");
    settings.http.metrics_addr = Some("127.0.0.1:0".into());
    // 50 warm tenants before the process starts.
    let keys = callboard_readmodel::Keys::new(&settings.redis.key_prefix);
    let mut c = settings.redis.connect().await.unwrap().get().await.unwrap();
    for t in 1..=50 {
        let tenant = callboard_domain::TenantId::new(t).unwrap();
        let _: () =
            redis::AsyncCommands::set(&mut c, keys.state(tenant), callboard_readmodel::TenantState::encode_warm(1))
                .await
                .unwrap();
        let _: () = redis::AsyncCommands::sadd(&mut c, keys.tenants(), t).await.unwrap();
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let app = callboard_api::Application::with_listener(&settings, listener).await.unwrap();
    let (port, metrics_port) = (app.port(), app.metrics_port().expect("a metrics port"));
    let handle = app.handle();
    let server = tokio::spawn(app.run_until_stopped());
    let client = reqwest::Client::new();
    let public = client.get(format!("http://127.0.0.1:{port}/metrics")).send().await.unwrap();
    assert_eq!(public.status(), 404, "not on the API's address");
    let scrape = || async {
        let r = client.get(format!("http://127.0.0.1:{metrics_port}/metrics")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap()
    };
    // The background count has run once at start.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !scrape().await.lines().any(|l| l == r#"callboard_tenants{state="warm"} 50"#) {
        assert!(std::time::Instant::now() < deadline, "the tenant count never showed 50");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = commands_processed(&services);
    for _ in 0..5 {
        assert!(scrape().await.contains("callboard_live_queries_total"));
    }
    let spent = commands_processed(&services) - before;
    // A few reads per scrape and the INFO calls themselves; one read per
    // tenant per scrape would be 250 more.
    assert!(spent < 60, "5 scrapes cost Redis {spent} commands");
    handle.stop(true).await;
    server.await.unwrap().unwrap();
    assert!(
        client.get(format!("http://127.0.0.1:{metrics_port}/metrics")).send().await.is_err(),
        "stopped with the API"
    );
}

/// `http.max_connections_per_worker`: past the bound, a new connection is
/// not served until one of the held ones closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_worker_are_bounded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = callboard_tests::spawn_app_configured(callboard_testkit::Services::start().unwrap(), |s| {
        s.http.workers = 1;
        s.http.max_connections_per_worker = 2;
    })
    .await;
    let addr = app.address.trim_start_matches("http://").to_string();
    let request = b"GET /healthz HTTP/1.1\r\nHost: callboard\r\n\r\n";
    // Reads one response's head (the body is tiny and comes with it).
    async fn answer(s: &mut tokio::net::TcpStream) -> String {
        let mut buf = [0_u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).to_string()
    }
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(request).await.unwrap();
        assert!(answer(&mut s).await.starts_with("HTTP/1.1 200"));
        held.push(s); // kept alive, held by the worker
    }
    let mut third = tokio::net::TcpStream::connect(&addr).await.unwrap();
    third.write_all(request).await.unwrap();
    let mut buf = [0_u8; 1024];
    let early = tokio::time::timeout(Duration::from_secs(1), third.read(&mut buf)).await;
    assert!(early.is_err(), "a third connection was served past the bound");
    drop(held.pop());
    let late = tokio::time::timeout(Duration::from_secs(10), answer(&mut third)).await.expect("served once one closed");
    assert!(late.starts_with("HTTP/1.1 200"), "{late}");
    drop((held, third));
    app.stop().await;
}

/// The admin endpoints' bad input: clear 4xx errors in the envelope, never
/// a 5xx, and nothing written (no command queued, no job created).
#[tokio::test]
async fn bad_admin_input_gets_a_json_error_and_writes_nothing() {
    let app = spawn_app().await;
    let admin = app.admin_token(1);
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("negative tenant", br#"{"tenant_id": -1}"#.to_vec()),
        ("string tenant", br#"{"tenant_id": "x"}"#.to_vec()),
        ("huge tenant", br#"{"tenant_id": 1e30}"#.to_vec()),
        ("fractional tenant", br#"{"tenant_id": 1.5}"#.to_vec()),
        ("empty object", b"{}".to_vec()),
        ("both", br#"{"tenant_id": 1, "all": true}"#.to_vec()),
        ("all false", br#"{"all": false}"#.to_vec()),
        ("unknown field", br#"{"tenant": 1}"#.to_vec()),
        ("not JSON", b"tenant_id=1".to_vec()),
        ("empty body", Vec::new()),
        ("invalid UTF-8", vec![b'{', b'"', 0xff, 0xfe, b'"', b':', b'1', b'}']),
        ("an array", b"[1]".to_vec()),
    ];
    for path in ["/admin/cache/warm", "/admin/cache/invalidate"] {
        for (what, body) in &bodies {
            let r = app
                .client
                .post(format!("{}{path}", app.address))
                .bearer_auth(&admin)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let json: Value = r.json().await.unwrap_or(Value::Null);
            assert_eq!(status, 422, "{path} {what}: {json}");
            assert_eq!(
                (json["status"].as_u64(), json["error"].as_str()),
                (Some(422), Some("invalid_parameter")),
                "{path} {what}"
            );
        }
    }
    let long = "z".repeat(4000);
    let gets: Vec<(String, u16, &str)> = vec![
        ("/admin/cache/status?tenant_id=-1".into(), 422, "invalid_parameter"),
        ("/admin/cache/status?tenant_id=x".into(), 422, "invalid_parameter"),
        ("/admin/cache/status?tenant_id=1e30".into(), 422, "invalid_parameter"),
        ("/admin/cache/status?tenant_id=".into(), 422, "invalid_parameter"),
        ("/admin/cache/status?other=1".into(), 422, "invalid_parameter"),
        ("/admin/cache/warm/not-a-job".into(), 404, "not_found"),
        ("/admin/cache/warm/..%2F..%2Fetc".into(), 404, "not_found"),
        (format!("/admin/cache/warm/{long}"), 404, "not_found"),
    ];
    for (path, want, name) in &gets {
        let r = app.client.get(format!("{}{path}", app.address)).bearer_auth(&admin).send().await.unwrap();
        let status = r.status().as_u16();
        let json: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(
            (status, json["error"].as_str()),
            (*want, Some(*name)),
            "GET {}: {json}",
            &path[..path.len().min(60)]
        );
    }
    for (method, path) in [
        (reqwest::Method::GET, "/admin/cache/warm"),
        (reqwest::Method::DELETE, "/admin/cache/status"),
        (reqwest::Method::POST, "/admin/cache/warm/abc"),
        (reqwest::Method::PUT, "/admin/cache/invalidate"),
    ] {
        let r = app
            .client
            .request(method.clone(), format!("{}{path}", app.address))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let json: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!((status, json["error"].as_str()), (405, Some("method_not_allowed")), "{method} {path}: {json}");
    }
    // Nothing was written: no command queued, no job, no tenant state.
    let mut c = app.redis().await;
    let queued: u64 = redis::AsyncCommands::llen(&mut c, "cb:{g}:cmdq").await.unwrap();
    assert_eq!(queued, 0, "no command queued");
    let written = app.settings.redis.connect().await.unwrap().scan("cb:*").await.unwrap();
    assert!(written.iter().all(|k| !k.contains(":job:") && !k.ends_with(":state")), "{written:?}");
    app.stop().await;
}

/// Headers that decide what a request means must appear once: two tokens
/// (which tenant?) or two Content-Types (which body?) are refused, not
/// resolved by whichever is read first. A repeated harmless header changes
/// nothing.
#[tokio::test]
async fn duplicate_deciding_headers_are_refused() {
    let (app, _) = seeded_app().await;
    let (a, b) = (app.token(1), app.token(2));
    let post = || app.client.post(app.grouped_url());
    let cases = [
        (
            "two tokens",
            post().header("authorization", format!("Bearer {a}")).header("authorization", format!("Bearer {b}")),
            401,
            "invalid_token",
        ),
        (
            "two content types",
            post()
                .bearer_auth(&a)
                .header("content-type", "application/json")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(r#"{"limit": 1}"#),
            415,
            "unsupported_media_type",
        ),
    ];
    for (what, request, status, name) in cases {
        let r = request.send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{what}");
        let json: Value = r.json().await.unwrap();
        assert_eq!((json["status"].as_u64(), json["error"].as_str()), (Some(u64::from(status)), Some(name)), "{what}");
    }
    let r = post().bearer_auth(&a).header("accept", "application/json").header("accept", "*/*").send().await.unwrap();
    assert_eq!(r.status(), 200, "a repeated Accept is harmless");
    app.stop().await;
}

/// Invalid UTF-8 in the endpoint's parameters, in each encoding: a 4xx in
/// the envelope, never a 5xx or a partial answer.
#[tokio::test]
async fn invalid_utf8_in_parameters_is_a_client_error() {
    let (app, _) = seeded_app().await;
    let token = app.token(1);
    let bad = vec![b'l', b'i', b'm', b'i', b't', b'=', 0xff, 0xfe];
    let multipart = {
        let mut b = b"--XyZ\r\nContent-Disposition: form-data; name=\"limit\"\r\n\r\n".to_vec();
        b.extend_from_slice(&[0xff, 0xfe]);
        b.extend_from_slice(b"\r\n--XyZ--\r\n");
        b
    };
    let cases = [
        ("form", "application/x-www-form-urlencoded", bad.clone()),
        ("json", "application/json", [br#"{"limit": ""#.as_slice(), &[0xff, 0xfe], br#""}"#].concat()),
        ("multipart", "multipart/form-data; boundary=XyZ", multipart),
    ];
    for (what, content_type, body) in cases {
        let r = app
            .client
            .post(app.grouped_url())
            .bearer_auth(&token)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let json: Value = r.json().await.unwrap();
        assert!((400..500).contains(&status), "{what}: {status} {json}");
        assert_eq!(json["status"].as_u64(), Some(u64::from(status)), "{what}: {json}");
        assert!(json["data"].is_null(), "{what}: no answer");
    }
    let r = app.client.post(format!("{}?limit=%FF%FE", app.grouped_url())).bearer_auth(&token).send().await.unwrap();
    let status = r.status().as_u16();
    let json: Value = r.json().await.unwrap();
    assert!((400..500).contains(&status), "query string: {status} {json}");
    app.stop().await;
}

/// (status, X-Cache, body) of tenant 1's request for `limit` calls.
async fn ask(app: &TestApp, limit: &str) -> (u16, Option<String>, Value) {
    let r = app.client.post(app.grouped_url()).bearer_auth(app.token(1)).json(&json!({"limit": limit})).send().await;
    let r = r.unwrap();
    let cache = r.headers().get("x-cache").map(|v| v.to_str().unwrap().to_string());
    (r.status().as_u16(), cache, r.json::<Value>().await.unwrap())
}

/// A tenant with hundreds of statuses asking for 1,000 calls per status
/// would get hundreds of thousands of calls: answers are bounded by
/// `query.max_response_calls`, on the live path and from the cache alike,
/// with a 422 that says what to do; a smaller answer is whole.
#[tokio::test]
async fn an_answer_over_max_response_calls_is_refused_not_sent() {
    let mut app = callboard_tests::spawn_app_configured(callboard_testkit::Services::start().unwrap(), |s| {
        s.query.max_response_calls = 1000;
    })
    .await;
    let statuses: Vec<bson::Document> =
        (1..=300).map(|i| doc! {"id": i, "name": format!("S{i}"), "color": "#000000", "tenant_id": 1}).collect();
    app.insert(CALL_STATUS, &statuses).await;
    let calls: Vec<bson::Document> = (0..1200)
        .map(|i| {
            doc! {"id": i + 1, "tenant_id": 1, "status_id": i % 300 + 1,
            "start_time": DateTime::from_millis(1_760_000_000_000 + i64::from(i) * 1000)}
        })
        .collect();
    app.insert(CALLS, &calls).await;
    for round in ["live", "cached"] {
        let (status, _, body) = ask(&app, "1000").await;
        assert_eq!(status, 422, "{round}: {body}");
        assert_eq!(body["error"], "response_too_large", "{round}");
        assert!(body["message"].as_str().unwrap().contains("1200 calls"), "{round}: {body}");
        // 300 statuses x 3 calls = 900: within the bound, and whole.
        let (status, _, body) = ask(&app, "3").await;
        assert_eq!(status, 200, "{round}: {body}");
        let shown: usize = body["data"].as_array().unwrap().iter().map(|g| g["calls"].as_array().unwrap().len()).sum();
        assert_eq!(shown, 900, "{round}");
        if round == "live" {
            app.start_projector();
            let (hit, _, _) = app.wait_for_projection(1, &[("limit", "3")], Duration::from_secs(30)).await;
            assert!(hit, "never warm");
        }
    }
    // The refusal above came after a cache read: the hits counted rose.
    let hits = || app.counter("callboard_grouped_request_duration_seconds_count{cache=\"hit\"}");
    let before = hits().await;
    let (status, cache, _) = ask(&app, "1000").await;
    assert_eq!((status, cache.as_deref()), (422, Some("miss")), "an error shows no cached answer");
    assert_eq!(hits().await, before + 1, "read from the cache, then refused");
    app.stop().await;
}
