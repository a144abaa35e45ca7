//! `GET /openapi.json` against real answers: every answer of every
//! endpoint below (hits and live answers in each parameter encoding, ids
//! only and counts only, the stream's first event, the admin API, the
//! probes, and the errors) has a status, content type and headers the
//! document lists for its operation, and a JSON body its schema accepts.

use std::time::Duration;

use callboard_tests::dataset::generate;
use callboard_tests::sse::EventStream;
use callboard_tests::{spawn_app, TestApp};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

/// The document, and the checks made against it.
struct Contract {
    doc: Value,
    checked: Vec<String>,
}

impl Contract {
    async fn fetch(app: &TestApp) -> Self {
        let response = app.client.get(format!("{}/openapi.json", app.address)).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let doc: Value = response.json().await.unwrap();
        assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.1.")), "{}", doc["openapi"]);
        Self { doc, checked: Vec::new() }
    }

    fn operation(&self, path: &str, method: &str) -> &Value {
        let op = &self.doc["paths"][path][method];
        assert!(op.is_object(), "{method} {path} is not in the document");
        op
    }

    /// Validates `value` against `schema`, whose `$ref`s point into the
    /// document's components.
    fn validate(&self, schema: &Value, value: &Value, what: &str) {
        let root = json!({"components": self.doc["components"], "allOf": [schema]});
        let validator = jsonschema::validator_for(&root).unwrap_or_else(|e| panic!("{what}: a bad schema: {e}"));
        let errors: Vec<String> =
            validator.iter_errors(value).map(|e| format!("{e} at {}", e.instance_path())).collect();
        assert!(errors.is_empty(), "{what}: the answer does not match its schema:\n{}\n{value}", errors.join("\n"));
    }

    /// Checks an answer of `method path` (the document's path template):
    /// its status is listed, its content type too, the headers the
    /// document names for it are there, and a JSON body matches.
    async fn check(&mut self, path: &str, method: &str, response: reqwest::Response) -> Value {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let what = format!("{method} {path} -> {status}");
        let documented = self.operation(path, method)["responses"][status.to_string()].clone();
        assert!(documented.is_object(), "{what}: status not in the document");
        for (name, _) in documented["headers"].as_object().into_iter().flatten() {
            assert!(headers.contains_key(name.as_str()), "{what}: no {name} header");
        }
        let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let media = content_type.split(';').next().unwrap().trim().to_string();
        let content = &documented["content"];
        assert!(content[&media].is_object(), "{what}: content type {media} is not documented: {content}");
        let text = response.text().await.unwrap();
        self.checked.push(what.clone());
        if media == "application/json" {
            let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"));
            if let Some(schema) = content[&media].get("schema") {
                self.validate(schema, &body, &what);
            }
            body
        } else {
            assert!(!text.is_empty(), "{what}: empty body");
            Value::String(text)
        }
    }
}

async fn seeded() -> TestApp {
    let mut app = spawn_app().await;
    let ds = generate(97, 120);
    app.insert_dataset(&ds).await;
    app.start_projector();
    app
}

const GROUPED: &str = "/crm/calls/get-grouped-by-status";

