//! callboard on a real Redis Cluster on loopback, whatever
//! `CALLBOARD_TEST_REDIS_TOPOLOGY` says: the read model spreads over every
//! master, a promoted replica (graceful, or after its master is killed) is
//! survived, and a replica promoted *behind* the checkpoint (restarted from
//! an older RDB snapshot) is noticed and the read model rebuilt.

use std::time::{Duration, Instant};

use bson::{doc, DateTime, Document};
use callboard_readmodel::conn::key_slot;
use callboard_store::{CALLS, CALL_STATUS, USERS};
use callboard_testkit::{RedisCluster, Services, TestRedis};
use callboard_tests::reference::assert_same;
use callboard_tests::{spawn_app_on, TestApp};

const WAIT: Duration = Duration::from_secs(30);

fn cluster(app: &TestApp) -> &RedisCluster {
    match &app.services.redis {
        TestRedis::Cluster(c) => c,
        TestRedis::Single(_) => unreachable!("these tests start a cluster"),
    }
}

/// Statuses, users, and `per_tenant` calls for each of `tenants`.
async fn seed(app: &TestApp, tenants: &[i64], per_tenant: i64) {
    app.insert(CALL_STATUS, &[doc! {"id": 1, "name": "Open"}, doc! {"id": 2, "name": "Done"}]).await;
    app.insert(USERS, &(1..=5).map(|u| doc! {"id": u, "name": format!("User {u}")}).collect::<Vec<_>>()).await;
    let calls: Vec<Document> = tenants
        .iter()
        .flat_map(|t| {
            (0..per_tenant).map(move |i| {
                let id = t * 10_000 + i;
                doc! {"id": id, "tenant_id": *t, "status_id": 1 + i % 2, "owner_id": 1 + i % 5,
                "start_time": DateTime::from_millis(1_700_000_000_000 + id)}
            })
        })
        .collect();
    app.insert(CALLS, &calls).await;
}

/// Every tenant's cached answer, for limits 1 and 7 in both modes, is a hit
/// equal to the live one.
async fn assert_converged(app: &TestApp, tenants: &[i64], context: &str) {
    for &t in tenants {
        app.grouped_as(&app.token(t), &[], false).await;
        for fields in
            [[("limit", "1"), ("include_enrichment", "true")], [("limit", "7"), ("include_enrichment", "false")]]
        {
            let (hit, cached, live) = app.wait_for_projection(t, &fields, WAIT).await;
            assert!(hit, "{context}: tenant {t} {fields:?} never became a cache hit");
            assert_same(&cached, &live, &format!("{context}: tenant {t} {fields:?}"));
        }
    }
}

async fn insert_call(app: &TestApp, id: i64, tenant: i64) {
    app.db
        .collection::<Document>(CALLS)
        .insert_one(doc! {"id": id, "tenant_id": tenant, "status_id": 1, "subject": format!("call {id}"),
        "start_time": DateTime::from_millis(1_800_000_000_000 + id)})
        .await
        .expect("insert");
}

