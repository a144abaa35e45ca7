//! The operator commands: `status`, `warm`, `invalidate` and `verify`, a
//! client of the admin API (`/admin/cache/*`) of a running `serve`.
//! Readable tables by default, the API's JSON with `--json`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

/// Where the API is and who asks.
#[derive(Args, Debug, Clone)]
pub struct Endpoint {
    /// The API's base URL.
    #[arg(long, env = "CALLBOARD_URL", default_value = "http://127.0.0.1:8006")]
    pub url: String,
    /// An admin bearer token (`callboard token --tenant 1 --admin` prints
    /// one). Prefer the variable: an argument shows in `ps`.
    #[arg(long, env = "CALLBOARD_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the API's JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// An operator command, parsed.
pub enum Operation {
    Status(Option<i64>, Endpoint),
    Warm(Target, Duration, Endpoint),
    Invalidate(Target, Endpoint),
    Verify(i64, Endpoint),
}

impl Operation {
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Operation::Status(tenant, endpoint) => status(&endpoint, tenant).await,
            Operation::Warm(target, wait, endpoint) => warm(&endpoint, &target, wait).await,
            Operation::Invalidate(target, endpoint) => invalidate(&endpoint, &target).await,
            Operation::Verify(tenant, endpoint) => verify(&endpoint, tenant).await,
        }
    }
}

/// One tenant, or every tenant.
#[derive(Args, Debug, Clone)]
#[group(required = true, multiple = false)]
pub struct Target {
    #[arg(long)]
    pub tenant: Option<i64>,
    /// Every tenant (warm: every tenant with calls; invalidate: every
    /// tenant not cold).
    #[arg(long)]
    pub all: bool,
}

impl Target {
    fn body(&self) -> Value {
        match self.tenant {
            Some(t) => json!({"tenant_id": t}),
            None => json!({"all": true}),
        }
    }
}

/// A client of one API.
struct Client {
    http: reqwest::Client,
    endpoint: Endpoint,
    token: String,
}

impl Client {
    fn new(endpoint: &Endpoint) -> anyhow::Result<Self> {
        let Some(token) = endpoint.token.clone() else {
            bail!("an admin token is needed: give --token or set CALLBOARD_ADMIN_TOKEN (`callboard token --tenant 1 --admin` prints one)");
        };
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
        Ok(Self {
            http,
            endpoint: Endpoint { url: endpoint.url.trim_end_matches('/').to_string(), ..endpoint.clone() },
            token,
        })
    }

    async fn call(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let response = request
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("cannot reach callboard at {}", self.endpoint.url))?;
        let status = response.status();
        let text = response.text().await.context("reading the answer")?;
        let body: Value = serde_json::from_str(&text).with_context(|| {
            format!("HTTP {status}: not a JSON answer: {}", text.chars().take(200).collect::<String>())
        })?;
        if !status.is_success() {
            let message = body["message"].as_str().unwrap_or("no message");
            let code = body["error"].as_str().unwrap_or("unknown");
            bail!("{message} ({code}, HTTP {})", status.as_u16());
        }
        Ok(body)
    }

    async fn get(&self, path: &str, query: &[(&str, String)]) -> anyhow::Result<Value> {
        self.call(self.http.get(format!("{}{path}", self.endpoint.url)).query(query)).await
    }

    async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.call(self.http.post(format!("{}{path}", self.endpoint.url)).json(body)).await
    }
}

fn print_json(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(header.iter().copied());
    t
}

/// A value for a table cell: strings bare, nothing as `-`.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// How long ago an epoch-ms instant was, e.g. `3.2 s ago`.
fn ago(ms: &Value) -> String {
    let Some(ms) = ms.as_i64() else { return "-".into() };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis() as i64;
    let s = (now - ms) as f64 / 1000.0;
    if s < 120.0 {
        format!("{s:.1} s ago")
    } else if s < 7200.0 {
        format!("{:.0} min ago", s / 60.0)
    } else {
        format!("{:.1} h ago", s / 3600.0)
    }
}

