//! `callboard-bench`: callboard against the live aggregation it replaces,
//! in one run, on the same data. Starts Redis and the MongoDB stand-in,
//! seeds each dataset with the release `callboard seed`, runs
//! `callboard serve` and `callboard project` as separate processes, and
//! measures with `wrk` over loopback. Writes BENCHMARKS.md and a chart.

/// The allocator `callboard` runs with, so that the projector's own
/// throughput (`pipeline`) is measured as it runs there.
#[global_allocator]
static GLOBAL: callboard_alloc::Allocator = callboard_alloc::Allocator;

mod memory;
mod pipeline;
mod report;
mod scale;
mod stream;
mod wrk;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bson::{doc, DateTime, Document};
use callboard_testkit::{free_port, Guarded, Services};
use clap::Parser;

use report::{LagResult, Report, ScenarioResult};

#[derive(Parser)]
#[command(about = "Benchmarks callboard's cache against the live aggregation")]
pub(crate) struct Args {
    /// Only the 10K-call dataset, shorter runs (under two minutes).
    #[arg(long)]
    quick: bool,
    /// The release binary to measure.
    #[arg(long, default_value = "target/release/callboard")]
    bin: PathBuf,
    /// Where to write the report (the chart goes beside it).
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Only the scenarios whose name contains this (e.g. "1M calls, 1 tenant").
    #[arg(long)]
    only: Option<String>,
    /// The scale-out figures instead (cluster hits, projection rate with
    /// 1/2/4 processes, memory per master), written into their section.
    #[arg(long)]
    scale: bool,
    /// Calls (over 1,000 tenants) for the memory-per-master figure.
    #[arg(long, default_value_t = 1_000_000)]
    scale_memory_calls: u64,
    /// Which scale-out parts to run: `all`, or some of `hits,rate,memory`.
    #[arg(long, default_value = "all")]
    scale_parts: String,
    /// The board stream's figures instead (latency at 1 and 1,000
    /// connections, memory and CPU of idle connections).
    #[arg(long)]
    stream: bool,
    /// Only the projector's throughput without MongoDB, printed (not
    /// written): `make bench` puts it in the report.
    #[arg(long)]
    pipeline: bool,
}

pub struct Scenario {
    pub name: &'static str,
    pub calls: u64,
    pub tenants: u32,
}

/// The request kinds measured, as form bodies.
pub const KINDS: [(&str, &str); 4] = [
    ("counts only", "include_calls=false"),
    ("ids only, limit 20", "limit=20&include_enrichment=false"),
    ("limit 20 enriched", "limit=20&include_enrichment=true"),
    ("limit 100 enriched", "limit=100&include_enrichment=true"),
];

pub(crate) const SECRET: &str = "bench-secret-0123456789abcdef-0123456789";

struct Deployment {
    services: Services,
    base: String,
    serve: Guarded,
    project: Guarded,
    token: String,
    admin: String,
}

