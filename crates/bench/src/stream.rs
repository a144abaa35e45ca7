//! `callboard-bench --stream`: what `GET /crm/calls/stream` costs and how
//! fast it is, on release `serve` and `project` processes over one Redis.
//!
//! - the time from a write's acknowledgement by MongoDB to the event that
//!   shows it, with 1 connection and with 1,000 (every connection must see
//!   it; the figure per write is the last connection's);
//! - the memory per idle connection (`serve`'s RSS with 1,000 open, less
//!   its RSS before);
//! - `serve`'s CPU with 1,000 idle connections (utime + stime from
//!   `/proc/<pid>/stat` over a quiet window: heartbeats and the version
//!   poll only).
//!
//! Writes a section of BENCHMARKS.md between two markers.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bson::{doc, DateTime, Document};
use callboard_testkit::Services;
use futures::StreamExt;

use crate::scale::Deployed;
use crate::{rss_kb, wait_healthy, Args};

const BEGIN: &str = "<!-- stream:begin -->";
const END: &str = "<!-- stream:end -->";
/// Writes measured per connection count; spaced wider than the stream's
/// rate gap (0.5 s at the default 2 events/s), so none is coalesced.
const WRITES: usize = 20;
const SPACING: Duration = Duration::from_millis(700);
const IDLE_WINDOW: Duration = Duration::from_secs(30);

/// When each connection saw each written call id, and how many board
/// events came in all.
#[derive(Clone, Default)]
struct Seen {
    at: Arc<Mutex<HashMap<i64, Vec<Instant>>>>,
    events: Arc<std::sync::atomic::AtomicUsize>,
}

/// Raises this process's open-file limit to its hard limit (children
/// inherit it): 1,000 connections need more than the usual 1,024 soft.
fn raise_fd_limit() -> anyhow::Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            bail!("getrlimit failed");
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            bail!("setrlimit failed");
        }
    }
    Ok(limit.rlim_cur)
}

