//! `callboard-bench --scale`: the scale-out figures, each measured in one
//! run. Hits on one Redis against the same hits on a three-master Redis
//! Cluster; what each master holds with every tenant of a many-tenant
//! dataset warm; and the projection rate (events applied per second) with
//! 1, 2 and 4 `callboard project` processes sharing four partitions.
//! Writes a section of BENCHMARKS.md between two markers.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bson::{doc, DateTime, Document};
use callboard_testkit::{free_port, Guarded, Services, TestRedis};
use futures::StreamExt;

use crate::memory::{key_costs, KeyCost};
use crate::report::Load;
use crate::{node_urls, used_memory, wait_healthy, wrk, Args, KINDS, SECRET};

const BEGIN: &str = "<!-- scale:begin -->";
/// What the projection-rate rows mean, written under them.
const RATE_BOUNDS: &str = "What bounds it: the stand-in. Every partition reads the whole change stream and applies its share, so four partitions make the stand-in (one Python process) serve every event four times, each with its `updateLookup` document, however many processes lead them; more processes spread the applying, not the reading, and on this 2-core machine they share the cores with the stand-in, Redis and the API. A bench without the stand-in (issue 12) measures the projector itself. Each round's updates change every document they touch (an update that changes nothing makes no change event, which is what made earlier multi-process rounds look 35-60 times faster: they measured the 40 sentinels alone), and the round fails unless `events_applied` grew by every event written.";
const END: &str = "<!-- scale:end -->";

/// A deployment of release processes on `services`.
pub(crate) struct Deployed {
    pub(crate) services: Services,
    env: Vec<(String, String)>,
    pub(crate) base: String,
    procs: Vec<Guarded>,
    bin: std::path::PathBuf,
}

impl Deployed {
    pub(crate) fn new(args: &Args, services: Services, extra: &[(&str, &str)]) -> anyhow::Result<Self> {
        let port = free_port()?;
        let (var, value) = services.redis.setting();
        let mut env: Vec<(String, String)> = vec![
            ("CALLBOARD_MONGODB_URI".into(), services.mongo.uri()),
            ("CALLBOARD_MONGODB_DB".into(), "bench".into()),
            (var.into(), value),
            ("CALLBOARD_JWT_SECRET".into(), SECRET.into()),
            ("CALLBOARD_HTTP_ADDR".into(), format!("127.0.0.1:{port}")),
            ("CALLBOARD_LOG".into(), "warn".into()),
        ];
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Ok(Self { services, env, base: format!("http://127.0.0.1:{port}"), procs: Vec::new(), bin: args.bin.clone() })
    }