// No `callboard_alloc::without_huge_pages()` here: the flag would pass to
// the processes the bench measures callboard against (the stand-in,
// Redis, wrk). The `callboard` processes set it themselves, and the
// allocator's `no_thp` build gives the in-process pipeline the same
// wherever the host leaves huge pages to `madvise` (ADR 0015).
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.bin.exists() {
        bail!("{} not found: run `cargo build --release -p callboard` (make bench does)", args.bin.display());
    }
    if args.stream {
        stream::run(&args).await?;
        eprintln!("wrote the stream section of {}", args.out.display());
        return Ok(());
    }
    if args.pipeline {
        let run = pipeline::run(100_000, 20_000).await?;
        for p in &run.results {
            println!(
                "{:<32} {:>8} events {:>7.2} s {:>9.0} events/s, Redis busy {:>3.0}% ({} windows left short)",
                p.kind,
                p.events,
                p.secs,
                p.rate(),
                100.0 * p.redis_share(),
                p.refills
            );
        }
        println!("\nWhere each kind's time went (s): decoding the events, reading locators, planning, applying:");
        for p in &run.results {
            if let Some(s) = p.stages {
                println!(
                    "{:<32} decode {:.3}  load_locators {:.3}  plan {:.3}  apply {:.3} ({:.0}%)",
                    p.kind,
                    s.decode,
                    s.load,
                    s.plan,
                    s.apply,
                    100.0 * s.apply / p.secs.max(1e-9)
                );
            }
        }
        println!("\nRedis after the warm ({} calls in one tenant), by key type (MEMORY USAGE):", run.warm_calls);
        for c in &run.warm_costs {
            println!(
                "{:<36} {:>6} keys {:>12} bytes {:>7.1} bytes/call",
                c.label(),
                c.keys,
                c.bytes,
                c.bytes as f64 / run.warm_calls.max(1) as f64
            );
        }
        return Ok(());
    }
    if args.scale {
        scale::run(&args, args.scale_memory_calls, &args.scale_parts).await?;
        eprintln!("wrote the scale-out section of {}", args.out.display());
        return Ok(());
    }
    let scenarios: Vec<Scenario> = if args.quick {
        vec![Scenario { name: "10K calls, 1 tenant", calls: 10_000, tenants: 1 }]
    } else {
        vec![
            Scenario { name: "10K calls, 1 tenant", calls: 10_000, tenants: 1 },
            Scenario { name: "100K calls, 1 tenant", calls: 100_000, tenants: 1 },
            Scenario { name: "1M calls, 1 tenant", calls: 1_000_000, tenants: 1 },
            Scenario { name: "1M calls, 1,000 tenants", calls: 1_000_000, tenants: 1000 },
        ]
    };
    let scenarios: Vec<Scenario> =
        scenarios.into_iter().filter(|s| args.only.as_deref().is_none_or(|o| s.name.contains(o))).collect();
    let mut report = Report::new(args.quick);
    for scenario in &scenarios {
        eprintln!("== {}", scenario.name);
        let (result, lag) = run_scenario(&args, scenario, scenario.calls == 10_000).await?;
        report.scenarios.push(result);
        report.lag.extend(lag);
    }
    if args.only.is_none() {
        eprintln!("== projector throughput, no MongoDB");
        let (calls, events) = if args.quick { (20_000, 5_000) } else { (100_000, 20_000) };
        report.pipeline = pipeline::run(calls, events).await?.results;
    }
    report.write(&args.out)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

