//! Prometheus metrics. Request latency is measured here; the projector's
//! figures are read from Redis at scrape time, so any API process reports
//! them whichever process runs the projector.

use std::time::Duration;

use callboard_readmodel::{Lookup, ReadModel};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::state::CacheOutcome;

/// Every metric name, in one place.
pub mod names {
    pub const GROUPED_SECONDS: &str = "callboard_grouped_request_duration_seconds";
    pub const EVENTS_APPLIED: &str = "callboard_projector_events_applied";
    pub const LAG_MS: &str = "callboard_projection_lag_ms";
    pub const WARMS: &str = "callboard_warms_run";
    pub const HISTORY_LOST: &str = "callboard_history_lost";
    pub const WINDOW_REFILLS: &str = "callboard_window_refills";
    pub const TENANTS: &str = "callboard_tenants";
    pub const MISSES: &str = "callboard_cache_misses";
    pub const WRITES_LOST: &str = "callboard_redis_writes_lost";
    pub const LIVE_QUERIES: &str = "callboard_live_queries_total";
    pub const LIVE_COALESCED: &str = "callboard_live_coalesced_total";
    pub const LIVE_REJECTED: &str = "callboard_live_rejected_total";
    pub const REDIS_NOEVICTION: &str = "callboard_redis_noeviction";
    pub const POISON_EVENTS: &str = "callboard_poison_events_total";
    pub const FRESHNESS_WAIT: &str = "callboard_freshness_wait_seconds";
    pub const CHECKPOINT_AGE: &str = "callboard_checkpoint_age_seconds";
    pub const HISTORY_WINDOW: &str = "callboard_history_window_seconds";
    pub const HISTORY_AT_RISK: &str = "callboard_history_at_risk";
    pub const RECONCILE_DRIFT: &str = "callboard_reconcile_drift_total";
    pub const RECONCILE_CHECKS: &str = "callboard_reconcile_checks_total";
    pub const STREAM_CONNECTIONS: &str = "callboard_stream_connections";
    pub const STREAM_EVENTS: &str = "callboard_stream_events_total";
    pub const RESPONSE_CACHE_LOOKUPS: &str = "callboard_response_cache_lookups_total";
    pub const RESPONSE_CACHE_BYTES: &str = "callboard_response_cache_bytes";
    pub const RESPONSE_CACHE_ENTRIES: &str = "callboard_response_cache_entries";
    pub const RESPONSE_CACHE_REUSES: &str = "callboard_response_cache_reuses_total";
}