    pub(crate) fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.bin).args(args).envs(self.env.iter().map(|(k, v)| (k, v))).output()?;
        if !out.status.success() {
            bail!("callboard {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    }

    pub(crate) fn spawn(&mut self, cmd: &str, config: Option<&Path>) -> anyhow::Result<usize> {
        let mut c = Command::new(&self.bin);
        if let Some(config) = config {
            c.arg("--config").arg(config);
        }
        c.arg(cmd).envs(self.env.iter().map(|(k, v)| (k, v)));
        let log = self.services.dir.path().join(format!("{cmd}-{}.log", self.procs.len()));
        self.procs.push(Guarded::spawn(c, "callboard", &log)?);
        Ok(self.procs.len() - 1)
    }

    /// The pid of the process [`Deployed::spawn`] numbered `i`.
    pub(crate) fn pid(&self, i: usize) -> u32 {
        self.procs[i].pid()
    }

    pub(crate) fn seed(&self, tenants: u32, calls: u64) -> anyhow::Result<f64> {
        let started = Instant::now();
        let (tenants, calls) = (tenants.to_string(), calls.to_string());
        self.run(&["seed", "--tenants", &tenants, "--calls", &calls, "--users", "100", "--statuses", "5", "--drop"])?;
        self.run(&["create-indexes"])?;
        Ok(started.elapsed().as_secs_f64())
    }

    pub(crate) fn token(&self, tenant: u32, admin: bool) -> anyhow::Result<String> {
        let t = tenant.to_string();
        let mut args = vec!["token", "--tenant", &t, "--ttl", "2h"];
        if admin {
            args.push("--admin");
        }
        self.run(&args)
    }

    /// Queues a warm (`{"tenant_id": 1}` or `{"all": true}`) and waits for
    /// its job; returns the seconds it took.
    pub(crate) async fn warm(&self, client: &reqwest::Client, body: serde_json::Value) -> anyhow::Result<f64> {
        crate::warm(client, &self.base, &self.token(1, true)?, body).await
    }
}

impl Drop for Deployed {
    fn drop(&mut self) {
        for p in &mut self.procs {
            p.resume();
            p.kill();
        }
    }
}

fn services(cluster: bool) -> anyhow::Result<Services> {
    Ok(if cluster { Services::start_cluster(3, 0)? } else { Services::start()? })
}

/// Hits on one topology: 100K calls in one tenant, each kind at 64 and 1
/// connections.
async fn hits(args: &Args, cluster: bool, secs: u64) -> anyhow::Result<Vec<Load>> {
    let mut d = Deployed::new(args, services(cluster)?, &[])?;
    d.seed(1, 100_000)?;
    d.spawn("project", None)?;
    d.spawn("serve", None)?;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(600)).build()?;
    wait_healthy(&client, &d.base).await?;
    let warm_s = d.warm(&client, serde_json::json!({"tenant_id": 1})).await?;
    eprintln!("   {} warm in {warm_s:.1}s", if cluster { "cluster" } else { "single" });
    let token = d.token(1, false)?;
    let dir = d.services.dir.path().to_path_buf();
    let mut loads = Vec::new();
    for (kind, body) in KINDS {
        for conns in [64, 1] {
            loads.push(wrk::run(&dir, &d.base, &token, body, false, conns, secs, kind).await?);
        }
    }
    Ok(loads)
}

/// Per master: (port, used_memory bytes, keys), with every tenant of
/// `calls` calls over `tenants` tenants warm.
#[allow(clippy::type_complexity)]
async fn memory_per_master(
    args: &Args,
    tenants: u32,
    calls: u64,
) -> anyhow::Result<(f64, f64, Vec<(u16, u64, u64)>, Vec<KeyCost>)> {
    let mut d = Deployed::new(args, services(true)?, &[])?;
    let seed_s = d.seed(tenants, calls)?;
    eprintln!("   seeded {calls} calls over {tenants} tenants in {seed_s:.0}s");
    let before: Vec<u64> = futures::future::try_join_all(
        node_urls(&d.services.redis).iter().map(|u| async move { used_memory(std::slice::from_ref(u)).await }),
    )
    .await?;
    d.spawn("project", None)?;
    d.spawn("serve", None)?;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(600)).build()?;
    wait_healthy(&client, &d.base).await?;
    let warm_s = d.warm(&client, serde_json::json!({"all": true})).await?;
    eprintln!("   every tenant warm in {warm_s:.0}s");
    let TestRedis::Cluster(c) = &d.services.redis else { bail!("a cluster") };
    let mut out = Vec::new();
    for (port, before) in c.ports().into_iter().zip(before) {
        let url = format!("redis://127.0.0.1:{port}");
        let used = used_memory(std::slice::from_ref(&url)).await?;
        let keys: u64 = c.cli(port, &["dbsize"])?.trim().parse().unwrap_or(0);
        out.push((port, used.saturating_sub(before), keys));
    }
    let costs = key_costs(&node_urls(&d.services.redis), &callboard_readmodel::Keys::new("cb")).await?;
    Ok((seed_s, warm_s, out, costs))
}