async fn run_scenario(args: &Args, s: &Scenario, with_lag: bool) -> anyhow::Result<(ScenarioResult, Vec<LagResult>)> {
    let services = Services::start()?;
    let port = free_port()?;
    let env: Vec<(String, String)> = vec![
        ("CALLBOARD_MONGODB_URI".into(), services.mongo.uri()),
        ("CALLBOARD_MONGODB_DB".into(), "bench".into()),
        (services.redis.setting().0.into(), services.redis.setting().1),
        ("CALLBOARD_JWT_SECRET".into(), SECRET.into()),
        ("CALLBOARD_HTTP_ADDR".into(), format!("127.0.0.1:{port}")),
        ("CALLBOARD_LOG".into(), "warn".into()),
        // The projector's background check is one live query per warm
        // tenant, first run within seconds of the warm: on the stand-in
        // that is tens of seconds of its CPU at 1M calls, on the two cores
        // the hits are measured on. Off here; the report says so.
        ("CALLBOARD_RECONCILE_INTERVAL_S".into(), "0".into()),
    ];
    let run = |args_: &[&str]| -> anyhow::Result<std::process::Output> {
        let out = Command::new(&args.bin).args(args_).envs(env.iter().map(|(k, v)| (k, v))).output()?;
        if !out.status.success() {
            bail!("callboard {args_:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(out)
    };
    let started = Instant::now();
    let (calls, tenants) = (s.calls.to_string(), s.tenants.to_string());
    run(&["seed", "--tenants", &tenants, "--calls", &calls, "--users", "100", "--statuses", "5", "--drop"])?;
    let seed_s = started.elapsed().as_secs_f64();
    eprintln!("   seeded in {seed_s:.1}s");
    run(&["create-indexes"])?;
    let spawn = |cmd: &str| -> anyhow::Result<Guarded> {
        let mut c = Command::new(&args.bin);
        c.arg(cmd).envs(env.iter().map(|(k, v)| (k, v)));
        Ok(Guarded::spawn(c, "callboard", &services.dir.path().join(format!("{cmd}.log")))?)
    };
    let project = spawn("project")?;
    let serve = spawn("serve")?;
    let token = String::from_utf8(run(&["token", "--tenant", "1", "--ttl", "2h"])?.stdout)?.trim().to_string();
    let admin =
        String::from_utf8(run(&["token", "--tenant", "1", "--admin", "--ttl", "2h"])?.stdout)?.trim().to_string();
    let mut d = Deployment { base: format!("http://127.0.0.1:{port}"), services, serve, project, token, admin };
    let client = reqwest::Client::builder().timeout(Duration::from_secs(600)).build()?;
    wait_healthy(&client, &d.base).await?;

    let nodes = node_urls(&d.services.redis);
    let used_before = used_memory(&nodes).await?;
    let warm_s = warm(&client, &d.base, &d.admin, serde_json::json!({"tenant_id": 1})).await?;
    let used_after = used_memory(&nodes).await?;
    let tenant_calls: u64 = {
        let (var, value) = d.services.redis.setting();
        let redis = match var {
            "CALLBOARD_REDIS_URL" => callboard_readmodel::Redis::single_url(&value, 2)?,
            _ => callboard_readmodel::Redis::cluster(&value.split(',').map(str::to_string).collect::<Vec<_>>()).await?,
        };
        callboard_readmodel::ReadModel::new(redis, callboard_readmodel::Keys::new("cb"))
            .tenant_calls(callboard_domain::TenantId::new(1)?)
            .await?
    };
    eprintln!("   warm of tenant 1 ({tenant_calls} calls) in {warm_s:.1}s");
    let key_costs = memory::key_costs(&nodes, &callboard_readmodel::Keys::new("cb")).await?;
    let cache = probe_cache(&client, &d, "limit=20&include_enrichment=true", false).await?;
    if cache != "hit" {
        bail!("tenant 1 is not served from the cache after its warm ({cache})");
    }

    // Hits first, then the lag probe, then the live path: the stand-in
    // keeps working through queued live queries after wrk stops, which
    // would load the machine during the other measurements.
    let quick = args.quick;
    let mut loads = Vec::new();
    let dir = d.services.dir.path().to_path_buf();
    let secs = if quick { 3 } else { 5 };
    for conns in [64, 1] {
        loads.push(wrk::floor(&dir, &d.base, conns, secs).await?);
    }
    let lookups_before = answer_lookups(&client, &d.base).await?;
    for (kind, body) in KINDS {
        for conns in [64, 1] {
            loads.push(wrk::run(&dir, &d.base, &d.token, body, false, conns, secs, kind).await?);
        }
    }
    let answer_reuse = answer_lookups(&client, &d.base).await?.reuse_since(&lookups_before);
    // The floor again after the hits: two readings bound its drift.
    for conns in [64, 1] {
        loads.push(wrk::floor(&dir, &d.base, conns, secs).await?);
    }
    let rss_serve_kb = rss_kb(d.serve.pid());
    let rss_project_kb = rss_kb(d.project.pid());
    let lag =
        if with_lag { lag_probe(&client, &d, &[500, 2000], if quick { 4 } else { 8 }).await? } else { Vec::new() };
    // The live path on the stand-in: bounded by time. At 64 connections the
    // stand-in (one lock per database) serves them one at a time; beyond
    // 10K calls one request takes seconds, so only one connection there.
    let live_secs = match s.calls {
        n if n <= 10_000 => {
            if quick {
                4
            } else {
                8
            }
        }
        n if n <= 100_000 => 15,
        _ => 45,
    };
    // 64 queued live queries take the stand-in most of a minute to drain;
    // the quick run measures the live path at one connection only.
    let live_conns: &[u32] = if !quick && (s.calls <= 10_000 || s.tenants > 1) { &[64, 1] } else { &[1] };
    for (kind, body) in KINDS {
        for &conns in live_conns {
            loads.push(wrk::run(&dir, &d.base, &d.admin, body, true, conns, live_secs, kind).await?);
            drain(&client, &d).await?;
        }
    }
    d.serve.kill();
    d.project.kill();
    Ok((
        ScenarioResult {
            name: s.name.to_string(),
            seed_s,
            warm_s,
            tenant_calls,
            redis_bytes_per_call: (used_after.saturating_sub(used_before)) / tenant_calls.max(1),
            key_costs,
            rss_serve_kb,
            rss_project_kb,
            answer_reuse,
            loads,
        },
        lag,
    ))
}

/// The serve process's response-cache lookups so far, by result, and its
/// reuses with no round trip.
#[derive(Debug, Default)]
struct Lookups {
    hit: f64,
    other: f64,
    tracked: f64,
}

impl Lookups {
    /// The share of lookups since `before` that reused a kept answer, and
    /// the share of those reuses that took no round trip.
    fn reuse_since(&self, before: &Lookups) -> Option<(f64, f64)> {
        let (hit, other) = (self.hit - before.hit, self.other - before.other);
        let tracked = self.tracked - before.tracked;
        (hit + other > 0.0).then(|| (hit / (hit + other), if hit > 0.0 { tracked / hit } else { 0.0 }))
    }
}

async fn answer_lookups(client: &reqwest::Client, base: &str) -> anyhow::Result<Lookups> {
    let text = client.get(format!("{base}/metrics")).send().await?.text().await?;
    let mut lookups = Lookups::default();
    let value = |line: &str| -> f64 { line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0) };
    for line in text.lines() {
        if line.starts_with("callboard_response_cache_lookups_total{") {
            if line.contains("result=\"hit\"") {
                lookups.hit += value(line);
            } else {
                lookups.other += value(line);
            }
        } else if line.starts_with("callboard_response_cache_reuses_total{check=\"tracking\"}") {
            lookups.tracked += value(line);
        }
    }
    Ok(lookups)
}

/// Queues a warm (`{"tenant_id": 1}` or `{"all": true}`) with an admin
/// token and waits for its job; returns the seconds it took.
pub(crate) async fn warm(
    client: &reqwest::Client,
    base: &str,
    admin: &str,
    body: serde_json::Value,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let job: serde_json::Value =
        client.post(format!("{base}/admin/cache/warm")).bearer_auth(admin).json(&body).send().await?.json().await?;
    let job_id = job["job_id"].as_str().context("job id")?.to_string();
    loop {
        let state: serde_json::Value =
            client.get(format!("{base}/admin/cache/warm/{job_id}")).bearer_auth(admin).send().await?.json().await?;
        if state["state"] == "done" {
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > Duration::from_secs(1800) {
            bail!("warm did not finish in 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) async fn wait_healthy(client: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    for _ in 0..200 {
        if client.get(format!("{base}/healthz")).send().await.is_ok_and(|r| r.status().is_success()) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the API did not come up")
}

async fn probe_cache(client: &reqwest::Client, d: &Deployment, body: &str, live: bool) -> anyhow::Result<String> {
    let mut req = client
        .post(format!("{}/crm/calls/get-grouped-by-status", d.base))
        .bearer_auth(if live { &d.admin } else { &d.token })
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_string());
    if live {
        req = req.header("cache-control", "no-cache");
    }
    let r = req.send().await?;
    Ok(r.headers().get("x-cache").and_then(|v| v.to_str().ok()).unwrap_or("").to_string())
}

/// Waits out the live queries wrk left queued: one more live request
/// queues behind them, so its answer means they are done.
async fn drain(client: &reqwest::Client, d: &Deployment) -> anyhow::Result<()> {
    let started = Instant::now();
    probe_cache(client, d, "include_calls=false", true).await?;
    if started.elapsed() > Duration::from_secs(2) {
        eprintln!("   (waited {:.1}s for queued live queries)", started.elapsed().as_secs_f64());
    }
    Ok(())
}

/// Every Redis node's URL (one, or each node of the cluster).
pub(crate) fn node_urls(redis: &callboard_testkit::TestRedis) -> Vec<String> {
    match redis {
        callboard_testkit::TestRedis::Single(s) => vec![s.url()],
        callboard_testkit::TestRedis::Cluster(c) => {
            c.ports().iter().map(|p| format!("redis://127.0.0.1:{p}")).collect()
        }
    }
}

/// `used_memory` summed over `nodes`.
pub(crate) async fn used_memory(nodes: &[String]) -> anyhow::Result<u64> {
    let mut total = 0;
    for url in nodes {
        let mut redis = redis::Client::open(url.as_str())?.get_multiplexed_async_connection().await?;
        let info: String = redis::cmd("INFO").arg("memory").query_async(&mut redis).await?;
        total += info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .context("used_memory in INFO")?;
    }
    Ok(total)
}

pub(crate) fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Projection lag: a writer inserts calls at a steady rate, each newer than
/// the last, into tenant 1's status 1; a reader polls the API (limit 1) and
/// notes when each write first shows as the status's top call. A write's
/// lag is from its insert's acknowledgement to that moment.
async fn lag_probe(
    client: &reqwest::Client,
    d: &Deployment,
    rates: &[u32],
    secs: u64,
) -> anyhow::Result<Vec<LagResult>> {
    let mongo = mongodb::Client::with_uri_str(d.services.mongo.uri()).await?.database("bench");
    let mut results = Vec::new();
    let mut next_id: i64 = 900_000_000;
    for &rate in rates {
        let calls = mongo.collection::<Document>("calls");
        let first_id = next_id + 1;
        let total = rate as u64 * secs;
        let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(i64, Instant)>::new()));
        let writer = {
            let acked = acked.clone();
            let base_ms = 1_900_000_000_000_i64 + next_id;
            tokio::spawn(async move {
                let started = Instant::now();
                let mut in_flight = futures::stream::FuturesUnordered::new();
                use futures::StreamExt;
                for i in 0..total as i64 {
                    let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
                    while Instant::now() < due {
                        tokio::select! {
                            _ = tokio::time::sleep_until(due.into()) => {}
                            Some(_) = in_flight.next(), if !in_flight.is_empty() => {}
                        }
                    }
                    let id = first_id + i;
                    let calls = calls.clone();
                    let acked = acked.clone();
                    in_flight.push(async move {
                        let doc = doc! {"id": id, "tenant_id": 1, "status_id": 1, "subject": "lag probe", "start_time": DateTime::from_millis(base_ms + i)};
                        if calls.insert_one(doc).await.is_ok() {
                            acked.lock().unwrap_or_else(|e| e.into_inner()).push((id, Instant::now()));
                        }
                    });
                    while in_flight.len() > 64 {
                        in_flight.next().await;
                    }
                }
                while in_flight.next().await.is_some() {}
                started.elapsed()
            })
        };
        next_id += total as i64;
        let last_id = next_id;
        let mut seen: Vec<(i64, Instant)> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(secs + 30);
        loop {
            let body: serde_json::Value = client
                .post(format!("{}/crm/calls/get-grouped-by-status", d.base))
                .bearer_auth(&d.token)
                .header("content-type", "application/x-www-form-urlencoded")
                .body("limit=1&include_enrichment=false")
                .send()
                .await?
                .json()
                .await?;
            let now = Instant::now();
            let top = body["data"]
                .as_array()
                .and_then(|g| g.iter().find(|g| g["id"] == 1))
                .and_then(|g| g["calls"][0].as_i64())
                .unwrap_or(0);
            if seen.last().is_none_or(|(id, _)| top > *id) && top >= first_id {
                seen.push((top, now));
            }
            if top >= last_id || now > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let elapsed = writer.await?;
        let acked = acked.lock().unwrap_or_else(|e| e.into_inner()).clone();
        // A write is visible at the first poll whose top id is >= its id.
        let mut lags: Vec<f64> = acked
            .iter()
            .filter_map(|(id, at)| {
                let shown = seen.iter().find(|(top, _)| top >= id)?.1;
                Some(shown.saturating_duration_since(*at).as_secs_f64() * 1000.0)
            })
            .collect();
        lags.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| lags.get(((lags.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN);
        results.push(LagResult {
            target_rate: rate,
            achieved_rate: acked.len() as f64 / elapsed.as_secs_f64(),
            samples: lags.len(),
            p50_ms: pct(0.5),
            p99_ms: pct(0.99),
        });
        eprintln!("   lag at {rate}/s: {:?}", results.last());
    }
    Ok(results)
}
