//! The `callboard` binary's commands, run as a user would.

use std::process::{Command, Output};

use callboard_api::JwtKeys;
use callboard_testkit::{unique_db_name, Services};

const SECRET: &str = "cli-test-secret-0123456789abcdef-0123";

fn callboard_bin() -> &'static str {
    env!("CARGO_BIN_EXE_callboard")
}

fn callboard(services: &Services, db: &str, args: &[&str]) -> Output {
    Command::new(callboard_bin())
        .args(args)
        .env("CALLBOARD_MONGODB_URI", services.mongo.uri())
        .env("CALLBOARD_MONGODB_DB", db)
        .env("CALLBOARD_JWT_SECRET", SECRET)
        .env("CALLBOARD_LOG", "warn")
        .output()
        .expect("run callboard")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn create_indexes_is_idempotent() {
    let services = Services::start().unwrap();
    let db = unique_db_name("cli");
    let first = callboard(&services, &db, &["create-indexes"]);
    assert!(first.status.success(), "{first:?}");
    assert!(stdout(&first).contains("created calls.tenant_id_1_deleted_1_status_id_1"), "{}", stdout(&first));
    assert!(stdout(&first).ends_with("9 created, 0 already existed\n"), "{}", stdout(&first));
    let second = callboard(&services, &db, &["create-indexes"]);
    assert!(second.status.success());
    assert!(stdout(&second).ends_with("0 created, 9 already existed\n"), "{}", stdout(&second));
}

#[test]
fn seed_loads_and_refuses_to_overwrite_without_drop() {
    let services = Services::start().unwrap();
    let db = unique_db_name("cli");
    let args = ["seed", "--tenants", "3", "--calls", "12000", "--users", "20", "--statuses", "5"];
    let out = callboard(&services, &db, &args);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("seeded 12000 calls, 20 users, 6 statuses across 3 tenants"), "{}", stdout(&out));
    let again = callboard(&services, &db, &args);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--drop"), "{again:?}");
    let dropped = callboard(&services, &db, &[&args[..], &["--drop"]].concat());
    assert!(dropped.status.success(), "{dropped:?}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let count = rt.block_on(async {
        let client = mongodb::Client::with_uri_str(services.mongo.uri()).await.unwrap();
        client.database(&db).collection::<bson::Document>("calls").count_documents(bson::doc! {}).await.unwrap()
    });
    assert_eq!(count, 12_000);
}

#[test]
fn token_prints_a_verifiable_token() {
    let services = Services::start().unwrap();
    let out = callboard(&services, "x", &["token", "--tenant", "6", "--admin", "--ttl", "10m"]);
    assert!(out.status.success(), "{out:?}");
    let caller = JwtKeys::new(SECRET.as_bytes()).verify(stdout(&out).trim()).unwrap();
    assert_eq!(caller.tenant.get(), 6);
    assert!(caller.is_admin());
}

#[test]
fn bad_configuration_fails_at_start_naming_the_key() {
    let services = Services::start().unwrap();
    for (var, value, expected) in [
        ("CALLBOARD_HTTP_ADDR", "not-an-address", "CALLBOARD_HTTP_ADDR"),
        ("CALLBOARD_JWT_SECRET", "short", "CALLBOARD_JWT_SECRET"),
        ("CALLBOARD_LOG", "=====", "CALLBOARD_LOG"),
        ("CALLBOARD_MONGODB_URL", "mongodb://x", "CALLBOARD_MONGODB_URL"),
    ] {
        let out = Command::new(callboard_bin())
            .arg("serve")
            .env("CALLBOARD_MONGODB_URI", services.mongo.uri())
            .env("CALLBOARD_JWT_SECRET", SECRET)
            .env(var, value)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{var}={value} started");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{var}={value}: {err}");
    }
}
