//! SIGTERM, as an orchestrator sends it: an API process fails readiness
//! first, keeps serving, then drains the requests in flight; a projector
//! that leads hands its partitions over at once instead of after its
//! lease's TTL.

use std::process::Command;
use std::time::{Duration, Instant};

use bson::{doc, DateTime};
use callboard_readmodel::keys::Partitioning;
use callboard_readmodel::Keys;
use callboard_store::CALLS;
use callboard_testkit::{free_port, Guarded};
use callboard_tests::dataset::generate;
use callboard_tests::reference::assert_same;
use callboard_tests::{spawn_app, TestApp};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A `callboard` process with `config` for `app`'s servers.
fn start(app: &TestApp, command: &str, config: &str, extra_env: &[(&str, String)], log: &str) -> Guarded {
    let path = app.services.dir.path().join(format!("{log}.toml"));
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_callboard"));
    cmd.arg("--config").arg(&path).arg(command);
    cmd.envs(app.process_env());
    cmd.envs(extra_env.iter().map(|(k, v)| (*k, v.as_str())));
    Guarded::spawn(cmd, "callboard", &app.services.dir.path().join(format!("{log}.log"))).expect("start callboard")
}

/// A `serve` process with a two-minute shutdown delay (cut short by a
/// second SIGTERM), once ready: it, its port, its base URL, a client.
async fn ready_serve(app: &TestApp, log: &str) -> (Guarded, u16, String, reqwest::Client) {
    let port = free_port().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let api = start(
        app,
        "serve",
        "[http]\nshutdown_delay_ms = 120000\nshutdown_timeout_s = 60\n",
        &[("CALLBOARD_HTTP_ADDR", format!("127.0.0.1:{port}"))],
        log,
    );
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(&client, &format!("{base}/readyz")).await.map(|(s, _)| s) != Some(200) {
        assert!(Instant::now() < deadline, "the API never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (api, port, base, client)
}

async fn get(client: &reqwest::Client, url: &str) -> Option<(u16, Value)> {
    let r = client.get(url).send().await.ok()?;
    let status = r.status().as_u16();
    Some((status, r.json().await.ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_fails_readiness_first_then_drains_the_requests_in_flight() {
    let app = spawn_app().await;
    let ds = generate(7, 40);
    app.insert_dataset(&ds).await;
    // A long delay, cut short by a second SIGTERM below.
    let (mut api, port, base, client) = ready_serve(&app, "serve").await;

    // A request in flight: its headers sent, its body not yet.
    let tenant = ds.tenants[0];
    let body = json!({"limit": 5}).to_string();
    let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let head = format!(
        "POST /crm/calls/get-grouped-by-status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        app.token(tenant),
        body.len()
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&body.as_bytes()[..3]).await.unwrap();

    api.sigterm();
    // Readiness fails at once, while requests are still served.
    let readyz = loop {
        match get(&client, &format!("{base}/readyz")).await {
            Some((503, body)) => break body,
            Some(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            None => panic!("the API stopped serving before failing readiness"),
        }
    };
    assert_eq!(readyz["status"], "shutting_down", "{readyz}");
    assert_eq!(readyz["checks"]["shutting_down"], true, "{readyz}");
    let served = client
        .post(format!("{base}{}", callboard_api::GROUPED_PATH))
        .bearer_auth(app.token(tenant))
        .json(&json!({}))
        .send()
        .await
        .expect("served while shutting down");
    assert_eq!(served.status(), 200);
    assert_same(&served.json().await.unwrap(), &app.live(tenant, &[]).await, "served while shutting down");

    // A second signal ends the delay: the listener closes, and the request
    // in flight is still answered in full.
    api.sigterm();
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
        assert!(Instant::now() < deadline, "the listener stayed open after the second SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    slow.write_all(&body.as_bytes()[3..]).await.unwrap();
    let mut response = String::new();
    slow.read_to_string(&mut response).await.unwrap();
    let (head, json_body) = response.split_once("\r\n\r\n").expect("a whole HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "the request in flight was cut: {response}");
    let answer: Value = serde_json::from_str(json_body).expect("a JSON body");
    assert_same(&answer, &app.live(tenant, &[("limit", "5")]).await, "the request in flight");
    // Drained: the process exits on its own, well before the 60 s bound.
    let status = tokio::task::block_in_place(|| api.wait_exit(Duration::from_secs(20)));
    assert!(status.is_some_and(|s| s.success()), "exit: {status:?}");
    app.stop().await;
}

/// The pid in a lease holder's id (`host-pid-random`).
fn pid_of(owner: &str) -> Option<u32> {
    owner.rsplit('-').nth(1)?.parse().ok()
}

/// The pid leading each partition.
async fn leaders(app: &TestApp, partitions: u32) -> Vec<Option<u32>> {
    let mut redis = app.redis().await;
    let keys = Keys::new(&app.settings.redis.key_prefix);
    let mut out = Vec::new();
    for p in 0..partitions {
        let owner: Option<String> = redis::AsyncCommands::get(&mut redis, keys.in_partition(p).lease()).await.unwrap();
        out.push(owner.as_deref().and_then(pid_of));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_a_leader_hands_its_partitions_over_at_once() {
    let app = spawn_app().await;
    let ds = generate(11, 40);
    app.insert_dataset(&ds).await;
    let partitions = callboard_tests::test_partitions();
    // A lease far longer than the test waits: a partition taken over only
    // once its lease expired would fail it.
    let config = format!("[projector]\nlease_ttl_ms = 60000\npartitions = {partitions}\n");
    let mut first = start(&app, "project", &config, &[], "project-1");
    let tenant = ds.tenants[0];
    let wait = Duration::from_secs(45);
    let (hit, cached, live) = app.wait_for_projection(tenant, &[], wait).await;
    assert!(hit, "never warm");
    assert_same(&cached, &live, "warm");
    let mut second = start(&app, "project", &config, &[], "project-2");
    // The second process joins: it stands by, or takes some partitions
    // over (with several). The leader of the tenant's partition is the one
    // signalled, once both are members.
    let keys = Keys::new(&app.settings.redis.key_prefix);
    let partition = Partitioning::new(partitions).of(callboard_domain::TenantId::new(tenant).unwrap());
    let deadline = Instant::now() + wait;
    let leader = loop {
        let mut redis = app.redis().await;
        let members: Vec<String> = redis::AsyncCommands::zrange(&mut redis, keys.members(), 0, -1).await.unwrap();
        let joined = members.iter().any(|m| pid_of(m) == Some(second.pid()));
        let leader = leaders(&app, partitions).await[partition as usize];
        if joined && leader.is_some() {
            break leader;
        }
        assert!(Instant::now() < deadline, "the second projector never joined");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let leaving = if leader == Some(first.pid()) { &mut first } else { &mut second };

    // SIGTERM to the tenant's leader, and a write right after it.
    leaving.sigterm();
    let written = Instant::now();
    let call = doc! {"id": 990_001, "tenant_id": tenant, "subject": "after SIGTERM", "status_id": 1,
    "start_time": DateTime::from_millis(1_800_000_000_000), "owner_id": 1};
    app.db.collection::<bson::Document>(CALLS).insert_one(call).await.unwrap();
    let (hit, cached, live) = app.wait_for_projection(tenant, &[], Duration::from_secs(20)).await;
    let shown = written.elapsed();
    assert!(hit, "the write right after SIGTERM never showed");
    assert_same(&cached, &live, "right after SIGTERM");
    assert!(cached.to_string().contains("after SIGTERM"), "the new call is in the answer");
    eprintln!("write after SIGTERM shown in {} ms (lease TTL 60 s)", shown.as_millis());
    let status = tokio::task::block_in_place(|| leaving.wait_exit(Duration::from_secs(20)));
    assert!(status.is_some_and(|s| s.success()), "exit: {status:?}");
    // Its leases were released, not left to expire...
    let gone = leaving.pid();
    let now = leaders(&app, partitions).await;
    assert!(now.iter().all(|l| *l != Some(gone)), "a lease still names the stopped process: {now:?}");
    // ...so the other process leads the partition now, long before the
    // lease could have expired.
    let exited = Instant::now();
    let call = doc! {"id": 990_002, "tenant_id": tenant, "subject": "after the exit", "status_id": 1,
    "start_time": DateTime::from_millis(1_800_000_060_000), "owner_id": 2};
    app.db.collection::<bson::Document>(CALLS).insert_one(call).await.unwrap();
    let (hit, cached, live) = app.wait_for_projection(tenant, &[], Duration::from_secs(20)).await;
    assert!(hit, "the write after the exit never showed: the partition was not handed over");
    assert_same(&cached, &live, "after the hand-over");
    assert!(cached.to_string().contains("after the exit"), "the second call is in the answer");
    eprintln!("write after the exit shown in {} ms", exited.elapsed().as_millis());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_board_streams_at_once_so_their_clients_reconnect_elsewhere() {
    use callboard_tests::sse::{EventStream, Next};
    let app = spawn_app().await;
    let ds = generate(8, 40);
    app.insert_dataset(&ds).await;
    let (mut api, _, base, client) = ready_serve(&app, "serve-stream").await;
    let token = app.token(ds.tenants[0]);
    let streaming = reqwest::Client::new();
    let response = streaming
        .get(format!("{base}/crm/calls/stream"))
        .query(&[("access_token", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = EventStream::new(response);
    assert_eq!(stream.expect(Duration::from_secs(20)).await.event, "board");

    api.sigterm();
    let signalled = Instant::now();
    // Ended within moments, while the process still serves (the delay is
    // two minutes): a stream must not hold the shutdown up, nor be cut
    // at its end.
    assert!(matches!(stream.next(Duration::from_secs(5)).await, Next::End), "the stream outlived the SIGTERM");
    let ended = signalled.elapsed();
    assert_eq!(get(&client, &format!("{base}/healthz")).await.map(|(s, _)| s), Some(200), "no longer serving");
    assert!(ended < Duration::from_secs(2), "the stream ended {ended:?} after SIGTERM");
    api.sigterm();
    api.sigterm();
    assert!(api.wait_exit(Duration::from_secs(30)).is_some(), "the API did not exit");
    app.stop().await;
}
