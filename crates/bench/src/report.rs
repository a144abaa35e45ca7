//! BENCHMARKS.md and its chart, from one run's figures.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

#[derive(Debug, Clone)]
pub struct Load {
    pub kind: String,
    pub live: bool,
    pub conns: u32,
    pub requests: u64,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub errors: u64,
}

#[derive(Debug, Clone)]
pub struct LagResult {
    pub target_rate: u32,
    pub achieved_rate: f64,
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Clone)]
pub struct ScenarioResult {
    pub name: String,
    pub seed_s: f64,
    pub warm_s: f64,
    pub tenant_calls: u64,
    pub redis_bytes_per_call: u64,
    pub rss_serve_kb: u64,
    pub rss_project_kb: u64,
    /// The share of warm reads during the hit loads that reused a kept
    /// answer, and the share of those reuses that took no round trip
    /// (`None`: no response cache, or no lookups).
    pub answer_reuse: Option<(f64, f64)>,
    /// What Redis held right after the warm, by key type.
    pub key_costs: Vec<crate::memory::KeyCost>,
    pub loads: Vec<Load>,
}

impl ScenarioResult {
    fn load(&self, kind: &str, live: bool, conns: u32) -> Option<&Load> {
        self.loads.iter().find(|l| l.kind == kind && l.live == live && l.conns == conns)
    }

    /// The floor at `conns`: the mean of its readings before and after the
    /// hits (req/s and p99 averaged), and how far apart the two were.
    fn floor(&self, conns: u32) -> Option<(Load, f64)> {
        let readings: Vec<&Load> =
            self.loads.iter().filter(|l| l.kind == crate::wrk::FLOOR && l.conns == conns).collect();
        let first = (*readings.first()?).clone();
        let n = readings.len() as f64;
        let rps = readings.iter().map(|l| l.rps).sum::<f64>() / n;
        let p99 = readings.iter().map(|l| l.p99_us).sum::<f64>() / n;
        let spread = readings.iter().map(|l| l.rps).fold(0.0_f64, f64::max)
            / readings.iter().map(|l| l.rps).fold(f64::INFINITY, f64::min)
            - 1.0;
        Some((Load { rps, p99_us: p99, ..first }, spread))
    }
}

pub struct Report {
    pub quick: bool,
    pub scenarios: Vec<ScenarioResult>,
    pub lag: Vec<LagResult>,
    pub pipeline: Vec<crate::pipeline::PipelineResult>,
}

fn cmd(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn us(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1} ms", v / 1000.0)
    } else {
        format!("{v:.0} µs")
    }
}

impl Report {
    pub fn new(quick: bool) -> Self {
        Self { quick, scenarios: Vec::new(), lag: Vec::new(), pipeline: Vec::new() }
    }