/// `callboard status [--tenant N]`
pub async fn status(endpoint: &Endpoint, tenant: Option<i64>) -> anyhow::Result<()> {
    let client = Client::new(endpoint)?;
    let query: Vec<(&str, String)> = tenant.map(|t| ("tenant_id", t.to_string())).into_iter().collect();
    let body = client.get("/admin/cache/status", &query).await?;
    if endpoint.json {
        return print_json(&body);
    }
    let p = &body["projector"];
    let mut projector = table(&["projector", ""]);
    projector.add_row(vec!["owner".to_string(), cell(&p["owner"])]);
    projector.add_row(vec!["heartbeat".to_string(), ago(&p["heartbeat_ms"])]);
    projector.add_row(vec!["last event".to_string(), ago(&p["last_event_ms"])]);
    projector.add_row(vec!["lag".to_string(), p["lag_ms"].as_i64().map_or("-".into(), |l| format!("{l} ms"))]);
    projector.add_row(vec!["events applied".to_string(), cell(&p["events_applied"])]);
    let h = &body["history"];
    if let Some(h) = h.as_object() {
        for (k, v) in h {
            projector.add_row(vec![format!("history {}", k.replace('_', " ")), cell(v)]);
        }
    }
    println!("{projector}");
    let tenants = body["tenants"].as_array().cloned().unwrap_or_default();
    let mut rows = table(&["tenant", "state", "calls", "last event"]);
    for t in &tenants {
        rows.add_row(vec![cell(&t["tenant_id"]), cell(&t["state"]), cell(&t["calls"]), ago(&t["last_event_ms"])]);
    }
    if tenants.is_empty() {
        println!("no tenant is warm or warming");
    } else {
        println!("{rows}");
    }
    let poison = body["poison_events"].as_array().cloned().unwrap_or_default();
    if !poison.is_empty() {
        let mut rows = table(&["poison event: tenant", "detail"]);
        for e in &poison {
            let mut rest = e.clone();
            if let Some(o) = rest.as_object_mut() {
                o.remove("tenant_id");
            }
            rows.add_row(vec![cell(&e["tenant_id"]), rest.to_string()]);
        }
        println!("{rows}");
    }
    Ok(())
}

/// `callboard warm --tenant N|--all`: queues the warm and follows its job.
pub async fn warm(endpoint: &Endpoint, target: &Target, wait: Duration) -> anyhow::Result<()> {
    let client = Client::new(endpoint)?;
    let accepted = client.post("/admin/cache/warm", &target.body()).await?;
    let job = accepted["job_id"].as_str().context("the API gave no job_id")?.to_string();
    let bar = if endpoint.json {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(accepted["tenants"].as_u64().unwrap_or(0));
        bar.set_style(
            ProgressStyle::with_template("{spinner} warm {msg} [{bar:30}] {pos}/{len} tenants ({elapsed})")?
                .progress_chars("=> "),
        );
        bar.set_message(job.clone());
        bar
    };
    let deadline = Instant::now() + wait;
    let finished = loop {
        let status = client.get(&format!("/admin/cache/warm/{job}"), &[]).await?;
        bar.set_length(status["total"].as_u64().unwrap_or(0));
        bar.set_position(status["done"].as_u64().unwrap_or(0));
        if status["state"] == "done" {
            break status;
        }
        if Instant::now() >= deadline {
            bar.abandon();
            bail!("warm {job} is not done after {wait:?}: {status}; it goes on in the projector");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    bar.finish();
    if endpoint.json {
        return print_json(&finished);
    }
    println!("warm {job} done: {} tenants", cell(&finished["done"]));
    Ok(())
}

/// `callboard invalidate --tenant N|--all`
pub async fn invalidate(endpoint: &Endpoint, target: &Target) -> anyhow::Result<()> {
    let client = Client::new(endpoint)?;
    let body = client.post("/admin/cache/invalidate", &target.body()).await?;
    if endpoint.json {
        return print_json(&body);
    }
    let tenants = body["invalidated"].as_array().cloned().unwrap_or_default();
    let list: Vec<String> = tenants.iter().map(cell).collect();
    println!(
        "invalidated {} tenants{}",
        tenants.len(),
        if list.is_empty() { String::new() } else { format!(": {}", list.join(", ")) }
    );
    Ok(())
}

/// Verification compared nothing (a cold tenant, one written to in every
/// round, a projector behind): exit status 3, so that scripts do not read
/// it as "no drift".
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotCompared(String);

/// `callboard verify --tenant N`: exit status 1 when the cache differs
/// from MongoDB, 3 when nothing was compared.
pub async fn verify(endpoint: &Endpoint, tenant: i64) -> anyhow::Result<()> {
    let client = Client::new(endpoint)?;
    let verdict = client.post("/admin/cache/verify", &json!({"tenant_id": tenant})).await?;
    if endpoint.json {
        print_json(&verdict)?;
    } else {
        let mut summary = table(&["tenant", "state", "equal", "as of", "repaired"]);
        summary.add_row(vec![
            cell(&verdict["tenant_id"]),
            cell(&verdict["state"]),
            cell(&verdict["equal"]),
            cell(&verdict["as_of"]),
            cell(&verdict["repaired"]),
        ]);
        println!("{summary}");
        let differences = verdict["differences"].as_array().cloned().unwrap_or_default();
        if !differences.is_empty() {
            let mut rows = table(&["kind", "status", "difference"]);
            for d in &differences {
                rows.add_row(vec![cell(&d["kind"]), cell(&d["status_id"]), cell(&d["detail"])]);
            }
            println!("{rows}");
        }
    }
    if verdict["equal"] == false {
        bail!("tenant {tenant}'s cached answer differs from MongoDB's (a repair was started)");
    }
    if verdict["equal"].is_null() {
        return Err(NotCompared(format!("tenant {tenant} was not compared: {}", cell(&verdict["state"]))).into());
    }
    Ok(())
}