#[tokio::test]
async fn every_answer_matches_the_document() {
    let app = seeded().await;
    let mut contract = Contract::fetch(&app).await;
    let token = app.token(1);
    let admin = app.admin_token(1);
    let url = |path: &str| format!("{}{path}", app.address);
    let post = || app.client.post(app.grouped_url()).bearer_auth(&token);

    // Cold: live; then warm: hits, in every encoding.
    let live = contract.check(GROUPED, "post", post().query(&[("limit", "5")]).send().await.unwrap()).await;
    assert_eq!(live["status"], 200);
    app.grouped_as(&token, &[], false).await;
    let (hit, _, _) = app.wait_for_projection(1, &[("limit", "5")], WAIT).await;
    assert!(hit);
    let form = reqwest::multipart::Form::new().text("limit", "5").text("include_enrichment", "true");
    for request in [
        post().multipart(form),
        post().form(&[("limit", "3"), ("include_calls", "true")]),
        post().json(&json!({"limit": 4, "include_enrichment": false})),
        post().query(&[("include_calls", "false")]),
        post().query(&[("max_staleness_ms", "60000"), ("limit", "2")]),
        app.client.post(app.grouped_url()).bearer_auth(&admin).header("Cache-Control", "no-cache"),
    ] {
        let response = request.send().await.unwrap();
        let body = contract.check(GROUPED, "post", response).await;
        assert_eq!(body["status"], 200, "{body}");
    }

    // Errors, each in the envelope with a listed status.
    let big = "x".repeat(200_000);
    for (request, status) in [
        (app.client.post(app.grouped_url()), 401),
        (app.client.post(app.grouped_url()).bearer_auth("not.a.token"), 401),
        (post().query(&[("limit", "0")]), 422),
        (post().header("Content-Type", "application/json").body("{\"limit\": "), 400),
        (post().header("Content-Type", "text/plain").body("limit=5"), 415),
        (post().header("Content-Type", "application/json").body(big), 413),
    ] {
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), status);
        let body = contract.check(GROUPED, "post", response).await;
        assert_eq!(body["status"], status);
    }

    // The stream: its content type, and a first event that is the
    // endpoint's answer, by the endpoint's schema.
    let response = app.open_stream(&[("limit", "5"), ("access_token", &token)], &[]).await;
    assert_eq!(response.status(), 200);
    let documented = &contract.operation("/crm/calls/stream", "get")["responses"]["200"]["content"];
    assert!(documented["text/event-stream"].is_object(), "{documented}");
    let mut stream = EventStream::new(response);
    let board = stream.expect(WAIT).await.json();
    let schema =
        contract.operation(GROUPED, "post")["responses"]["200"]["content"]["application/json"]["schema"].clone();
    contract.validate(&schema, &board, "the stream's board event");
    drop(stream);
    for query in [&[("limit", "5")][..], &[("access_token", token.as_str()), ("limit", "x")][..]] {
        contract.check("/crm/calls/stream", "get", app.open_stream(query, &[]).await).await;
    }

    // The admin API.
    let warm = contract
        .check(
            "/admin/cache/warm",
            "post",
            app.client
                .post(url("/admin/cache/warm"))
                .bearer_auth(&admin)
                .json(&json!({"tenant_id": 2}))
                .send()
                .await
                .unwrap(),
        )
        .await;
    let job = warm["job_id"].as_str().unwrap().to_string();
    let job_path = "/admin/cache/warm/{job_id}";
    contract
        .check(
            job_path,
            "get",
            app.client.get(url(&format!("/admin/cache/warm/{job}"))).bearer_auth(&admin).send().await.unwrap(),
        )
        .await;
    contract
        .check(job_path, "get", app.client.get(url("/admin/cache/warm/nope")).bearer_auth(&admin).send().await.unwrap())
        .await;
    for query in [&[][..], &[("tenant_id", "1")][..]] {
        contract
            .check(
                "/admin/cache/status",
                "get",
                app.client.get(url("/admin/cache/status")).query(query).bearer_auth(&admin).send().await.unwrap(),
            )
            .await;
    }
    let verdict = contract
        .check(
            "/admin/cache/verify",
            "post",
            app.client
                .post(url("/admin/cache/verify"))
                .bearer_auth(&admin)
                .json(&json!({"tenant_id": 1}))
                .send()
                .await
                .unwrap(),
        )
        .await;
    assert_eq!(verdict["equal"], true, "{verdict}");
    for (path, body) in [
        ("/admin/cache/verify", json!({"all": true})),
        ("/admin/cache/invalidate", json!({"tenant_id": 0})),
        ("/admin/cache/invalidate", json!({"tenant_id": 1})),
        ("/admin/cache/invalidate", json!({"all": true})),
        ("/admin/cache/warm", json!({"all": true})),
    ] {
        contract
            .check(path, "post", app.client.post(url(path)).bearer_auth(&admin).json(&body).send().await.unwrap())
            .await;
    }
    // A member's token: 403.
    contract
        .check(
            "/admin/cache/status",
            "get",
            app.client.get(url("/admin/cache/status")).bearer_auth(&token).send().await.unwrap(),
        )
        .await;

    // Probes, metrics, the page, the document.
    for path in ["/healthz", "/readyz", "/projectorz", "/metrics", "/board", "/openapi.json"] {
        contract.check(path, "get", app.client.get(url(path)).send().await.unwrap()).await;
    }
    println!("{} answers checked against the document:\n{}", contract.checked.len(), contract.checked.join("\n"));
    app.stop().await;
}
