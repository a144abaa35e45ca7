//! Shared helpers for callboard's integration tests: [`spawn_app`] starts
//! real servers and the API on a free port; [`reference`] recomputes the
//! expected response from raw documents, independently of the service.

pub mod dataset;
pub mod reference;
pub mod sse;

use std::net::TcpListener;
use std::time::Duration;

use bson::Document;
use callboard_api::{Application, JwtKeys, GROUPED_PATH};
use callboard_domain::TenantId;
use callboard_settings::Settings;
use callboard_testkit::{unique_db_name, Services};
use serde_json::Value;

pub const SECRET: &str = "test-secret-0123456789abcdef-0123456789";

/// A running API with its own servers and database.
pub struct TestApp {
    pub address: String,
    projector: Option<(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
    pub client: reqwest::Client,
    pub db: mongodb::Database,
    pub keys: JwtKeys,
    pub settings: Settings,
    pub services: Services,
    handle: actix_web::dev::ServerHandle,
}

/// Settings pointing at `services`, with database `db_name`.
pub fn test_settings(services: &Services, db_name: &str) -> Settings {
    let env = [
        ("CALLBOARD_MONGODB_URI", services.mongo.uri()),
        ("CALLBOARD_MONGODB_DB", db_name.to_string()),
        services.redis.setting(),
        ("CALLBOARD_HTTP_ADDR", "127.0.0.1:0".to_string()),
        ("CALLBOARD_JWT_SECRET", SECRET.to_string()),
        ("CALLBOARD_HTTP_WORKERS", "2".to_string()),
        // The API maps tenants to partitions for their watermarks.
        ("CALLBOARD_PROJECTOR_PARTITIONS", test_partitions().to_string()),
    ];
    Settings::load(None, env.into_iter().map(|(k, v)| (k.to_string(), v))).expect("test settings are valid")
}

/// Projector partitions the suite runs with: `CALLBOARD_TEST_PARTITIONS`,
/// else 1.
pub fn test_partitions() -> u32 {
    std::env::var("CALLBOARD_TEST_PARTITIONS").ok().and_then(|p| p.parse().ok()).unwrap_or(1)
}

pub async fn spawn_app() -> TestApp {
    spawn_app_on(Services::start().expect("start Redis and MongoDB")).await
}

/// [`spawn_app`] on servers the test started itself.
pub async fn spawn_app_on(services: Services) -> TestApp {
    spawn_app_configured(services, |_| {}).await
}

/// [`spawn_app_on`] with settings changed by `configure`.
pub async fn spawn_app_configured(services: Services, configure: impl FnOnce(&mut Settings)) -> TestApp {
    callboard_telemetry::init_for_tests();
    let mut settings = test_settings(&services, &unique_db_name("cbtest"));
    configure(&mut settings);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let app = Application::with_listener(&settings, listener).await.expect("build the app");
    let address = format!("http://127.0.0.1:{}", app.port());
    let handle = app.handle();
    tokio::spawn(app.run_until_stopped());
    let db = settings.mongodb.database().await.expect("mongo client");
    TestApp {
        address,
        projector: None,
        client: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("http client"),
        db,
        keys: JwtKeys::new(SECRET.as_bytes()),
        settings,
        services,
        handle,
    }
}

impl TestApp {
    /// The environment a `callboard` process needs to use this app's
    /// servers and database.
    pub fn process_env(&self) -> Vec<(String, String)> {
        vec![
            ("CALLBOARD_MONGODB_URI".into(), self.services.mongo.uri()),
            ("CALLBOARD_MONGODB_DB".into(), self.db.name().to_string()),
            (self.services.redis.setting().0.into(), self.services.redis.setting().1),
            ("CALLBOARD_JWT_SECRET".into(), SECRET.into()),
            ("CALLBOARD_LOG".into(), "info".into()),
        ]
    }

    /// The app's `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.client.get(format!("{}/metrics", self.address)).send().await.unwrap().text().await.unwrap()
    }