/// Polls until the cluster is healthy with the node on `port` a master.
fn wait_for_master(c: &RedisCluster, port: u16) {
    let deadline = Instant::now() + WAIT;
    loop {
        let promoted = c.topology().is_ok_and(|n| n.iter().any(|n| n.port == port && n.master && n.up));
        if promoted && c.wait_until_ok().is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "node {port} was not promoted");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_model_spreads_over_every_master() {
    let mut app = spawn_app_on(Services::start_cluster(3, 0).expect("a cluster")).await;
    let tenants: Vec<i64> = (1..=30).collect();
    seed(&app, &tenants, 40).await;
    app.start_projector();
    assert_converged(&app, &tenants, "30 tenants").await;
    let c = cluster(&app);
    let mut keys = Vec::new();
    for port in c.ports() {
        let all: u64 = c.cli(port, &["dbsize"]).unwrap().trim().parse().unwrap();
        let locators = c.cli(port, &["--scan", "--pattern", "cb:{l*}:cl:*"]).unwrap().lines().count();
        keys.push((port, all, locators));
    }
    eprintln!("keys per master (port, all, locator buckets): {keys:?}");
    let total: u64 = keys.iter().map(|k| k.1).sum();
    for (port, all, locators) in keys {
        assert!(all * 5 >= total, "master {port} holds {all} of {total} keys");
        assert!(locators > 0, "master {port} holds no call locators");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failovers_are_survived_with_no_wrong_answer() {
    let mut app = spawn_app_on(Services::start_cluster(3, 1).expect("a cluster")).await;
    let tenants = [1, 2, 3];
    seed(&app, &tenants, 30).await;
    app.start_projector();
    assert_converged(&app, &tenants, "before").await;

    // A graceful failover of tenant 1's master: its replica takes over.
    let (_, replicas) = cluster(&app).owners_of(key_slot(b"t1")).unwrap();
    let replica = replicas[0];
    cluster(&app).cli(replica, &["cluster", "failover"]).unwrap();
    wait_for_master(cluster(&app), replica);
    for t in tenants {
        // Nothing changed meanwhile: every hit is the live answer.
        let (hit, cached, live) = app.wait_for_projection(t, &[("limit", "7")], WAIT).await;
        assert!(hit, "tenant {t} after the graceful failover");
        assert_same(&cached, &live, &format!("tenant {t} right after the graceful failover"));
    }
    insert_call(&app, 900_001, 1).await;
    assert_converged(&app, &tenants, "after the graceful failover").await;

    // Tenant 2's master dies: its replica is promoted after the node
    // timeout; writes made meanwhile show up.
    let (master, replicas) = cluster(&app).owners_of(key_slot(b"t2")).unwrap();
    let killed_at = Instant::now();
    match &mut app.services.redis {
        TestRedis::Cluster(c) => c.kill(master),
        TestRedis::Single(_) => unreachable!(),
    }
    insert_call(&app, 900_002, 2).await;
    wait_for_master(cluster(&app), replicas[0]);
    assert_converged(&app, &tenants, "after a master was killed").await;
    eprintln!("converged {:?} after the master was killed", killed_at.elapsed());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_promoted_behind_the_checkpoint_is_noticed_and_rebuilt() {
    let mut app = spawn_app_on(Services::start_cluster(3, 1).expect("a cluster")).await;
    // A tenant whose master is not the one holding the checkpoint (`{g}`):
    // only that master loses writes.
    let (g_master, _) = cluster(&app).owners_of(key_slot(b"g")).unwrap();
    let tenant = (1..100_i64)
        .find(|t| cluster(&app).owners_of(key_slot(format!("t{t}").as_bytes())).unwrap().0 != g_master)
        .unwrap();
    seed(&app, &[tenant], 20).await;
    app.start_projector();
    assert_converged(&app, &[tenant], "before").await;

    // The replica saves a snapshot; then the projector applies more
    // writes, and checkpoints past them.
    let (master, replicas) = cluster(&app).owners_of(key_slot(format!("t{tenant}").as_bytes())).unwrap();
    assert!(cluster(&app).cli(replicas[0], &["save"]).unwrap().contains("OK"));
    for i in 0..5 {
        insert_call(&app, 800_000 + i, tenant).await;
    }
    let (hit, cached, live) = app.wait_for_projection(tenant, &[("limit", "7")], WAIT).await;
    assert!(hit && cached.to_string().contains("call 800004"), "the writes were applied on the master");
    assert_same(&cached, &live, "applied on the master");
    // The checkpoint moves past the second of those writes: the stand-in
    // resumes a stream from a token with one-second precision, so a
    // resume from a checkpoint in the same second would replay them
    // (a real replica set resumes exactly after the token).
    let other = (1..100_i64).find(|t| *t != tenant).unwrap();
    app.grouped_as(&app.token(other), &[], false).await;
    let written = Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        insert_call(&app, 700_000 + n, other).await;
        let (hit, cached, _) = app.wait_for_projection(other, &[("limit", "1")], WAIT).await;
        if hit
            && cached.to_string().contains(&format!("call {}", 700_000 + n))
            && written.elapsed() > Duration::from_millis(1_100)
        {
            break;
        }
    }

    // Both nodes die; the replica comes back from its older snapshot and
    // is promoted: its slots hold less than the checkpoint says.
    match &mut app.services.redis {
        TestRedis::Cluster(c) => {
            c.kill(replicas[0]);
            c.kill(master);
            c.restart(replicas[0]).expect("restart the replica");
        }
        TestRedis::Single(_) => unreachable!(),
    }
    wait_for_master(cluster(&app), replicas[0]);
    let started = Instant::now();
    assert_converged(&app, &[tenant], "after a replica behind the checkpoint was promoted").await;
    let mut r = app.redis().await;
    let lost: Option<i64> =
        redis::AsyncCommands::hget(&mut r, "cb:{g}:progress", callboard_readmodel::state::progress::WRITES_LOST)
            .await
            .unwrap();
    assert!(lost >= Some(1), "the loss must have been noticed");
    eprintln!("rebuilt and converged {:?} after the promotion", started.elapsed());
    app.stop().await;
}
