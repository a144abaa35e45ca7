//! The `callboard` binary's commands, run as a user would.

use std::process::{Command, Output};
use std::time::Duration;

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

/// An operator command against `app`, as `callboard <args>` with the API's
/// URL and `token` in the environment.
async fn operate(app: &callboard_tests::TestApp, token: Option<&str>, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(callboard_bin());
    // A backtrace would be on: errors must still be one line.
    command
        .args(args)
        .env("CALLBOARD_URL", &app.address)
        .env_remove("CALLBOARD_ADMIN_TOKEN")
        .env("RUST_BACKTRACE", "1");
    if let Some(token) = token {
        command.env("CALLBOARD_ADMIN_TOKEN", token);
    }
    command.output().await.expect("run callboard")
}

fn json_of(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{o:?}");
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)))
}

#[tokio::test]
async fn operator_commands_warm_inspect_verify_and_invalidate_through_the_admin_api() {
    let mut app = callboard_tests::spawn_app().await;
    let ds = callboard_tests::dataset::generate(96, 80);
    app.insert_dataset(&ds).await;
    app.start_projector();
    let admin_token = app.admin_token(1);
    let admin = Some(admin_token.as_str());

    // warm follows its job to the end; the tenant is then a hit equal to live.
    let job = json_of(&operate(&app, admin, &["warm", "--tenant", "1", "--json"]).await);
    assert_eq!(
        (job["state"].as_str(), job["total"].as_u64(), job["done"].as_u64()),
        (Some("done"), Some(1), Some(1)),
        "{job}"
    );
    let (hit, _, _) = app.wait_for_projection(1, &[], Duration::from_secs(1)).await;
    assert!(hit, "the tenant is not a hit right after its warm was done");

    // status: the API's own JSON, and a table of the same.
    let status = json_of(&operate(&app, admin, &["status", "--tenant", "1", "--json"]).await);
    let api: serde_json::Value = app
        .client
        .get(format!("{}/admin/cache/status?tenant_id=1", app.address))
        .bearer_auth(&admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let row = |v: &serde_json::Value| (v["tenant_id"].clone(), v["state"].clone(), v["calls"].clone());
    assert_eq!(row(&status["tenants"][0]), row(&api["tenants"][0]));
    assert_eq!(status["tenants"].as_array().map(Vec::len), Some(1));
    assert_eq!(status["tenants"][0]["state"], "warm");
    let table = operate(&app, admin, &["status"]).await;
    assert!(table.status.success(), "{table:?}");
    let text = stdout(&table);
    println!("{text}");
    let row = text.lines().find(|l| l.contains(" warm ")).unwrap_or_else(|| panic!("no warm tenant row:\n{text}"));
    let calls = status["tenants"][0]["calls"].to_string();
    assert!(row.contains(" 1 ") && row.contains(&format!(" {calls} ")), "{row}");

    // verify: equal, exit status 0, in JSON and as a table.
    let verdict = json_of(&operate(&app, admin, &["verify", "--tenant", "1", "--json"]).await);
    assert_eq!((verdict["state"].as_str(), verdict["equal"].as_bool()), (Some("warm"), Some(true)), "{verdict}");
    let table = operate(&app, admin, &["verify", "--tenant", "1"]).await;
    assert!(table.status.success() && stdout(&table).contains("true"), "{table:?}");

    // invalidate: the tenant is answered live again, and verify, which
    // then compares nothing, says so with exit status 3.
    let out = operate(&app, admin, &["invalidate", "--tenant", "1"]).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), "invalidated 1 tenants: 1\n");
    let out = operate(&app, admin, &["verify", "--tenant", "1"]).await;
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not compared: cold"), "{out:?}");
    let (cache, _) = app.grouped_as(&app.token(1), &[], false).await;
    assert_eq!(cache, "miss");

    // Errors: no token, a member's token, both targets, neither.
    let out = operate(&app, None, &["status"]).await;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("CALLBOARD_ADMIN_TOKEN"), "{out:?}");
    let member = app.token(1);
    let out = operate(&app, Some(&member), &["invalidate", "--all"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("forbidden") && stderr.contains("403"), "{out:?}");
    assert!(stderr.starts_with("error: ") && stderr.lines().count() == 1, "one line for an operator: {stderr}");
    for args in [&["warm", "--tenant", "1", "--all"][..], &["invalidate"][..]] {
        let out = operate(&app, admin, args).await;
        assert_eq!(out.status.code(), Some(2), "clap refuses {args:?}: {out:?}");
    }
    app.stop().await;
}