    pub fn write(&self, out: &Path) -> anyhow::Result<()> {
        let mut md = String::new();
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
                })
            })
            .unwrap_or_else(|| "unknown".into());
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
        let chart = out.with_file_name("docs/benchmarks.svg");
        writeln!(md, "# callboard benchmarks\n")?;
        writeln!(
            md,
            "Written by `{}` (crates/bench); every figure below comes from one run on one machine.\n",
            if self.quick { "make bench-quick" } else { "make bench" }
        )?;
        writeln!(md, "- machine: {cores} cores, {cpu}; wrk and the servers share it")?;
        writeln!(
            md,
            "- {}; {}; {}",
            cmd("rustc", &["--version"]),
            cmd("redis-server", &["--version"]),
            cmd("wrk", &["--version"])
        )?;
        writeln!(
            md,
            "- MongoDB: the stand-in nx-27017 0.8.1 (Python on SQLite, through ../shared/standin/nx_standin.py)\n"
        )?;
        writeln!(md, "**Read the live figures as an upper bound on the old system's cost, not a measurement of it.** The stand-in is far slower than a real mongod: it runs aggregations in Python at about 0.35 s per 10K documents, with one lock per database. So every hit/live ratio here flatters the cache. Against a real replica set, the spec reports 150 ms at 10K calls and 5 s at 1M.\n")?;
        writeln!(md, "The scenarios run `serve` and `project` as separate release processes with `CALLBOARD_LOG=warn` and the projectors' background check off (`CALLBOARD_RECONCILE_INTERVAL_S=0`): each check is one live query, which on the stand-in would load the two cores the hits are measured on for seconds (100K calls) to most of a minute (1M).\n")?;

        writeln!(md, "## Hits against the floor\n")?;
        writeln!(md, "The floor is `GET /healthz` on the same `serve` process, with the same wrk settings, in the same run (measured before and after the hits; their mean, and how far apart the two readings were). Every hit as a fraction of the floor's req/s at 64 connections, and its p99 at 1 connection as a multiple of the floor's.\n")?;
        writeln!(md, "| dataset | request | req/s @64 | of floor | p99 @1 | x floor p99 |")?;
        writeln!(md, "|---|---|---:|---:|---:|---:|")?;
        for s in &self.scenarios {
            let (Some((f64_, spread)), Some((f1, _))) = (s.floor(64), s.floor(1)) else { continue };
            writeln!(
                md,
                "| {} | **floor** (`GET /healthz`; readings {:.0}% apart) | {:.0} | 1.00 | {} | 1.0 |",
                s.name,
                spread * 100.0,
                f64_.rps,
                us(f1.p99_us)
            )?;
            for (kind, _) in crate::KINDS {
                if let (Some(h64), Some(h1)) = (s.load(kind, false, 64), s.load(kind, false, 1)) {
                    writeln!(
                        md,
                        "| {} | {kind} | {:.0} | {:.2} | {} | {:.1} |",
                        s.name,
                        h64.rps,
                        h64.rps / f64_.rps.max(1.0),
                        us(h1.p99_us),
                        h1.p99_us / f1.p99_us.max(1.0)
                    )?;
                }
            }
        }
        writeln!(md)?;
        for s in &self.scenarios {
            match s.answer_reuse {
                Some((share, tracked)) => writeln!(
                    md,
                    "- {}: {:.2}% of the hits above reused an answer kept by the process (`callboard_response_cache_lookups_total`; `query.response_cache_mb`), {:.2}% of those with no round trip (`callboard_response_cache_reuses_total{{check=\"tracking\"}}`; `query.response_cache_track_ms`).",
                    s.name,
                    share * 100.0,
                    tracked * 100.0
                )?,
                None => writeln!(md, "- {}: no answer was reused (the response cache is off).", s.name)?,
            }
        }
        writeln!(md)?;

        if !self.pipeline.is_empty() {
            writeln!(md, "## Projector throughput, no MongoDB\n")?;
            writeln!(md, "Synthetic change events (the seed's documents) through the projector's transform and Redis apply, {} events a batch (`projector.batch_max`), one process against one Redis; the warm row is the projector's own snapshot load (`warm::Load`, chunks of 1,000 calls) from documents in memory, so neither counts MongoDB's time. It times the transform and the apply only: no lease or fence check, no checkpoint, watermark or durability-marker write, and no document-window refills after events, which read MongoDB (the last column counts the distinct statuses an apply left short; the kinds run one after another on the same calls, so later kinds meet windows that deletes and moves have shortened). The warm's final refill is run, from the same documents.\n", crate::pipeline::BATCH)?;
            writeln!(md, "`Redis busy`: the server's CPU time (`INFO cpu`) over the kind's time; the rest is the bench's own work (decoding, planning, building the scripts) and the loopback, which the one connection does not overlap with Redis's.\n")?;
            writeln!(md, "| what | events | s | events/s | Redis busy | windows left short |")?;
            writeln!(md, "|---|---:|---:|---:|---:|---:|")?;
            for p in &self.pipeline {
                writeln!(
                    md,
                    "| {} | {} | {:.2} | {:.0} | {:.0}% | {} |",
                    p.kind,
                    p.events,
                    p.secs,
                    p.rate(),
                    100.0 * p.redis_share(),
                    p.refills
                )?;
            }
            writeln!(md)?;
        }

        writeln!(md, "## Read throughput and latency\n")?;
        writeln!(md, "`hit`: served from Redis. `live`: the live aggregation, forced with an admin token and `Cache-Control: no-cache`. Requests are POSTed as forms; tenant 1 is warm.\n")?;
        for s in &self.scenarios {
            writeln!(md, "### {}\n", s.name)?;
            writeln!(md, "| request | path | req/s @64 | p50 @64 | p99 @64 | p99.9 @64 | req/s @1 | p50 @1 | p99 @1 | p99.9 @1 | hit/live req/s |")?;
            writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
            for (kind, _) in crate::KINDS {
                for live in [false, true] {
                    let c64 = s.load(kind, live, 64);
                    let c1 = s.load(kind, live, 1);
                    let cell = |l: Option<&Load>, f: &dyn Fn(&Load) -> String| l.map(f).unwrap_or_else(|| "n/a".into());
                    let ratio = if live {
                        "".to_string()
                    } else {
                        // The stand-in serves live queries one at a time, so
                        // its best throughput at any concurrency is the fair
                        // comparison.
                        let best_live = [s.load(kind, true, 64), s.load(kind, true, 1)]
                            .into_iter()
                            .flatten()
                            .map(|l| l.rps)
                            .fold(0.0_f64, f64::max);
                        match c64 {
                            Some(h) if best_live > 0.0 => format!("{:.0}x", h.rps / best_live),
                            _ => "n/a".into(),
                        }
                    };
                    writeln!(
                        md,
                        "| {kind} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {ratio} |",
                        if live { "live" } else { "hit" },
                        cell(c64, &|l| format!("{:.0}", l.rps)),
                        cell(c64, &|l| us(l.p50_us)),
                        cell(c64, &|l| us(l.p99_us)),
                        cell(c64, &|l| us(l.p999_us)),
                        cell(c1, &|l| format!("{:.0}", l.rps)),
                        cell(c1, &|l| us(l.p50_us)),
                        cell(c1, &|l| us(l.p99_us)),
                        cell(c1, &|l| us(l.p999_us)),
                    )?;
                }
            }
            let errors: u64 = s.loads.iter().map(|l| l.errors).sum();
            let few: Vec<String> = s
                .loads
                .iter()
                .filter(|l| l.live && l.requests < 20)
                .map(|l| format!("{} @{}: {} requests", l.kind, l.conns, l.requests))
                .collect();
            writeln!(
                md,
                "\nErrors across all runs: {errors}. Live runs with few samples (their percentiles are rough): {}.\n",
                if few.is_empty() { "none".into() } else { few.join("; ") }
            )?;
        }

        writeln!(md, "## Warm, seed and memory\n")?;
        writeln!(md, "| dataset | `callboard seed` | warm of tenant 1 | calls in tenant 1 | Redis bytes/call | RSS serve | RSS project |")?;
        writeln!(md, "|---|---:|---:|---:|---:|---:|---:|")?;
        for s in &self.scenarios {
            writeln!(
                md,
                "| {} | {:.1} s | {:.1} s | {} | {} | {:.1} MiB | {:.1} MiB |",
                s.name,
                s.seed_s,
                s.warm_s,
                s.tenant_calls,
                s.redis_bytes_per_call,
                s.rss_serve_kb as f64 / 1024.0,
                s.rss_project_kb as f64 / 1024.0
            )?;
        }
        writeln!(md, "\nRedis bytes/call: `INFO memory` `used_memory` after the warm minus before, divided by the tenant's calls. RSS after the load runs.\n")?;
        self.key_cost_table(&mut md)?;

        if !self.lag.is_empty() {
            writeln!(md, "## Projection lag\n")?;
            writeln!(md, "A write acknowledged by MongoDB until the API (limit 1, polled in a loop) shows it: inserts into tenant 1 at a steady rate, on the 10K dataset.\n")?;
            writeln!(md, "| target writes/s | achieved writes/s | samples | p50 | p99 |")?;
            writeln!(md, "|---:|---:|---:|---:|---:|")?;
            for l in &self.lag {
                writeln!(
                    md,
                    "| {} | {:.0} | {} | {:.1} ms | {:.1} ms |",
                    l.target_rate, l.achieved_rate, l.samples, l.p50_ms, l.p99_ms
                )?;
            }
            writeln!(md, "\nThe achieved rate is what the stand-in accepted; it caps the probe.\n")?;
        }

        writeln!(md, "## Chart\n\n![throughput and p99, hit vs live](docs/benchmarks.svg)\n")?;
        writeln!(md, "## Micro-benchmarks\n\n`cargo bench -p callboard-bench` (criterion, run by `make bench` before the loads): rendering a cached 5x20 and 5x100 response, rendering live calls, planning one change event, parsing a request. Mean time per iteration from `target/criterion/`:\n")?;
        let micro = criterion_estimates(Path::new("target/criterion"));
        if micro.is_empty() {
            writeln!(md, "(no criterion results found: run `cargo bench -p callboard-bench` first)")?;
        } else {
            writeln!(md, "| benchmark | mean |\n|---|---:|")?;
            for (id, ns) in micro {
                writeln!(
                    md,
                    "| {id} | {} |",
                    if ns >= 1000.0 { format!("{:.1} µs", ns / 1000.0) } else { format!("{ns:.0} ns") }
                )?;
            }
        }
        std::fs::create_dir_all(chart.parent().unwrap_or(Path::new(".")))?;
        std::fs::write(&chart, self.svg())?;
        // The scale-out and stream sections (`--scale`, `--stream`) are
        // other runs', and the
        // figures measured by hand or by tests are other sessions': kept.
        let existing = std::fs::read_to_string(out).unwrap_or_default();
        for part in ["scale", "stream", "by-hand"] {
            let (begin, end) = (format!("<!-- {part}:begin -->"), format!("<!-- {part}:end -->"));
            if let (Some(a), Some(b)) = (existing.find(&begin), existing.find(&end)) {
                if a < b {
                    md.push_str(&format!("\n{}\n", &existing[a..b + end.len()]));
                }
            }
        }
        std::fs::write(out, md)?;
        Ok(())
    }

    /// Redis's bytes by key type over tenant 1's calls, per dataset.
    fn key_cost_table(&self, md: &mut String) -> anyhow::Result<()> {
        let scenarios: Vec<&ScenarioResult> = self.scenarios.iter().filter(|s| !s.key_costs.is_empty()).collect();
        if scenarios.is_empty() {
            return Ok(());
        }
        // Rows in the order of the last dataset's weights, then the others' kinds.
        let mut kinds: Vec<Option<callboard_readmodel::keys::KeyKind>> = Vec::new();
        for s in scenarios.iter().rev() {
            for c in &s.key_costs {
                if !kinds.contains(&c.kind) {
                    kinds.push(c.kind);
                }
            }
        }
        writeln!(md, "### What each key type costs\n")?;
        writeln!(md, "Every key in Redis right after tenant 1's warm, weighed with `MEMORY USAGE <key> SAMPLES 0` (every element counted), by its row in the key schema (docs/ARCHITECTURE.md), over tenant 1's calls; and the keys of each type. Only tenant 1 is warm, but the shared keys (users, global statuses, the projectors' own) and every tenant's statuses count too: next to 1M calls they weigh nothing, next to the 947 calls of one tenant among 1,000 they show.\n")?;
        let head: Vec<&str> = scenarios.iter().map(|s| s.name.as_str()).collect();
        writeln!(md, "| key type | {} |", head.join(" | "))?;
        writeln!(md, "|---|{}", "---:|".repeat(scenarios.len()))?;
        let per_call = |s: &ScenarioResult, bytes: u64| bytes as f64 / s.tenant_calls.max(1) as f64;
        for kind in &kinds {
            let cells: Vec<String> = scenarios
                .iter()
                .map(|s| match s.key_costs.iter().find(|c| c.kind == *kind) {
                    Some(c) => format!("{:.1} B ({} keys)", per_call(s, c.bytes), c.keys),
                    None => "-".into(),
                })
                .collect();
            let label = kinds_label(*kind);
            writeln!(md, "| {label} | {} |", cells.join(" | "))?;
        }
        let sums: Vec<String> = scenarios
            .iter()
            .map(|s| format!("{:.1} B", per_call(s, s.key_costs.iter().map(|c| c.bytes).sum())))
            .collect();
        writeln!(md, "| **all keys** | {} |", sums.join(" | "))?;
        let used: Vec<String> = scenarios.iter().map(|s| format!("{} B", s.redis_bytes_per_call)).collect();
        writeln!(md, "| `used_memory` after the warm minus before | {} |", used.join(" | "))?;
        writeln!(md, "\n`MEMORY USAGE` counts a key's name, its keyspace entry and its value; `used_memory` also counts the keyspace's bucket arrays, its growth (a rehash doubles them) and the allocator's slack, and it is a difference over the warm, so it leaves out the keys there before it (the users, the statuses).\n")?;
        Ok(())
    }

    /// Two panels, log scale: req/s @64 and p99 @1 for "limit 20 enriched",
    /// hit vs live, by dataset.
    fn svg(&self) -> String {
        let kind = "limit 20 enriched";
        let (w, h, pad) = (900.0, 360.0, 60.0);
        let mut s = format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
        );
        s.push_str(r#"<rect width="100%" height="100%" fill="white"/>"#);
        let panels = [("req/s at 64 connections (log)", true), ("p99 latency at 1 connection, µs (log)", false)];
        for (p, (title, rps)) in panels.iter().enumerate() {
            let x0 = pad + p as f64 * (w / 2.0);
            let pw = w / 2.0 - pad - 20.0;
            let ph = h - 2.0 * pad;
            let _ = write!(s, r#"<text x="{}" y="30" font-weight="bold">{title}: {kind}</text>"#, x0);
            let _ = write!(s, r#"<line x1="{x0}" y1="{}" x2="{}" y2="{}" stroke="black"/>"#, h - pad, x0 + pw, h - pad);
            let n = self.scenarios.len().max(1) as f64;
            let bw = pw / n / 2.5;
            for (i, sc) in self.scenarios.iter().enumerate() {
                for (j, live) in [false, true].iter().enumerate() {
                    let load = if *rps {
                        sc.load(kind, *live, 64).or(sc.load(kind, *live, 1))
                    } else {
                        sc.load(kind, *live, 1)
                    };
                    // No completed request (a live query slower than the run): no bar.
                    let Some(l) = load.filter(|l| l.requests > 0) else { continue };
                    let v = if *rps { l.rps } else { l.p99_us }.max(1.0);
                    let bar = (v.log10() / 7.0).min(1.0) * ph;
                    let x = x0 + i as f64 * (pw / n) + j as f64 * (bw + 4.0) + 8.0;
                    let color = if *live { "#d62728" } else { "#1f77b4" };
                    let _ = write!(
                        s,
                        r#"<rect x="{x:.1}" y="{:.1}" width="{bw:.1}" height="{bar:.1}" fill="{color}"/>"#,
                        h - pad - bar
                    );
                    let _ =
                        write!(s, r#"<text x="{x:.1}" y="{:.1}" font-size="10">{:.0}</text>"#, h - pad - bar - 3.0, v);
                }
                let _ = write!(
                    s,
                    r#"<text x="{:.1}" y="{}" font-size="10">{}</text>"#,
                    x0 + i as f64 * (pw / n) + 4.0,
                    h - pad + 16.0,
                    sc.name.replace(" calls", "")
                );
            }
        }
        let _ = write!(
            s,
            r##"<rect x="{}" y="{}" width="10" height="10" fill="#1f77b4"/><text x="{}" y="{}">hit (Redis)</text>"##,
            pad,
            h - 20.0,
            pad + 14.0,
            h - 11.0
        );
        let _ = write!(
            s,
            r##"<rect x="{}" y="{}" width="10" height="10" fill="#d62728"/><text x="{}" y="{}">live (stand-in)</text>"##,
            pad + 110.0,
            h - 20.0,
            pad + 124.0,
            h - 11.0
        );
        s.push_str("</svg>\n");
        s
    }
}

/// (benchmark id, mean ns) of every criterion benchmark under `root`.
fn criterion_estimates(root: &Path) -> Vec<(String, f64)> {
    fn walk(dir: &Path, out: &mut Vec<(String, f64)>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.is_dir() {
                continue;
            }
            if path.file_name().is_some_and(|n| n == "new") {
                let read = |f: &str| -> Option<serde_json::Value> {
                    serde_json::from_str(&std::fs::read_to_string(path.join(f)).ok()?).ok()
                };
                if let (Some(b), Some(e)) = (read("benchmark.json"), read("estimates.json")) {
                    if let (Some(id), Some(ns)) = (b["full_id"].as_str(), e["mean"]["point_estimate"].as_f64()) {
                        out.push((id.to_string(), ns));
                    }
                }
            } else if path.file_name().is_some_and(|n| n != "report" && n != "base" && n != "change") {
                walk(&path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, &mut out);
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn kinds_label(kind: Option<callboard_readmodel::keys::KeyKind>) -> String {
    match kind {
        Some(k) => format!("`{}`", k.pattern()),
        None => "other (outside the schema)".into(),
    }
}
