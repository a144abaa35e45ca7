//! The proof of correctness: a seeded random workload across tenants while
//! projector processes are SIGKILLed and restarted, warms are triggered and
//! tenants invalidated; once the writes stop and a projector catches up,
//! every tenant's cached answer equals the live aggregation exactly.

use std::process::Command;
use std::time::{Duration, Instant};

use bson::{doc, Bson, DateTime, Document};
use callboard_store::{CALLS, CALL_STATUS, USERS};
use callboard_testkit::Guarded;
use callboard_tests::dataset::generate;
use callboard_tests::reference::assert_same;
use callboard_tests::{spawn_app, TestApp};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

/// Fixed, so a failure repeats; `CALLBOARD_TEST_CHAOS_SEED` explores others.
fn seed() -> u64 {
    std::env::var("CALLBOARD_TEST_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0xC0FFEE)
}
const OPERATIONS: usize = 300;
const WINDOW: u64 = 8;

struct Projectors {
    procs: Vec<Option<Guarded>>,
    config: std::path::PathBuf,
    app_env: Vec<(String, String)>,
    log_dir: std::path::PathBuf,
    started: usize,
}

impl Projectors {
    fn start(&mut self, slot: usize) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_callboard"));
        cmd.arg("--config").arg(&self.config).arg("project");
        cmd.envs(self.app_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        self.started += 1;
        let log = self.log_dir.join(format!("projector-{}.log", self.started));
        self.procs[slot] = Some(Guarded::spawn(cmd, "callboard project", &log).expect("start a projector"));
    }

    fn kill(&mut self, slot: usize) {
        if let Some(mut p) = self.procs[slot].take() {
            p.kill();
        }
    }

    /// SIGSTOP (`stop`) or SIGCONT a running projector.
    fn signal(&self, slot: usize, stop: bool) {
        match &self.procs[slot] {
            Some(p) if stop => p.pause(),
            Some(p) => p.resume(),
            None => {}
        }
    }

    fn running(&self) -> Vec<usize> {
        (0..self.procs.len()).filter(|s| self.procs[*s].is_some()).collect()
    }

    fn kill_all(&mut self) {
        for slot in 0..self.procs.len() {
            self.signal(slot, false);
            self.kill(slot);
        }
    }
}

/// The faults a workload step injects into the projector processes.
trait Faults {
    /// Called before each operation `i`; returns how many processes it
    /// killed.
    fn step(&mut self, i: usize, projectors: &mut Projectors, rng: &mut ChaCha8Rng) -> usize;
}

/// SIGKILL and restart one of the processes, 3% of the steps.
struct Kills;

impl Faults for Kills {
    fn step(&mut self, _: usize, projectors: &mut Projectors, rng: &mut ChaCha8Rng) -> usize {
        if rng.gen_bool(0.03) {
            let slot = rng.gen_range(0..projectors.procs.len());
            projectors.kill(slot);
            projectors.start(slot);
            return 1;
        }
        0
    }
}

/// `n` `callboard serve` processes beside the test's own API, with the
/// projectors' configuration (they map tenants to the same partitions);
/// their base URLs, once each is ready.
async fn start_apis(app: &TestApp, projectors: &Projectors, n: usize) -> (Vec<Guarded>, Vec<String>) {
    let (mut procs, mut bases) = (Vec::new(), Vec::new());
    for i in 0..n {
        let port = callboard_testkit::free_port().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_callboard"));
        cmd.arg("--config").arg(&projectors.config).arg("serve");
        cmd.envs(projectors.app_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd.env("CALLBOARD_HTTP_ADDR", format!("127.0.0.1:{port}"));
        let log = projectors.log_dir.join(format!("serve-{i}.log"));
        procs.push(Guarded::spawn(cmd, "callboard serve", &log).expect("start an API process"));
        bases.push(format!("http://127.0.0.1:{port}"));
    }
    for base in &bases {
        let deadline = Instant::now() + Duration::from_secs(30);
        while app.client.get(format!("{base}/readyz")).send().await.map(|r| r.status().as_u16()).ok() != Some(200) {
            assert!(Instant::now() < deadline, "{base} never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    (procs, bases)
}

/// `tenant`'s answer from the API at `base`: (X-Cache, body).
async fn grouped_at(app: &TestApp, base: &str, tenant: i64, fields: &[(&str, &str)]) -> (String, serde_json::Value) {
    let r = app
        .client
        .post(format!("{base}{}", callboard_api::GROUPED_PATH))
        .bearer_auth(app.token(tenant))
        .form(fields)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{base}");
    let cache = r.headers().get("x-cache").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    (cache, r.json().await.unwrap())
}

/// An API with seeded data and `running` of `slots` `callboard project`
/// processes.
async fn deploy(
    seed: u64,
    calls: usize,
    projector_config: &str,
    (running, slots): (usize, usize),
) -> (TestApp, callboard_tests::dataset::Dataset, Projectors) {
    let app = spawn_app().await;
    let ds = generate(seed, calls);
    app.insert(CALL_STATUS, &ds.statuses).await;
    app.insert(USERS, &ds.users).await;
    app.insert(CALLS, &ds.calls).await;
    let config = app.services.dir.path().join("projector.toml");
    std::fs::write(&config, format!("[projector]\n{projector_config}\n")).unwrap();
    let mut projectors = Projectors {
        procs: (0..slots).map(|_| None).collect(),
        config,
        app_env: app.process_env(),
        log_dir: app.services.dir.path().to_path_buf(),
        started: 0,
    };
    for slot in 0..running {
        projectors.start(slot);
    }
    (app, ds, projectors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_workload_with_crashing_projectors_converges_to_the_live_answer() {
    // A document window of 8 calls per status, so that removals near the
    // top make the projectors refill windows from MongoDB while they die.
    let (app, ds, projectors) =
        deploy(seed(), 150, &format!("lease_ttl_ms = 1500\nbatch_max = 50\ndoc_window = {WINDOW}"), (2, 2)).await;
    let (kills, mut projectors) = workload(&app, &[], &ds, projectors, seed(), &mut Kills).await;
    assert!(kills >= 3, "the seed must exercise crashes ({kills})");
    projectors.kill_all();
    app.stop().await;
}

/// Three processes share four partitions; owners are SIGKILLed and
/// restarted, one is frozen (SIGSTOP) past its lease and then resumed, and
/// a fourth process joins mid-run.
struct Rebalancing {
    frozen: Option<(usize, Instant)>,
    froze: usize,
    /// The first step at which the next freeze may start.
    next_freeze: usize,
    joined: bool,
}

impl Faults for Rebalancing {
    fn step(&mut self, i: usize, projectors: &mut Projectors, rng: &mut ChaCha8Rng) -> usize {
        if let Some((slot, since)) = self.frozen {
            // Frozen for twice the lease: its partitions move on meanwhile.
            if since.elapsed() > Duration::from_millis(3_000) {
                projectors.signal(slot, false);
                self.frozen = None;
                self.next_freeze = i + 20;
            }
        } else if i >= self.next_freeze {
            let running = projectors.running();
            let slot = running[rng.gen_range(0..running.len())];
            projectors.signal(slot, true);
            self.frozen = Some((slot, Instant::now()));
            self.froze += 1;
        }
        if i == OPERATIONS / 2 && !self.joined {
            projectors.start(3);
            self.joined = true;
        }
        if rng.gen_bool(0.03) {
            let frozen = self.frozen.map(|(s, _)| s);
            let candidates: Vec<usize> = projectors.running().into_iter().filter(|s| Some(*s) != frozen).collect();
            if let Some(&slot) = candidates.get(rng.gen_range(0..candidates.len().max(1))) {
                projectors.kill(slot);
                projectors.start(slot);
                return 1;
            }
        }
        0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_survive_kills_freezes_and_a_joining_process() {
    let config = format!("lease_ttl_ms = 1500\nbatch_max = 50\ndoc_window = {WINDOW}\npartitions = 4");
    let (app, ds, projectors) = deploy(seed() + 2, 150, &config, (3, 4)).await;
    // Readers also go to two API processes of their own.
    let (_apis, bases) = start_apis(&app, &projectors, 2).await;
    let mut faults = Rebalancing { frozen: None, froze: 0, next_freeze: 20, joined: false };
    let (kills, mut projectors) = workload(&app, &bases, &ds, projectors, seed() + 2, &mut faults).await;
    eprintln!("{kills} kills, {} freezes past the lease, a fourth process joined: {}", faults.froze, faults.joined);
    assert!(kills >= 3 && faults.froze >= 2 && faults.joined, "the seed must exercise the faults");
    // Four processes, four partitions: each ends up leading one. A process
    // killed by the last fault still holds its leases until they expire, so
    // wait for the owners to be exactly the live processes.
    let pids: std::collections::BTreeSet<String> =
        projectors.procs.iter().flatten().map(|p| p.pid().to_string()).collect();
    let mut redis = app.redis().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let owners = loop {
        let mut owners = std::collections::BTreeSet::new();
        for p in 0..4 {
            let owner: Option<String> =
                redis::AsyncCommands::get(&mut redis, format!("cb:{{g}}:lease:{p}")).await.unwrap();
            // `<host>-<pid>-<random>`: the pid is second from the end.
            owners.extend(owner.and_then(|o| o.rsplit('-').nth(1).map(str::to_string)));
        }
        if owners == pids || Instant::now() > deadline {
            break owners;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(owners, pids, "every process leads one partition");
    projectors.kill_all();
    app.stop().await;
}

/// A seeded random workload with `faults`; then, for every tenant, limits
/// 1/7/100 in both modes, cached equals live byte for byte, and so from
/// each API process at `apis` too (readers take turns between them and the
/// test's API). Returns the number of kills, and the processes.
async fn workload(
    app: &TestApp,
    apis: &[String],
    ds: &callboard_tests::dataset::Dataset,
    mut projectors: Projectors,
    seed: u64,
    faults: &mut dyn Faults,
) -> (usize, Projectors) {
    for &t in &ds.tenants {
        app.grouped_as(&app.token(t), &[], false).await;
    }

    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let calls = app.db.collection::<Document>(CALLS);
    let users = app.db.collection::<Document>(USERS);
    let statuses = app.db.collection::<Document>(CALL_STATUS);
    let admin = app.admin_token(1);
    let mut next_id = 1_000_000_i64;
    let (mut kills, mut warms, mut invalidations) = (0, 0, 0);
    let started = Instant::now();
    for i in 0..OPERATIONS {
        kills += faults.step(i, &mut projectors, &mut rng);
        let id = ds.calls[rng.gen_range(0..ds.calls.len())].get_i64("id").unwrap();
        let tenant = rng.gen_range(1..=3_i64);
        match rng.gen_range(0..12) {
            0 | 1 => {
                next_id += 1;
                let status: Bson = if rng.gen_bool(0.5) {
                    rng.gen_range(1..=3).into()
                } else {
                    rng.gen_range(1..=3).to_string().into()
                };
                calls
                    .insert_one(doc! {"id": next_id, "tenant_id": tenant, "status_id": status, "subject": format!("Call {next_id}"),
                        "start_time": DateTime::from_millis(1_760_000_000_000 + rng.gen_range(0..100) * 60_000), "owner_id": rng.gen_range(1..=9)})
                    .await
                    .unwrap();
            }
            2 | 3 => {
                let status: Bson = if rng.gen_bool(0.5) {
                    rng.gen_range(1..=7).into()
                } else {
                    rng.gen_range(1..=7).to_string().into()
                };
                calls.update_one(doc! {"id": id}, doc! {"$set": {"status_id": status}}).await.unwrap();
            }
            4 => {
                calls.update_one(doc! {"id": id}, doc! {"$set": {"deleted": 1}}).await.unwrap();
            }
            5 => {
                calls.update_one(doc! {"id": id}, doc! {"$set": {"deleted": 0}}).await.unwrap();
            }
            6 => {
                calls.delete_one(doc! {"id": id}).await.unwrap();
            }
            7 => {
                calls.update_one(doc! {"id": id}, doc! {"$set": {"tenant_id": tenant}}).await.unwrap();
            }
            8 => {
                calls.update_one(doc! {"id": id}, doc! {"$set": {"owner_id": rng.gen_range(1..=10), "start_time": DateTime::from_millis(1_760_000_000_000 + rng.gen_range(0..100) * 60_000)}}).await.unwrap();
            }
            9 => {
                let uid = rng.gen_range(1..=8);
                if rng.gen_bool(0.7) {
                    users
                        .update_one(
                            doc! {"id": uid},
                            doc! {"$set": {"name": format!("User {uid} v{}", rng.gen_range(0..1000))}},
                        )
                        .await
                        .unwrap();
                } else {
                    users.delete_one(doc! {"id": uid}).await.unwrap();
                    users.insert_one(doc! {"id": uid, "name": format!("User {uid} reborn"), "email": format!("r{uid}@example.com")}).await.unwrap();
                }
            }
            10 => {
                let sid = rng.gen_range(1..=9);
                match rng.gen_range(0..3) {
                    0 => statuses
                        .insert_one(doc! {"id": sid, "name": format!("Added {sid}"), "tenant_id": tenant})
                        .await
                        .map(|_| ())
                        .unwrap(),
                    1 => statuses
                        .update_many(
                            doc! {"id": sid},
                            doc! {"$set": {"name": format!("Renamed {sid}"), "color": "#010203"}},
                        )
                        .await
                        .map(|_| ())
                        .unwrap(),
                    _ => statuses
                        .update_many(doc! {"id": sid}, doc! {"$set": {"deleted": rng.gen_range(0..=1)}})
                        .await
                        .map(|_| ())
                        .unwrap(),
                }
            }
            _ => {
                calls
                    .replace_one(
                        doc! {"id": id},
                        doc! {"id": id, "tenant_id": tenant, "status_id": 1, "subject": "Replaced"},
                    )
                    .await
                    .unwrap();
            }
        }
        let roll: f64 = rng.gen();
        if roll < 0.02 {
            let r = app
                .client
                .post(format!("{}/admin/cache/warm", app.address))
                .bearer_auth(&admin)
                .json(&json!({"tenant_id": tenant}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202);
            warms += 1;
        } else if roll < 0.03 {
            let r = app
                .client
                .post(format!("{}/admin/cache/invalidate", app.address))
                .bearer_auth(&admin)
                .json(&json!({"tenant_id": tenant}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            invalidations += 1;
        }
        if rng.gen_bool(0.2) {
            // Readers during the workload also trigger warms of cold tenants.
            let _ = match apis.get(i % (apis.len() + 1)) {
                Some(base) => grouped_at(app, base, tenant, &[("limit", "3")]).await,
                None => app.grouped_as(&app.token(tenant), &[("limit", "3")], false).await,
            };
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..15))).await;
    }
    eprintln!("seed {seed}: {OPERATIONS} operations, {kills} projector kills, {warms} warms, {invalidations} invalidations in {:?}", started.elapsed());
    // Whatever is still frozen wakes up before the checks.
    for slot in projectors.running() {
        projectors.signal(slot, false);
    }

    for &tenant in &ds.tenants {
        for limit in ["1", "7", "100"] {
            for enrichment in ["true", "false"] {
                let fields = [("limit", limit), ("include_enrichment", enrichment)];
                if limit == "100" && enrichment == "true" {
                    // Past the window wherever a status has more calls:
                    // answered live then, and the same either way.
                    let live = app.live(tenant, &fields).await;
                    let longest =
                        live["data"].as_array().unwrap().iter().filter_map(|g| g["total_calls"].as_u64()).max();
                    if longest > Some(WINDOW) {
                        let (_, cached) = app.grouped_as(&app.token(tenant), &fields, false).await;
                        assert_same(&cached, &live, &format!("tenant {tenant} {fields:?} (past the window)"));
                        continue;
                    }
                }
                let (hit, cached, live) = app.wait_for_projection(tenant, &fields, Duration::from_secs(30)).await;
                if !hit {
                    dump_logs(&projectors.log_dir);
                    let state = app
                        .client
                        .get(format!("{}/admin/cache/status", app.address))
                        .bearer_auth(&admin)
                        .send()
                        .await
                        .unwrap()
                        .text()
                        .await
                        .unwrap();
                    panic!("tenant {tenant} {fields:?}: no cache hit within 30 s (cold, or the cache errs); status: {state}");
                }
                assert_same(&cached, &live, &format!("tenant {tenant} {fields:?}"));
            }
        }
    }
    // Every API process serves the same answers from the cache.
    for base in apis {
        for &tenant in &ds.tenants {
            let fields = [("limit", "7")];
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let live = app.live(tenant, &fields).await;
                let (cache, cached) = grouped_at(app, base, tenant, &fields).await;
                if cache == "hit" && cached == live {
                    break;
                }
                assert!(Instant::now() < deadline, "{base}, tenant {tenant}: X-Cache {cache}, {cached} against {live}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let mut redis = app.redis().await;
    let refills: Option<i64> =
        redis::AsyncCommands::hget(&mut redis, "cb:{g}:progress", callboard_readmodel::state::progress::WINDOW_REFILLS)
            .await
            .unwrap();
    eprintln!("document windows refilled: {refills:?}");
    assert!(refills > Some(0), "the workload must make the projectors refill document windows");
    (kills, projectors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_projector_takes_over_when_the_leader_dies() {
    use redis::AsyncCommands;
    let (app, _, mut projectors) = deploy(seed() + 1, 60, "lease_ttl_ms = 1500", (2, 2)).await;
    app.grouped_as(&app.token(1), &[], false).await;
    let (hit, _, _) = app.wait_for_projection(1, &[], Duration::from_secs(20)).await;
    assert!(hit);
    let mut redis = app.redis().await;
    let leader: String = redis.get("cb:{g}:lease:0").await.unwrap();
    let pids: Vec<u32> = projectors.procs.iter().map(|p| p.as_ref().unwrap().pid()).collect();
    let slot =
        pids.iter().position(|pid| leader.contains(&format!("-{pid}-"))).expect("the lease names a running projector");
    projectors.kill(slot);
    let killed_at = Instant::now();
    app.db
        .collection::<Document>(CALLS)
        .insert_one(doc! {"id": 555_555, "tenant_id": 1, "status_id": 1, "subject": "after the crash"})
        .await
        .unwrap();
    let (hit, cached, live) = app.wait_for_projection(1, &[], Duration::from_secs(20)).await;
    let took = killed_at.elapsed();
    assert!(hit && cached.to_string().contains("after the crash"), "the standby never applied the write");
    assert_same(&cached, &live, "after takeover");
    assert!(took < Duration::from_secs(8), "takeover took {took:?}");
    let new_leader: String = redis.get("cb:{g}:lease:0").await.unwrap();
    assert!(new_leader.contains(&format!("-{}-", pids[1 - slot])), "{new_leader}");
    eprintln!("takeover: write visible {took:?} after the leader was killed (lease TTL 1.5 s)");
    projectors.kill(1 - slot);
    app.stop().await;
}

/// The projectors' warnings and errors, for a failure's diagnosis.
fn dump_logs(dir: &std::path::Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("projector-")) {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for line in text
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("warm") || l.contains("lease"))
            {
                eprintln!("{}: {line}", path.display());
            }
        }
    }
}