/// How often an API process recounts its tenants by state.
pub const TENANT_COUNT_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `grouped`'s two series, found once rather than by label per request.
    grouped_by_outcome: (prometheus::Histogram, prometheus::Histogram),
    events_applied: IntGauge,
    lag_ms: IntGauge,
    warms: IntGauge,
    history_lost: IntGauge,
    window_refills: IntGauge,
    writes_lost: IntGauge,
    poison_events: IntGauge,
    tenants: IntGaugeVec,
    misses: IntCounterVec,
    live_queries: IntCounter,
    live_coalesced: IntCounter,
    live_rejected: IntCounterVec,
    noeviction: IntGauge,
    freshness_wait: HistogramVec,
    checkpoint_age: IntGauge,
    history_window: IntGauge,
    history_at_risk: IntGauge,
    drift: IntCounterVec,
    checks: IntCounter,
    stream_connections: IntGauge,
    stream_events: IntCounter,
    answer_lookups: IntCounterVec,
    answer_reuses: IntCounterVec,
    answer_bytes: IntGauge,
    answer_entries: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let buckets = vec![0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
        let grouped = HistogramVec::new(
            HistogramOpts::new(names::GROUPED_SECONDS, "get-grouped-by-status latency, by cache outcome")
                .buckets(buckets),
            &["cache"],
        )
        .expect("valid histogram");
        let grouped_by_outcome = (
            grouped.with_label_values(&[CacheOutcome::Hit.as_str()]),
            grouped.with_label_values(&[CacheOutcome::Miss.as_str()]),
        );
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid gauge");
        let events_applied = gauge(names::EVENTS_APPLIED, "change events read and applied by the projectors, summed over partitions (each partition reads every event)");
        let lag_ms = gauge(names::LAG_MS, "commit-to-apply lag of the last applied batch, ms");
        let warms = gauge(names::WARMS, "tenant warms completed (total)");
        let history_lost = gauge(names::HISTORY_LOST, "times the change stream history was lost (total)");
        let window_refills =
            gauge(names::WINDOW_REFILLS, "document windows refilled from MongoDB by the projectors (total)");
        let writes_lost = gauge(
            names::WRITES_LOST,
            "times a Redis master held less than a projector checkpoint claimed, and the partition was rebuilt (total)",
        );
        let poison_events = gauge(
            names::POISON_EVENTS,
            "change events whose write Redis rejected every time, each quarantining its tenant (total)",
        );
        let noeviction = gauge(
            names::REDIS_NOEVICTION,
            "1 while Redis was last seen with maxmemory-policy noeviction on every master; 0 means it may drop keys (or is unknown) and every answer is live",
        );
        let checkpoint_age = gauge(
            names::CHECKPOINT_AGE,
            "how far behind now the oldest partition checkpoint stands, s (-1: not every partition has one)",
        );
        let history_window = gauge(
            names::HISTORY_WINDOW,
            "how much history MongoDB keeps (now less the oldest oplog entry), s (-1: unknown)",
        );
        let history_at_risk = gauge(
            names::HISTORY_AT_RISK,
            "1 while the oldest checkpoint's age is past projector.history_warn_share of the history window",
        );
        let tenants =
            IntGaugeVec::new(Opts::new(names::TENANTS, "tenants by read-model state"), &["state"]).expect("valid");
        for c in [
            &events_applied,
            &lag_ms,
            &warms,
            &history_lost,
            &window_refills,
            &writes_lost,
            &poison_events,
            &noeviction,
            &checkpoint_age,
            &history_window,
            &history_at_risk,
        ] {
            registry.register(Box::new(c.clone())).expect("unique metric");
        }
        registry.register(Box::new(grouped.clone())).expect("unique metric");
        registry.register(Box::new(tenants.clone())).expect("unique metric");
        let misses = IntCounterVec::new(
            Opts::new(
                names::MISSES,
                "answers given live, by reason (cold, format, short_window, retries_exhausted, redis_error, bypass, redis_may_evict, min_as_of: the wait for the projector ran out, stale: older than max_staleness_ms, rebuilding: partition 0 is loading the users and statuses again)",
            ),
            &["reason"],
        )
        .expect("valid counter");
        registry.register(Box::new(misses.clone())).expect("unique metric");
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid counter");
        let live_queries = counter(names::LIVE_QUERIES, "live aggregations this process ran against MongoDB");
        let live_coalesced = counter(
            names::LIVE_COALESCED,
            "live requests answered by joining an identical aggregation already running",
        );
        let live_rejected = IntCounterVec::new(
            Opts::new(names::LIVE_REJECTED, "live queries refused, by reason (busy: no slot in time; timeout)"),
            &["reason"],
        )
        .expect("valid counter");
        registry.register(Box::new(live_queries.clone())).expect("unique metric");
        registry.register(Box::new(live_coalesced.clone())).expect("unique metric");
        registry.register(Box::new(live_rejected.clone())).expect("unique metric");
        let freshness_wait = HistogramVec::new(
            HistogramOpts::new(
                names::FRESHNESS_WAIT,
                "time a min_as_of request waited for the projector, by outcome (met: answered from the cache; timed_out: answered live)",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
            &["outcome"],
        )
        .expect("valid histogram");
        registry.register(Box::new(freshness_wait.clone())).expect("unique metric");
        let drift = IntCounterVec::new(
            Opts::new(
                names::RECONCILE_DRIFT,
                "differences between a cached answer and MongoDB's that verification (the projectors' background verifier and POST /admin/cache/verify, in every process) found and repaired, by kind (status, count, order, document, user)",
            ),
            &["kind"],
        )
        .expect("valid counter");
        for kind in callboard_reconcile::Kind::ALL {
            drift.with_label_values(&[kind]);
        }
        registry.register(Box::new(drift.clone())).expect("unique metric");
        let checks = counter(
            names::RECONCILE_CHECKS,
            "verifications that compared a tenant's cached answer with MongoDB's (in every process)",
        );
        registry.register(Box::new(checks.clone())).expect("unique metric");
        let stream_connections =
            gauge(names::STREAM_CONNECTIONS, "GET /crm/calls/stream connections this process holds open");
        let stream_events = counter(names::STREAM_EVENTS, "board events this process sent to stream connections");
        registry.register(Box::new(stream_connections.clone())).expect("unique metric");
        registry.register(Box::new(stream_events.clone())).expect("unique metric");
        let answer_lookups = IntCounterVec::new(
            Opts::new(
                names::RESPONSE_CACHE_LOOKUPS,
                "reads of the grouped answer from Redis (cold tenants included), by what this process's response cache held: hit (a kept answer reused), stale (one kept, read again), absent (none kept, or the tenant not warm); a read that waits for min_as_of counts twice",
            ),
            &["result"],
        )
        .expect("valid counter");
        let answer_reuses = IntCounterVec::new(
            Opts::new(
                names::RESPONSE_CACHE_REUSES,
                "kept answers reused (the hits of callboard_response_cache_lookups_total), by how they were found current: tracking (with no round trip: Redis's tracking vouched for them, query.response_cache_track_ms), label_read (after one read of their label)",
            ),
            &["check"],
        )
        .expect("valid counter");
        let answer_bytes = gauge(
            names::RESPONSE_CACHE_BYTES,
            "bytes of rendered answers this process keeps (query.response_cache_mb)",
        );
        let answer_entries = gauge(names::RESPONSE_CACHE_ENTRIES, "rendered answers this process keeps");
        registry.register(Box::new(answer_lookups.clone())).expect("unique metric");
        registry.register(Box::new(answer_reuses.clone())).expect("unique metric");
        registry.register(Box::new(answer_bytes.clone())).expect("unique metric");
        registry.register(Box::new(answer_entries.clone())).expect("unique metric");
        Self {
            registry,
            grouped_by_outcome,
            events_applied,
            lag_ms,
            warms,
            history_lost,
            window_refills,
            writes_lost,
            poison_events,
            tenants,
            misses,
            live_queries,
            live_coalesced,
            live_rejected,
            noeviction,
            freshness_wait,
            checkpoint_age,
            history_window,
            history_at_risk,
            drift,
            checks,
            stream_connections,
            stream_events,
            answer_lookups,
            answer_reuses,
            answer_bytes,
            answer_entries,
        }
    }

    /// Counts one lookup of the response cache (its observer).
    pub fn answer_lookup_observer(&self) -> callboard_readmodel::LookupObserver {
        let result = |l: Lookup| self.answer_lookups.with_label_values(&[l.as_str()]);
        let check = |c: &str| self.answer_reuses.with_label_values(&[c]);
        let (hit, stale, absent) = (result(Lookup::Hit), result(Lookup::Stale), result(Lookup::Absent));
        let (tracking, label_read) = (check("tracking"), check("label_read"));
        std::sync::Arc::new(move |lookup| match lookup {
            Lookup::Tracked => {
                hit.inc();
                tracking.inc();
            }
            Lookup::Hit => {
                hit.inc();
                label_read.inc();
            }
            Lookup::Stale => stale.inc(),
            Lookup::Absent => absent.inc(),
        })
    }

    pub fn stream_opened(&self) {
        self.stream_connections.inc();
    }

    pub fn stream_closed(&self) {
        self.stream_connections.dec();
    }

    pub fn observe_stream_event(&self) {
        self.stream_events.inc();
    }

    pub fn observe_freshness_wait(&self, met: bool, waited: Duration) {
        let outcome = if met { "met" } else { "timed_out" };
        self.freshness_wait.with_label_values(&[outcome]).observe(waited.as_secs_f64());
    }

    /// Counts the tenants by state (a read per tenant): run every
    /// [`TENANT_COUNT_EVERY`] by a background task, never by a scrape.
    pub async fn refresh_tenant_counts(&self, cache: &ReadModel) {
        if let Ok(states) = cache.tenant_states().await {
            for state in ["warming", "warm", "quarantined"] {
                self.tenants
                    .with_label_values(&[state])
                    .set(states.values().filter(|s| s.name() == state).count() as i64);
            }
        }
    }

    pub fn observe_live_started(&self) {
        self.live_queries.inc();
    }

    pub fn observe_live_coalesced(&self) {
        self.live_coalesced.inc();
    }

    pub fn observe_live_rejected(&self, reason: &str) {
        self.live_rejected.with_label_values(&[reason]).inc();
    }

    pub fn observe_miss(&self, reason: &str) {
        self.misses.with_label_values(&[reason]).inc();
    }

    pub fn observe_grouped(&self, outcome: CacheOutcome, elapsed: Duration) {
        let (hit, miss) = &self.grouped_by_outcome;
        match outcome {
            CacheOutcome::Hit => hit,
            CacheOutcome::Miss => miss,
        }
        .observe(elapsed.as_secs_f64());
    }

    /// The text exposition, with the projector's figures refreshed (a few
    /// single-key reads; nothing per tenant).
    pub async fn render(&self, cache: &ReadModel, noeviction: bool, history: (u32, f64)) -> String {
        self.noeviction.set(i64::from(noeviction));
        if let Some((bytes, entries)) = cache.answer_cache_size() {
            self.answer_bytes.set(bytes as i64);
            self.answer_entries.set(entries as i64);
        }
        if let Ok(h) = cache.history_window(history.0, history.1).await {
            self.checkpoint_age.set(h.checkpoint_age_ms.map_or(-1, |ms| ms / 1000));
            self.history_window.set(h.window_ms.map_or(-1, |ms| ms / 1000));
            self.history_at_risk.set(i64::from(h.at_risk));
        }
        if let Ok(p) = cache.progress().await {
            self.events_applied.set(p.events_applied as i64);
            self.lag_ms.set(p.lag_ms.unwrap_or(0));
        }
        if let Ok(counters) = cache.progress_counters().await {
            self.warms.set(counters.warms);
            self.history_lost.set(counters.history_lost);
            self.window_refills.set(counters.window_refills);
            self.writes_lost.set(counters.writes_lost);
            self.poison_events.set(counters.poison_events);
            // Counted in Redis by whichever process verified; a counter
            // here only moves forward, to the total Redis holds.
            let forward = |c: &IntCounter, total: i64| c.inc_by((total.max(0) as u64).saturating_sub(c.get()));
            forward(&self.checks, counters.reconcile_checks);
            for (kind, total) in &counters.reconcile_drift {
                forward(&self.drift.with_label_values(&[kind]), *total);
            }
        }
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
