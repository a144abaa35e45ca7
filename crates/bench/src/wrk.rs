//! Load with `wrk` (Debian's), driven by a generated Lua script that POSTs
//! a form and reports the latency percentiles wrk itself measured.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};

use crate::report::Load;

/// What every script reports: wrk's own counts and latency percentiles.
const DONE: &str = r#"done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("CB_RESULT %d %d %d %d %d %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"#;

#[allow(clippy::too_many_arguments)]
pub async fn run(
    dir: &Path,
    base: &str,
    token: &str,
    body: &str,
    live: bool,
    conns: u32,
    secs: u64,
    kind: &str,
) -> anyhow::Result<Load> {
    let script = dir.join(format!("wrk-{}-{}.lua", conns, if live { "live" } else { "hit" }));
    let cache_control = if live { "wrk.headers[\"Cache-Control\"] = \"no-cache\"\n" } else { "" };
    std::fs::write(
        &script,
        format!(
            r#"wrk.method = "POST"
wrk.body = "{body}"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Authorization"] = "Bearer {token}"
{cache_control}
{DONE}"#
        ),
    )?;
    let url = format!("{base}/crm/calls/get-grouped-by-status");
    exec(&script, &url, live, conns, secs, kind).await
}

/// The floor: `GET /healthz` on the same process with the same wrk
/// settings: what this machine serves when a request does no work.
pub async fn floor(dir: &Path, base: &str, conns: u32, secs: u64) -> anyhow::Result<Load> {
    let script = dir.join(format!("wrk-{conns}-floor.lua"));
    std::fs::write(&script, format!("wrk.method = \"GET\"\n{DONE}"))?;
    exec(&script, &format!("{base}/healthz"), false, conns, secs, FLOOR).await
}

/// The floor's kind in the report.
pub const FLOOR: &str = "GET /healthz (floor)";

async fn exec(script: &Path, url: &str, live: bool, conns: u32, secs: u64, kind: &str) -> anyhow::Result<Load> {
    let url = url.to_string();
    let threads = conns.min(2);
    let out = tokio::task::spawn_blocking({
        let script = script.to_path_buf();
        move || {
            Command::new("wrk")
                .args([
                    "-t",
                    &threads.to_string(),
                    "-c",
                    &conns.to_string(),
                    "-d",
                    &format!("{secs}s"),
                    "--timeout",
                    "120s",
                    "-s",
                ])
                .arg(&script)
                .arg(&url)
                .output()
        }
    })
    .await?
    .context("run wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line =
        text.lines().find(|l| l.starts_with("CB_RESULT")).with_context(|| format!("no result from wrk: {text}"))?;
    let n: Vec<f64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    if n.len() != 6 {
        bail!("unexpected wrk result: {line}");
    }
    let load = Load {
        kind: kind.to_string(),
        live,
        conns,
        requests: n[0] as u64,
        rps: n[0] / (n[1] / 1e6),
        p50_us: n[2],
        p99_us: n[3],
        p999_us: n[4],
        errors: n[5] as u64,
    };
    eprintln!(
        "   {:<20} {:<4} c={:<2} {:>9.0} req/s  p50 {:>8.0}us  p99 {:>8.0}us  ({} requests, {} errors)",
        kind,
        if live { "live" } else { "hit" },
        conns,
        load.rps,
        load.p50_us,
        load.p99_us,
        load.requests,
        load.errors
    );
    Ok(load)
}
