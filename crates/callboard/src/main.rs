//! The `callboard` binary: parses the command line and wires the crates
//! together. No logic lives here.

mod ops;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use callboard_api::Application;
use callboard_domain::TenantId;
use callboard_projector::verifier::ReconcileConfig;
use callboard_projector::{Projector, ProjectorConfig};
use callboard_readmodel::write::DocWindow;
use callboard_readmodel::Keys;
use callboard_settings::{LogFormat, Settings};
use callboard_store::{indexes, seed};
use clap::{Parser, Subcommand};

// mimalloc, without transparent huge pages (crates/alloc says why).
#[global_allocator]
static GLOBAL: callboard_alloc::Allocator = callboard_alloc::Allocator;

#[derive(Parser)]
#[command(name = "callboard", version, about = "CRM call statuses, grouped and cached")]
struct Cli {
    /// An extra configuration file layered over config/default.toml
    /// (also CALLBOARD_CONFIG).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API.
    Serve,
    /// Run the projector: follow MongoDB's change streams into Redis.
    Project,
    /// Serve the API and run the projector in one process.
    Run,
    /// Create the indexes of the specification (idempotent).
    CreateIndexes,
    /// Generate deterministic demo or benchmark data.
    Seed {
        #[arg(long, default_value_t = 10)]
        tenants: u32,
        #[arg(long, default_value_t = 10_000)]
        calls: u64,
        #[arg(long, default_value_t = 100)]
        users: u32,
        #[arg(long, default_value_t = 5)]
        statuses: u32,
        /// Random seed: the same seed gives the same data.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Drop `calls`, `users` and `call_status` first. Without it, seed
        /// refuses to write into a database that holds any of them.
        #[arg(long)]
        drop: bool,
    },
    /// Show the projector, the history window and each tenant's state
    /// (GET /admin/cache/status of a running API).
    Status {
        #[arg(long)]
        tenant: Option<i64>,
        #[command(flatten)]
        endpoint: ops::Endpoint,
    },
    /// Warm one tenant or all, following the job to its end.
    Warm {
        #[command(flatten)]
        target: ops::Target,
        /// Give up following the job after this long (it goes on).
        #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
        wait: Duration,
        #[command(flatten)]
        endpoint: ops::Endpoint,
    },
    /// Drop one tenant's cached data, or every tenant's: answered live
    /// until warmed again.
    Invalidate {
        #[command(flatten)]
        target: ops::Target,
        #[command(flatten)]
        endpoint: ops::Endpoint,
    },
    /// Compare a tenant's cached answer with MongoDB's now (exit status 1
    /// if they differ, 3 if nothing could be compared).
    Verify {
        #[arg(long)]
        tenant: i64,
        #[command(flatten)]
        endpoint: ops::Endpoint,
    },
    /// Print a signed bearer token.
    Token {
        #[arg(long)]
        tenant: i64,
        /// Give the token `role: "admin"`.
        #[arg(long)]
        admin: bool,
        /// How long the token is valid, e.g. 1h, 30m, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

fn main() -> anyhow::Result<()> {
    let without_huge_pages = callboard_alloc::without_huge_pages();
    let cli = Cli::parse();
    // The operator commands are clients of a running API: no settings.
    let operator = match &cli.command {
        Command::Status { tenant, endpoint } => Some(ops::Operation::Status(*tenant, endpoint.clone())),
        Command::Warm { target, wait, endpoint } => Some(ops::Operation::Warm(target.clone(), *wait, endpoint.clone())),
        Command::Invalidate { target, endpoint } => Some(ops::Operation::Invalidate(target.clone(), endpoint.clone())),
        Command::Verify { tenant, endpoint } => Some(ops::Operation::Verify(*tenant, endpoint.clone())),
        _ => None,
    };
    if let Some(operation) = operator {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        // One line for an operator, without a backtrace.
        if let Err(e) = runtime.block_on(operation.run()) {
            eprintln!("error: {e:#}");
            std::process::exit(if e.is::<ops::NotCompared>() { 3 } else { 1 });
        }
        return Ok(());
    }
    let settings = Settings::from_env(cli.config.as_deref())?;
    if !matches!(cli.command, Command::Token { .. }) {
        let format = match settings.log.format {
            LogFormat::Text => callboard_telemetry::Format::Text,
            LogFormat::Json => callboard_telemetry::Format::Json,
        };
        callboard_telemetry::init(&settings.log.filter, format)?;
        if !without_huge_pages {
            tracing::warn!(
                "the kernel refused PR_SET_THP_DISABLE: running with transparent huge pages (slower; ADR 0015)"
            );
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(cli.command, settings))
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Serve => serve(settings).await,
        Command::Project => project(settings).await,
        Command::Run => run_both(settings).await,
        Command::CreateIndexes => create_indexes(settings).await,
        Command::Seed { tenants, calls, users, statuses, seed, drop } => {
            seed_data(settings, seed::SeedPlan { tenants, calls, users, statuses, seed }, drop).await
        }
        Command::Status { .. } | Command::Warm { .. } | Command::Invalidate { .. } | Command::Verify { .. } => {
            unreachable!("operator commands run without settings")
        }
        Command::Token { tenant, admin, ttl } => {
            let tenant = TenantId::new(tenant)?;
            let keys = callboard_api::jwt_keys(&settings)?;
            println!("{}", keys.mint(tenant, admin, ttl));
            Ok(())
        }
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let app = Application::build(&settings).await?;
    tracing::info!(addr = %settings.http.addr, port = app.port(), "API listening");
    let stopper = app.stopper();
    let server = tokio::spawn(app.run_until_stopped());
    shutdown_signal().await;
    stopper.stop(shutdown_signal()).await;
    server.await.context("API task")??;
    Ok(())
}

async fn projector(settings: &Settings, db: mongodb::Database) -> anyhow::Result<Projector> {
    let config = ProjectorConfig {
        batch_max: settings.projector.batch_max,
        lease_ttl: Duration::from_millis(settings.projector.lease_ttl_ms),
        partitions: settings.projector.partitions,
        watermark_collection: Some(settings.projector.watermark_collection.clone()).filter(|c| !c.is_empty()),
        watermark_interval: Duration::from_millis(settings.projector.watermark_interval_ms),
        history_warn_share: settings.projector.history_warn_share,
        reconcile: (settings.reconcile.interval_s > 0)
            .then(|| -> anyhow::Result<ReconcileConfig> {
                let calls =
                    settings.query.max_limit()?.min(settings.projector.doc_window.min(u64::from(u32::MAX)) as u32);
                Ok(ReconcileConfig {
                    interval: Duration::from_secs(settings.reconcile.interval_s),
                    max_queries_per_s: f64::from(settings.reconcile.max_queries_per_s),
                    calls: callboard_domain::Limit::new(i64::from(calls), calls)?,
                    live_timeout: Duration::from_millis(settings.query.live_timeout_ms),
                })
            })
            .transpose()?,
        doc_window: DocWindow {
            size: settings.projector.doc_window,
            floor: settings.projector.doc_window.min(u64::from(settings.query.max_limit()?)),
        },
        ..ProjectorConfig::default()
    };
    Ok(Projector::new(
        db,
        settings.redis.connect().await?,
        Keys::new(&settings.redis.key_prefix),
        settings.query.user_fields()?,
        config,
    ))
}

async fn project(settings: Settings) -> anyhow::Result<()> {
    refuse_eviction(&settings).await?;
    let db = settings.mongodb.database().await?;
    let projector = projector(&settings, db).await?;
    projector.run(shutdown_signal()).await?;
    Ok(())
}

/// A projector must not write into a Redis that may drop keys on its own.
async fn refuse_eviction(settings: &Settings) -> anyhow::Result<()> {
    Ok(callboard_readmodel::refuse_eviction(&settings.redis.connect().await?).await?)
}

/// API and projector in one process: both stop on the first signal; if
/// either ends on its own, the other is stopped and the reason reported.
async fn run_both(settings: Settings) -> anyhow::Result<()> {
    refuse_eviction(&settings).await?;
    let app = Application::build(&settings).await?;
    tracing::info!(addr = %settings.http.addr, port = app.port(), "API listening");
    let stopper = app.stopper();
    let projector = projector(&settings, settings.mongodb.database().await?).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut projector_stop = stop_rx.clone();
    let projector_task = tokio::spawn(projector.run(async move {
        let _ = projector_stop.wait_for(|s| *s).await;
    }));
    let api_task = tokio::spawn(app.run_until_stopped());
    tokio::pin!(projector_task, api_task);
    let mut projector_done = false;
    tokio::select! {
        _ = shutdown_signal() => {}
        r = &mut api_task => tracing::error!(outcome = ?r, "API stopped on its own"),
        r = &mut projector_task => {
            tracing::error!(outcome = ?r, "projector stopped on its own");
            projector_done = true;
        }
    }
    // The projector hands its leases over at once, while the API drains.
    let _ = stop_tx.send(true);
    let projector = async {
        if !projector_done {
            if let Ok(Err(e)) = (&mut projector_task).await {
                tracing::warn!(error = %e, "projector stopped with an error");
            }
        }
    };
    tokio::join!(stopper.stop(shutdown_signal()), projector);
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn create_indexes(settings: Settings) -> anyhow::Result<()> {
    let db = settings.mongodb.database().await?;
    let results = indexes::ensure(&db).await.context("creating indexes")?;
    for r in &results {
        let verb = match r.outcome {
            indexes::Outcome::Created => "created",
            indexes::Outcome::Existed => "exists ",
        };
        println!("{verb} {}.{}", r.collection, indexes::index_name(&r.keys));
    }
    let created = results.iter().filter(|r| r.outcome == indexes::Outcome::Created).count();
    println!("{created} created, {} already existed", results.len() - created);
    Ok(())
}

async fn seed_data(settings: Settings, plan: seed::SeedPlan, drop: bool) -> anyhow::Result<()> {
    let db = settings.mongodb.database().await?;
    let bar = indicatif::ProgressBar::new(plan.calls);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} calls {bar:40} {pos}/{len} ({per_sec}, eta {eta})")
            .expect("static template")
            .progress_chars("=> "),
    );
    let started = std::time::Instant::now();
    let report = seed::load(&db, &plan, drop, |n| bar.set_position(n)).await?;
    bar.finish_and_clear();
    println!(
        "seeded {} calls, {} users, {} statuses across {} tenants into {} in {:.1}s",
        report.calls,
        report.users,
        report.statuses,
        plan.tenants,
        db.name(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