/// `serve`'s CPU time so far (utime + stime), in seconds.
fn cpu_s(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // SAFETY: sysconf with a valid name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

/// Opens one stream and records, for every written id it shows first in
/// status 1, when it arrived. Returns once the first board came.
async fn open(client: &reqwest::Client, url: &str, token: &str, seen: Seen) -> anyhow::Result<()> {
    let response = client.get(url).query(&[("limit", "5"), ("access_token", token)]).send().await?;
    if response.status() != 200 {
        bail!("the stream answered {}", response.status());
    }
    let mut body = response.bytes_stream();
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut first = Some(first_tx);
        let mut buf: Vec<u8> = Vec::new();
        while let Some(Ok(chunk)) = body.next().await {
            buf.extend_from_slice(&chunk);
            while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                let frame: Vec<u8> = buf.drain(..end + 2).collect();
                let Some(data) = std::str::from_utf8(&frame)
                    .ok()
                    .and_then(|f| f.lines().find_map(|l| l.strip_prefix("data: ")).map(str::to_string))
                else {
                    continue;
                };
                if let Some(tx) = first.take() {
                    let _ = tx.send(());
                } else {
                    seen.events.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let Ok(board) = serde_json::from_str::<serde_json::Value>(&data) else { continue };
                let top = board["data"]
                    .as_array()
                    .and_then(|s| s.iter().find(|s| s["id"] == 1))
                    .and_then(|s| s["calls"][0]["id"].as_i64());
                if let Some(id) = top {
                    seen.at.lock().unwrap().entry(id).or_default().push(Instant::now());
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(30), first_rx).await??;
    Ok(())
}

/// Writes [`WRITES`] calls that each lead status 1, one every
/// [`SPACING`], and returns, per write, the time until `connections`
/// streams had shown it (the last one's), and the median connection's.
async fn latencies(
    calls: &mongodb::Collection<Document>,
    seen: &Seen,
    connections: usize,
    first_id: i64,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let (mut last, mut median) = (Vec::new(), Vec::new());
    // The first write waits out the rate gap after the connections' first
    // board.
    tokio::time::sleep(SPACING).await;
    for i in 0..WRITES as i64 {
        let id = first_id + i;
        calls
            .insert_one(doc! {"id": id, "tenant_id": 1, "status_id": 1, "subject": format!("stream probe {id}"),
            "start_time": DateTime::from_millis(2_000_000_000_000 + id)})
            .await?;
        let acked = Instant::now();
        let deadline = acked + Duration::from_secs(20);
        loop {
            let times = seen.at.lock().unwrap().get(&id).cloned().unwrap_or_default();
            if times.len() >= connections {
                let mut ms: Vec<f64> =
                    times.iter().map(|t| t.saturating_duration_since(acked).as_secs_f64() * 1e3).collect();
                ms.sort_by(f64::total_cmp);
                last.push(*ms.last().unwrap());
                median.push(ms[ms.len() / 2]);
                break;
            }
            if Instant::now() > deadline {
                bail!("write {id}: {} of {connections} streams showed it within 20 s", times.len());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Spread over the poll's phase: writes spaced exactly would land at
        // the same point of every poll interval.
        tokio::time::sleep(SPACING + Duration::from_millis((i as u64 * 37) % 100)).await;
    }
    Ok((last, median))
}

fn one_ms_of(v: &[f64], i: i64) -> Option<f64> {
    v.get(usize::try_from(i).ok()?).copied()
}

/// Polls the endpoint (limit 1) and records when each id first leads
/// status 1 as a hit.
async fn poll_endpoint(client: reqwest::Client, url: String, token: String, seen: Seen) {
    loop {
        let Ok(response) = client.post(&url).bearer_auth(&token).form(&[("limit", "1")]).send().await else { continue };
        let hit = response.headers().get("x-cache").is_some_and(|v| v == "hit");
        let Ok(board) = response.json::<serde_json::Value>().await else { continue };
        let top = board["data"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["id"] == 1))
            .and_then(|s| s["calls"][0]["id"].as_i64());
        if let (true, Some(id)) = (hit, top) {
            seen.at.lock().unwrap().entry(id).or_default().push(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

pub async fn run(args: &Args) -> anyhow::Result<()> {
    let fds = raise_fd_limit()?;
    eprintln!("== stream: 1 and 1,000 connections (open files allowed: {fds})");
    let mut d = Deployed::new(args, Services::start()?, &[])?;
    d.seed(1, 10_000)?;
    d.spawn("project", None)?;
    let serve = d.spawn("serve", None)?;
    let serve_pid = d.pid(serve);
    let base = d.base.clone();
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build()?;
    wait_healthy(&client, &base).await?;
    d.warm(&client, serde_json::json!({"tenant_id": 1})).await?;
    let token = d.token(1, false)?;
    let url = format!("{base}/crm/calls/stream");
    let db = mongodb::Client::with_uri_str(d.services.mongo.uri()).await?.database("bench");
    let calls = db.collection::<Document>("calls");

    // One connection, and beside it a reader polling the endpoint, which
    // tells the projector's part from the stream's.
    let seen = Seen::default();
    open(&client, &url, &token, seen.clone()).await?;
    let polled = Seen::default();
    let poller = tokio::spawn(poll_endpoint(
        client.clone(),
        format!("{base}/crm/calls/get-grouped-by-status"),
        token.clone(),
        polled.clone(),
    ));
    let (one, _) = latencies(&calls, &seen, 1, 9_000_000).await?;
    poller.abort();
    let stream_part_ms: Vec<f64> = (0..WRITES as i64)
        .filter_map(|i| {
            let stream_at = seen.at.lock().unwrap().get(&(9_000_000 + i))?.first().copied()?;
            let polled_at = polled.at.lock().unwrap().get(&(9_000_000 + i))?.first().copied()?;
            Some(stream_at.saturating_duration_since(polled_at).as_secs_f64() * 1e3)
        })
        .collect();
    eprintln!(
        "   the stream after the endpoint showed it: {:?} ms",
        stream_part_ms.iter().map(|v| *v as i64).collect::<Vec<_>>()
    );
    let endpoint_ms: Vec<f64> = (0..WRITES as i64)
        .filter_map(|i| {
            let stream_at = seen.at.lock().unwrap().get(&(9_000_000 + i))?.first().copied()?;
            let polled_at = polled.at.lock().unwrap().get(&(9_000_000 + i))?.first().copied()?;
            let stream_ms = one_ms_of(&one, i)?;
            Some(stream_ms - stream_at.saturating_duration_since(polled_at).as_secs_f64() * 1e3)
        })
        .collect();
    let one_events = seen.events.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "   1 connection: p50 {:.1} ms, p99 {:.1} ms; {one_events} events for {WRITES} writes; {:?}",
        pct(&one, 0.5),
        pct(&one, 0.99),
        one.iter().map(|v| *v as u64).collect::<Vec<_>>()
    );

    // 1,000 idle connections, on a quiet server.
    let rss_before = rss_kb(serve_pid);
    let seen = Seen::default();
    let opened = Instant::now();
    let conns = 1000;
    let mut handshakes =
        futures::stream::iter(0..conns).map(|_| open(&client, &url, &token, seen.clone())).buffer_unordered(50);
    while let Some(result) = handshakes.next().await {
        result?;
    }
    let open_s = opened.elapsed().as_secs_f64();
    // Let allocations settle before reading the RSS.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_kb(serve_pid);
    let per_conn_kb = (rss_after.saturating_sub(rss_before)) as f64 / conns as f64;
    eprintln!(
        "   {conns} connections open in {open_s:.1} s; RSS {rss_before} -> {rss_after} KiB ({per_conn_kb:.1} KiB each)"
    );
    let cpu_before = cpu_s(serve_pid)?;
    let idle_started = Instant::now();
    tokio::time::sleep(IDLE_WINDOW).await;
    let idle_cpu = (cpu_s(serve_pid)? - cpu_before) / idle_started.elapsed().as_secs_f64();
    eprintln!("   idle CPU with {conns} connections: {:.2}% of a core", idle_cpu * 100.0);
    let (last, median) = latencies(&calls, &seen, conns, 9_100_000).await?;
    let many_events = seen.events.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "   {conns} connections: last connection p50 {:.1} ms, p99 {:.1} ms; median connection p50 {:.1} ms",
        pct(&last, 0.5),
        pct(&last, 0.99),
        pct(&median, 0.5)
    );

    let mut md = String::new();
    writeln!(md, "## Board stream (`callboard-bench --stream`)\n")?;
    writeln!(md, "Release `serve` and `project` as separate processes, one Redis, 10K calls in tenant 1 (warm); streams with `limit=5`, `stream.max_events_per_s` 2, `stream.poll_ms` 100. A write is an insert that leads status 1; its latency runs from MongoDB's acknowledgement to the event that shows it. {WRITES} writes per row, {} ms apart (wider than the rate gap, so none is coalesced).\n", SPACING.as_millis())?;
    writeln!(md, "Events received: {one_events} for {WRITES} writes on the one connection; {many_events} for {WRITES} writes over {conns} connections ({:.2} a write a connection).\n", many_events as f64 / (WRITES * conns) as f64)?;
    writeln!(md, "| connections | write → event p50 | p99 | max |")?;
    writeln!(md, "|---:|---:|---:|---:|")?;
    writeln!(md, "| 1 | {:.1} ms | {:.1} ms | {:.1} ms |", pct(&one, 0.5), pct(&one, 0.99), pct(&one, 1.0))?;
    writeln!(
        md,
        "| (beside it: the endpoint polled every 2 ms shows it as a hit) | {:.1} ms | {:.1} ms | {:.1} ms |",
        pct(&endpoint_ms, 0.5),
        pct(&endpoint_ms, 0.99),
        pct(&endpoint_ms, 1.0)
    )?;
    writeln!(
        md,
        "| (the stream's own part: after the endpoint showed it) | {:.1} ms | {:.1} ms | {:.1} ms |",
        pct(&stream_part_ms, 0.5),
        pct(&stream_part_ms, 0.99),
        pct(&stream_part_ms, 1.0)
    )?;
    writeln!(
        md,
        "| {conns} (the last to see it) | {:.1} ms | {:.1} ms | {:.1} ms |",
        pct(&last, 0.5),
        pct(&last, 0.99),
        pct(&last, 1.0)
    )?;
    writeln!(
        md,
        "| {conns} (the median connection) | {:.1} ms | {:.1} ms | {:.1} ms |\n",
        pct(&median, 0.5),
        pct(&median, 0.99),
        pct(&median, 1.0)
    )?;
    writeln!(md, "| idle cost, {conns} connections | |")?;
    writeln!(md, "|---|---:|")?;
    writeln!(
        md,
        "| `serve` RSS before → after opening them | {:.1} → {:.1} MiB |",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0
    )?;
    writeln!(md, "| memory per idle connection | {per_conn_kb:.1} KiB |")?;
    writeln!(
        md,
        "| `serve` CPU, {} s idle (heartbeats, the version poll) | {:.2}% of one core |",
        IDLE_WINDOW.as_secs(),
        idle_cpu * 100.0
    )?;
    writeln!(md, "| time to open them (50 at a time, each until its first board) | {open_s:.1} s |")?;
    writeln!(md, "\nThe client (this bench, 1,000 readers parsing every event) runs on the same 2 cores as `serve`, `project`, Redis and the stand-in: the 1,000-connection latency includes reading 1,000 copies of each event here. On one connection, the part before the endpoint shows the write is the projector's (its outliers too: writes that sat in the stand-in's change stream); the stream's own part is the version poll (up to `stream.poll_ms`) and one render.")?;
    write_section(&args.out, &md)?;
    Ok(())
}

fn write_section(out: &Path, md: &str) -> anyhow::Result<()> {
    let mut text = std::fs::read_to_string(out).unwrap_or_default();
    let block = format!("{BEGIN}\n{}\n{END}", md.trim_end());
    text = match (text.find(BEGIN), text.find(END)) {
        (Some(a), Some(b)) if a < b => format!("{}{block}{}", &text[..a], &text[b + END.len()..]),
        _ => format!("{}\n\n{block}\n", text.trim_end()),
    };
    std::fs::write(out, text)?;
    Ok(())
}