/// Events applied per second by `processes` processes over four
/// partitions: the processes are frozen (SIGSTOP), `events` call updates
/// and one sentinel call per tenant are written, the processes resume, and
/// the clock runs until every tenant's sentinel is served from the cache.
async fn projection_rate(d: &mut Deployed, round: i64, processes: usize, events: usize) -> anyhow::Result<f64> {
    let config = d.services.dir.path().join("rate.toml");
    // A lease that outlives the freeze: the processes keep their
    // partitions, so what is measured is catching up.
    // No background verification: its live queries would compete.
    std::fs::write(&config, "[projector]\nlease_ttl_ms = 120000\npartitions = 4\n\n[reconcile]\ninterval_s = 0\n")?;
    // Stopped cleanly, so that their leases are free for the next ones.
    for p in &mut d.procs {
        p.resume();
        p.terminate();
    }
    d.procs.clear();
    d.spawn("serve", Some(&config))?;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(600)).build()?;
    wait_healthy(&client, &d.base).await?;
    let mut projectors = Vec::new();
    for _ in 0..processes {
        projectors.push(d.spawn("project", Some(&config))?);
    }
    // Every partition led, by as many processes as there are (up to 4).
    let redis = match d.services.redis.setting() {
        ("CALLBOARD_REDIS_URL", url) => callboard_readmodel::Redis::single_url(&url, 2)?,
        (_, seeds) => {
            callboard_readmodel::Redis::cluster(&seeds.split(',').map(str::to_string).collect::<Vec<_>>()).await?
        }
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut c = redis.get().await?;
        let mut owners = std::collections::BTreeSet::new();
        for p in 0..4 {
            let owner: Option<String> = redis::AsyncCommands::get(&mut c, format!("cb:{{g}}:lease:{p}")).await?;
            owners.insert(owner.unwrap_or_default());
        }
        if !owners.contains("") && owners.len() == processes.min(4) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the partitions were not shared out: {owners:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let tenants: Vec<u32> = (1..=40).collect();
    let tokens = tenants.iter().map(|t| d.token(*t, false)).collect::<anyhow::Result<Vec<_>>>()?;
    // Every tenant warm and caught up before the freeze.
    d.warm(&client, serde_json::json!({"all": true})).await?;
    for p in &projectors {
        d.procs[*p].pause();
    }
    let read_model = callboard_readmodel::ReadModel::new(redis.clone(), callboard_readmodel::Keys::new("cb"));
    let applied = || async { anyhow::Ok(read_model.progress().await?.events_applied) };
    let at_freeze = applied().await?;
    let mongo = mongodb::Client::with_uri_str(d.services.mongo.uri()).await?.database("bench");
    let calls = mongo.collection::<Document>("calls");
    let written = Instant::now();
    let updates = futures::stream::iter(0..events)
        .map(|i| {
            let calls = calls.clone();
            async move {
                let id = 1 + (i as i64 * 7_919) % 20_000;
                // A real change in every round (an update that changes
                // nothing makes no change event).
                calls
                    .update_one(
                        doc! {"id": id},
                        doc! {"$set": {"status_id": 1 + (i as i64 + round) % 5, "rate_round": round}},
                    )
                    .await
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    if let Some(e) = updates.into_iter().find_map(Result::err) {
        bail!("update failed: {e}");
    }
    // Above every earlier round's (equal start times rank by id).
    let sentinel = |t: u32| 90_000_000 + 1_000 * round + i64::from(t);
    for &t in &tenants {
        calls
            .insert_one(doc! {"id": sentinel(t), "tenant_id": i64::from(t), "status_id": 1,
            "start_time": DateTime::from_millis(1_950_000_000_000)})
            .await?;
    }
    eprintln!("   {events} updates and {} sentinels written in {:.1}s", tenants.len(), written.elapsed().as_secs_f64());
    // Nothing may have been applied while frozen, or the clock below
    // would miss work done before it started.
    let at_resume = applied().await?;
    if at_resume != at_freeze {
        bail!("events were applied while the projectors were frozen ({at_freeze} at the freeze, {at_resume} now)");
    }
    let started = Instant::now();
    for p in &projectors {
        d.procs[*p].resume();
    }
    let mut pending: Vec<usize> = (0..tenants.len()).collect();
    while !pending.is_empty() {
        if started.elapsed() > Duration::from_secs(600) {
            bail!("the projectors did not catch up in 10 minutes");
        }
        let mut still = Vec::new();
        for i in pending {
            let response = client
                .post(format!("{}/crm/calls/get-grouped-by-status", d.base))
                .bearer_auth(&tokens[i])
                .header("content-type", "application/x-www-form-urlencoded")
                .body("limit=1&include_enrichment=false")
                .send()
                .await?;
            // Only an answer from the cache counts: a live one shows the
            // sentinel whatever the projectors did.
            let hit = response.headers().get("x-cache").is_some_and(|v| v == "hit");
            let body: serde_json::Value = response.json().await?;
            let top = body["data"]
                .as_array()
                .and_then(|g| g.iter().find(|g| g["id"] == 1))
                .and_then(|g| g["calls"][0].as_i64());
            if !hit || top != Some(sentinel(tenants[i])) {
                still.push(i);
            }
        }
        pending = still;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    // Every event applied (each partition reads every one): the rate
    // counts work that happened.
    let wanted = at_resume + (events + tenants.len()) as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while applied().await? < wanted {
        if Instant::now() > deadline {
            bail!("only {} of {} events applied", applied().await? - at_resume, events + tenants.len());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rate = (events + tenants.len()) as f64 / secs;
    eprintln!("   {processes} process(es): caught up in {secs:.2}s, {rate:.0} events/s");
    Ok(rate)
}

/// Replaces (or appends) the part of `out` between `<!-- scale-<part> -->`
/// markers, under the scale-out heading.
fn write_part(out: &Path, part: &str, md: &str) -> anyhow::Result<()> {
    let (begin, end) = (format!("<!-- scale-{part}:begin -->"), format!("<!-- scale-{part}:end -->"));
    let mut text = std::fs::read_to_string(out).unwrap_or_default();
    if !text.contains(BEGIN) {
        text = format!(
            "{}\n\n{BEGIN}\n## Scale-out (`callboard-bench --scale`)\n\nEach part below comes from one run on one machine; the cluster is three masters on loopback (no replicas), started by the bench as the tests start theirs (`redis-cli --cluster create`).\n{END}\n",
            text.trim_end()
        );
    }
    let block = format!("{begin}\n{}\n{end}", md.trim_end());
    text = match (text.find(&begin), text.find(&end)) {
        (Some(a), Some(b)) if a < b => format!("{}{block}{}", &text[..a], &text[b + end.len()..]),
        _ => {
            let at = text.find(END).context("scale section")?;
            format!("{}{block}\n{}", &text[..at], &text[at..])
        }
    };
    std::fs::write(out, text)?;
    Ok(())
}

pub async fn run(args: &Args, memory_calls: u64, parts: &str) -> anyhow::Result<()> {
    let secs = if args.quick { 3 } else { 5 };
    let wanted = |p: &str| parts == "all" || parts.split(',').any(|w| w.trim() == p);
    if wanted("hits") {
        eprintln!("== hits: one Redis, then a 3-master cluster (100K calls, 1 tenant)");
        let single = hits(args, false, secs).await?;
        let cluster = hits(args, true, secs).await?;
        let mut md = String::new();
        writeln!(md, "### Hits: one Redis against a 3-master Redis Cluster\n")?;
        writeln!(md, "100K calls in tenant 1, warm; `serve` and `project` as separate processes; wrk {secs} s per row, hits only.\n")?;
        writeln!(
            md,
            "| request | single req/s @64 | cluster req/s @64 | cluster/single | single p99 @1 | cluster p99 @1 |"
        )?;
        writeln!(md, "|---|---:|---:|---:|---:|---:|")?;
        for (kind, _) in KINDS {
            let find = |loads: &[Load], conns| loads.iter().find(|l| l.kind == kind && l.conns == conns).cloned();
            if let (Some(s64), Some(c64), Some(s1), Some(c1)) =
                (find(&single, 64), find(&cluster, 64), find(&single, 1), find(&cluster, 1))
            {
                writeln!(
                    md,
                    "| {kind} | {:.0} | {:.0} | {:.2}x | {:.0} µs | {:.0} µs |",
                    s64.rps,
                    c64.rps,
                    c64.rps / s64.rps.max(1.0),
                    s1.p99_us,
                    c1.p99_us
                )?;
            }
        }
        write_part(&args.out, "hits", &md)?;
    }
    if wanted("rate") {
        eprintln!("== projection rate: 1, 2 and 4 processes over 4 partitions (cluster, 20K calls over 40 tenants)");
        let mut d = Deployed::new(args, services(true)?, &[])?;
        d.seed(40, 20_000)?;
        let events = if args.quick { 2_000 } else { 5_000 };
        let mut rates = Vec::new();
        for (round, processes) in [(1, 1), (2, 2), (3, 4)] {
            rates.push((processes, projection_rate(&mut d, round, processes, events).await?));
        }
        drop(d);
        let mut md = String::new();
        writeln!(md, "### Projection rate\n")?;
        writeln!(md, "Four partitions, 20K calls over 40 tenants on the cluster, every tenant warm. The projector processes are frozen (SIGSTOP) while {events} call updates and 40 sentinel inserts are written, then resumed; the rate is those events over the time until every tenant's sentinel is served from the cache (`X-Cache: hit`).\n")?;
        writeln!(md, "| processes | events/s | vs 1 process |")?;
        writeln!(md, "|---:|---:|---:|")?;
        let one = rates.first().map(|r| r.1).unwrap_or(1.0);
        for (p, r) in &rates {
            writeln!(md, "| {p} | {r:.0} | {:.2}x |", r / one)?;
        }
        writeln!(md, "\n{}", RATE_BOUNDS)?;
        write_part(&args.out, "rate", &md)?;
    }
    if wanted("memory") {
        eprintln!("== memory per master: {memory_calls} calls over 1,000 tenants, every tenant warm");
        let (seed_s, warm_s, memory, costs) = memory_per_master(args, 1000, memory_calls).await?;
        let mut md = String::new();
        writeln!(md, "### What each master holds\n")?;
        writeln!(md, "{memory_calls} calls over 1,000 tenants, every tenant warm (seeded in {seed_s:.0} s, warmed in {warm_s:.0} s). `used_memory` after the warm minus before it, and keys, per master.\n")?;
        writeln!(md, "| master | memory | share | keys |")?;
        writeln!(md, "|---|---:|---:|---:|")?;
        let total: u64 = memory.iter().map(|m| m.1).sum();
        for (port, used, keys) in &memory {
            let share = 100.0 * *used as f64 / total.max(1) as f64;
            writeln!(md, "| :{port} | {:.1} MiB | {share:.0}% | {keys} |", *used as f64 / 1048576.0)?;
        }
        writeln!(
            md,
            "| all | {:.1} MiB | | {} |\n",
            total as f64 / 1048576.0,
            memory.iter().map(|m| m.2).sum::<u64>()
        )?;
        writeln!(md, "{:.0} bytes of Redis per call in all.\n", total as f64 / memory_calls as f64)?;
        writeln!(md, "What each key type costs over every master (`MEMORY USAGE <key> SAMPLES 0` of every key, by its row in the key schema), per call:\n")?;
        writeln!(md, "| key type | keys | bytes/call | share |")?;
        writeln!(md, "|---|---:|---:|---:|")?;
        let weighed: u64 = costs.iter().map(|c| c.bytes).sum();
        for c in &costs {
            writeln!(
                md,
                "| `{}` | {} | {:.1} | {:.0}% |",
                c.label(),
                c.keys,
                c.bytes as f64 / memory_calls as f64,
                100.0 * c.bytes as f64 / weighed.max(1) as f64
            )?;
        }
        writeln!(
            md,
            "| **all keys** | {} | {:.1} | |",
            costs.iter().map(|c| c.keys).sum::<u64>(),
            weighed as f64 / memory_calls as f64
        )?;
        write_part(&args.out, "memory", &md)?;
    }
    Ok(())
}
