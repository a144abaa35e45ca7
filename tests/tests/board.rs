//! `GET /board` in Debian's headless Chromium (through chromedriver): the
//! rendered page shows every status of the tenant with its count, in the
//! endpoint's order; a write appears on it within 2 s; a screenshot is
//! saved as `target/board.png`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bson::{doc, DateTime};
use callboard_store::CALLS;
use callboard_tests::dataset::generate;
use callboard_tests::spawn_app;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

/// chromedriver on a free port, killed on drop.
struct Driver {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_driver() -> Driver {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver (Debian's chromium-driver; `make deps` installs it)");
    Driver { child, port, _profile: tempfile::tempdir().unwrap() }
}

async fn browser(driver: &Driver) -> Client {
    // The flags a closed network needs (no background connections).
    let args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1500,900",
        &format!("--user-data-dir={}", driver._profile.path().display()),
    ];
    let caps = json!({"goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args}});
    let caps: serde_json::Map<String, Value> = caps.as_object().unwrap().clone();
    let deadline = Instant::now() + WAIT;
    loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match ClientBuilder::new(connector)
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{}", driver.port))
            .await
        {
            Ok(client) => return client,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "chromedriver not up yet");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot start Chromium through chromedriver: {e}"),
        }
    }
}

/// The board as rendered: each column's status id, name and count, and the
/// subjects of its cards.
async fn rendered(client: &Client) -> Value {
    client
        .execute(
            r#"return [...document.querySelectorAll('.column')].map(c => ({
                id: Number(c.dataset.statusId),
                name: c.querySelector('h2 .name').textContent,
                count: Number(c.querySelector('h2 .count').textContent),
                subjects: [...c.querySelectorAll('.card .subject')].map(s => s.textContent),
            }));"#,
            vec![],
        )
        .await
        .expect("the page's script runs")
}

/// What the page should show, from the live answer.
fn expected(live: &Value) -> Vec<(i64, String, i64)> {
    live["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (s["id"].as_i64().unwrap(), s["name"].as_str().unwrap().to_string(), s["total_calls"].as_i64().unwrap())
        })
        .collect()
}

fn shown(page: &Value) -> Vec<(i64, String, i64)> {
    page.as_array()
        .unwrap()
        .iter()
        .map(|c| (c["id"].as_i64().unwrap(), c["name"].as_str().unwrap().to_string(), c["count"].as_i64().unwrap()))
        .collect()
}

#[tokio::test]
async fn the_board_page_shows_every_status_and_a_write_within_two_seconds() {
    let mut app = spawn_app().await;
    let ds = generate(95, 600);
    app.insert_dataset(&ds).await;
    app.start_projector();
    app.grouped_as(&app.token(1), &[], false).await;
    let (hit, _, _) = app.wait_for_projection(1, &[("limit", "20")], WAIT).await;
    assert!(hit, "tenant 1 never became a cache hit");

    let driver = start_driver();
    let client = browser(&driver).await;
    client.goto(&format!("{}/board?access_token={}", app.address, app.token(1))).await.expect("page loads");
    let want = expected(&app.live(1, &[("limit", "20")]).await);
    assert!(want.len() > 2, "the dataset has statuses: {want:?}");
    let deadline = Instant::now() + WAIT;
    let mut page = rendered(&client).await;
    while shown(&page) != want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        page = rendered(&client).await;
    }
    assert_eq!(shown(&page), want, "every status, its name and count, in the endpoint's order");
    let url = client.current_url().await.unwrap();
    assert!(!url.as_str().contains("access_token"), "the token stays in the address bar: {url}");
    let as_of = client.find(Locator::Id("asof")).await.unwrap().text().await.unwrap();
    assert!(as_of.starts_with("as of "), "{as_of}");

    // A write: on the page within 2 s, with the status's count up by one.
    let before = want.iter().find(|s| s.0 == 1).expect("status 1").2;
    let written = Instant::now();
    app.insert(
        CALLS,
        &[doc! {"id": 990_001, "tenant_id": 1, "status_id": 1, "subject": "Call back the new lead",
        "owner_id": ds.users[0].get_i64("id").unwrap_or(1), "type": "outbound",
        "start_time": DateTime::from_millis(2_000_000_000_000)}],
    )
    .await;
    let column = |page: &Value| page.as_array().unwrap().iter().find(|c| c["id"] == 1).cloned().unwrap();
    loop {
        let page = rendered(&client).await;
        let first = column(&page);
        if first["subjects"][0] == "Call back the new lead" {
            assert_eq!(first["count"].as_i64().unwrap(), before + 1);
            break;
        }
        assert!(written.elapsed() < Duration::from_secs(2), "the write is not on the page after 2 s: {first}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = written.elapsed();
    println!("write on the page after {took:?}");
    assert_eq!(shown(&rendered(&client).await), expected(&app.live(1, &[("limit", "20")]).await));

    let png = client.screenshot().await.expect("screenshot");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/board.png");
    std::fs::write(&path, png).expect("write the screenshot");
    println!("screenshot: {}", path.display());

    // A bad token: the page asks for another instead of retrying.
    client.goto(&format!("{}/board?access_token=not.a.token", app.address)).await.unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let shown: Value = client
            .execute(
                "return [document.getElementById('login').hidden, document.getElementById('error').textContent];",
                vec![],
            )
            .await
            .unwrap();
        if shown[0] == false && shown[1].as_str().is_some_and(|m| m.contains("not valid")) {
            break;
        }
        assert!(Instant::now() < deadline, "no token prompt for a bad token: {shown}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    client.close().await.unwrap();
    app.stop().await;
}