    /// The value of a metric in `/metrics`, summed over the lines that
    /// start with `name` (0 if absent).
    pub async fn counter(&self, name: &str) -> u64 {
        self.metrics()
            .await
            .lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    pub fn token(&self, tenant: i64) -> String {
        self.keys.mint(TenantId::new(tenant).expect("valid tenant"), false, Duration::from_secs(3600))
    }

    pub fn admin_token(&self, tenant: i64) -> String {
        self.keys.mint(TenantId::new(tenant).expect("valid tenant"), true, Duration::from_secs(3600))
    }

    /// `GET /crm/calls/stream` with `query` (a token goes in
    /// `access_token` or as a bearer header, as the caller chooses),
    /// without the client's 30 s timeout.
    pub async fn open_stream(&self, query: &[(&str, &str)], headers: &[(&str, &str)]) -> reqwest::Response {
        let client = reqwest::Client::builder().build().expect("http client");
        let mut req = client.get(format!("{}{}", self.address, callboard_api::STREAM_PATH)).query(query);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.expect("stream request sent")
    }

    pub fn grouped_url(&self) -> String {
        format!("{}{}", self.address, GROUPED_PATH)
    }

    /// POSTs a multipart form, as `curl -F name=value` does.
    pub async fn post_grouped_form(&self, token: Option<&str>, fields: &[(&str, &str)]) -> reqwest::Response {
        let mut form = reqwest::multipart::Form::new();
        for (k, v) in fields {
            form = form.text(k.to_string(), v.to_string());
        }
        let mut req = self.client.post(self.grouped_url()).multipart(form);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.expect("request sent")
    }

    /// POSTs a multipart form and returns the JSON of a 200 response.
    pub async fn grouped(&self, tenant: i64, fields: &[(&str, &str)]) -> Value {
        let response = self.post_grouped_form(Some(&self.token(tenant)), fields).await;
        let status = response.status();
        let body = response.text().await.expect("body");
        assert_eq!(status, 200, "unexpected status; body: {body}");
        serde_json::from_str(&body).expect("JSON body")
    }

    pub async fn insert(&self, collection: &str, docs: &[Document]) {
        if !docs.is_empty() {
            self.db.collection::<Document>(collection).insert_many(docs).await.expect("insert");
        }
    }

    /// Runs a projector in this process (a lease TTL short enough for
    /// tests) until [`TestApp::stop_projector`] or [`TestApp::stop`].
    /// Inserts a generated dataset: its statuses, users, then calls.
    pub async fn insert_dataset(&self, ds: &dataset::Dataset) {
        self.insert(callboard_store::CALL_STATUS, &ds.statuses).await;
        self.insert(callboard_store::USERS, &ds.users).await;
        self.insert(callboard_store::CALLS, &ds.calls).await;
    }

    pub fn start_projector(&mut self) {
        self.start_projector_with(callboard_readmodel::write::DocWindow::default());
    }

    /// [`TestApp::start_projector`] keeping documents for `window`'s first
    /// calls of each status.
    pub fn start_projector_with(&mut self, window: callboard_readmodel::write::DocWindow) {
        let fields = self.settings.query.user_fields().expect("user fields");
        self.start_projector_using(window, fields);
    }

    /// [`TestApp::start_projector_with`], storing users with `fields`
    /// rather than the API's allowlist.
    pub fn start_projector_using(
        &mut self,
        window: callboard_readmodel::write::DocWindow,
        fields: callboard_domain::render::UserFields,
    ) {
        self.start_projector_configured(fields, |c| c.doc_window = window);
    }

    /// [`TestApp::start_projector`] with its configuration changed by
    /// `configure`.
    pub fn start_projector_configured(
        &mut self,
        fields: callboard_domain::render::UserFields,
        configure: impl FnOnce(&mut callboard_projector::ProjectorConfig),
    ) {
        let db = self.db.clone();
        let redis = self.settings.redis.clone();
        let keys = callboard_readmodel::Keys::new(&self.settings.redis.key_prefix);
        let mut config = callboard_projector::ProjectorConfig {
            lease_ttl: Duration::from_secs(3),
            batch_wait: Duration::from_millis(50),
            idle_checkpoint: Duration::from_millis(200),
            // `CALLBOARD_TEST_PARTITIONS` runs the suite with the tenants
            // spread over that many partitions (one process leads them all).
            partitions: test_partitions(),
            ..Default::default()
        };
        configure(&mut config);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let redis = redis.connect().await.expect("connect to Redis");
            let projector = callboard_projector::Projector::new(db, redis, keys, fields, config);
            let _ = projector
                .run(async move {
                    let _ = rx.await;
                })
                .await;
        });
        self.projector = Some((tx, task));
    }

    /// The read model's Redis, as the service reaches it (one node or the
    /// cluster), for tests that look at or damage keys.
    pub async fn redis(&self) -> callboard_readmodel::Conn {
        self.settings.redis.connect().await.expect("connect to Redis").get().await.expect("a Redis connection")
    }

    pub async fn stop_projector(&mut self) {
        if let Some((tx, task)) = self.projector.take() {
            let _ = tx.send(());
            let _ = task.await;
        }
    }

    /// POSTs and returns (X-Cache, body).
    pub async fn grouped_as(&self, token: &str, fields: &[(&str, &str)], no_cache: bool) -> (String, Value) {
        let mut form = reqwest::multipart::Form::new();
        for (k, v) in fields {
            form = form.text(k.to_string(), v.to_string());
        }
        let mut req = self.client.post(self.grouped_url()).bearer_auth(token).multipart(form);
        if no_cache {
            req = req.header("Cache-Control", "no-cache");
        }
        let response = req.send().await.expect("request sent");
        let status = response.status();
        let cache = response.headers().get("x-cache").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let body = response.text().await.expect("body");
        assert_eq!(status, 200, "unexpected status; body: {body}");
        (cache, serde_json::from_str(&body).expect("JSON body"))
    }

    /// The live answer (admin token, `Cache-Control: no-cache`).
    pub async fn live(&self, tenant: i64, fields: &[(&str, &str)]) -> Value {
        let (cache, body) = self.grouped_as(&self.admin_token(tenant), fields, true).await;
        assert_eq!(cache, "miss", "no-cache must answer live");
        body
    }

    /// Polls until `tenant`'s cached answer is a hit equal to the live one
    /// for `fields`, or `timeout` passes; returns the last (hit?, cached,
    /// live) seen.
    pub async fn wait_for_projection(
        &self,
        tenant: i64,
        fields: &[(&str, &str)],
        timeout: Duration,
    ) -> (bool, Value, Value) {
        let deadline = tokio::time::Instant::now() + timeout;
        let token = self.token(tenant);
        loop {
            let live = self.live(tenant, fields).await;
            let (cache, cached) = self.grouped_as(&token, fields, false).await;
            let same = serde_json::to_string(&cached).ok() == serde_json::to_string(&live).ok();
            if (cache == "hit" && same) || tokio::time::Instant::now() >= deadline {
                return (cache == "hit", cached, live);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn stop(mut self) {
        self.stop_projector().await;
        self.handle.stop(false).await;
        if self.services.mongo.is_external() {
            let _ = self.db.drop().await;
        }
    }
}
