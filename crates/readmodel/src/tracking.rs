//! Reuse without a round trip: server-assisted tracking of the label keys
//! (RESP3 `CLIENT TRACKING`, single node). The label reads of
//! [`crate::answers`] go over one connection with tracking on, so Redis
//! remembers which label keys this process read and pushes an
//! `invalidate` on that same connection when any of them changes. A label
//! read there *confirms* a tenant's label; the confirmation holds until an
//! invalidation of one of the tenant's keys (or of a shared key, or the
//! connection's loss) is processed. A kept answer whose label is the
//! confirmed one is then reused with no round trip at all.
//!
//! How fresh such an answer is comes from a heartbeat: a `PING` on the
//! same connection every half of `query.response_cache_track_ms`. Redis
//! writes replies and pushes to a connection in the order it runs the
//! commands, and the client hands each push over (synchronously, in that
//! order) before it completes any later reply. So when the reply to a
//! `PING` sent at instant *p* is in, every invalidation for a write Redis
//! ran before *p* has been processed: an answer whose confirmation still
//! holds then reflects Redis at *p* or later. It is reused only while the
//! latest such *p* is no older than the bound, and no older than the
//! instant the caller names (the read of the watermark it will claim);
//! otherwise the label is read as before. docs/ARCHITECTURE.md ("Reusing
//! rendered answers") gives the whole argument.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use callboard_domain::TenantId;
use redis::aio::MultiplexedConnection;
use redis::{PushInfo, PushKind, Value};

use crate::answers::Label;
use crate::{Keys, ReadModelError};

/// The tracking connection's name in `CLIENT LIST`.
pub const CLIENT_NAME: &str = "callboard-tracking";

/// The tracking connection and what it has vouched for. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Tracking {
    shared: Arc<Shared>,
}

struct Shared {
    client: redis::Client,
    keys: Keys,
    /// `query.response_cache_track_ms`.
    bound: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Numbers each connection; bumped when one is made and when it is
    /// lost, so nothing from an older one counts.
    epoch: u64,
    /// The connection of `epoch`, once tracking is on; `None` while down.
    conn: Option<MultiplexedConnection>,
    /// Bumped by an invalidation that is not of one tenant's key (a shared
    /// key, a flush) and with every epoch: it voids every confirmation.
    global: u64,
    /// Bumped by each invalidation of a tenant's key. Never removed (a
    /// counter back at zero could match a stamp taken before).
    tenants: HashMap<TenantId, u64>,
    /// The label each tenant was last confirmed at, while it holds.
    confirmed: HashMap<TenantId, Label>,
    /// When the latest heartbeat answered on this epoch's connection was
    /// sent: every invalidation of a write Redis ran before it is in.
    vouched: Option<Instant>,
}

/// Where a tenant's invalidations stood when a label read was sent: a
/// confirmation is kept only if none came since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    global: u64,
    tenant: u64,
}

impl State {
    fn stamp(&self, tenant: TenantId) -> Stamp {
        Stamp { global: self.global, tenant: self.tenants.get(&tenant).copied().unwrap_or(0) }
    }

    fn void(&mut self, tenant: TenantId) {
        *self.tenants.entry(tenant).or_insert(0) += 1;
        self.confirmed.remove(&tenant);
    }

    fn void_all(&mut self) {
        self.global += 1;
        self.confirmed.clear();
    }

    /// A connection is gone (or a new one begins): nothing it vouched for
    /// holds any more.
    fn new_epoch(&mut self) -> u64 {
        self.epoch += 1;
        self.void_all();
        self.conn = None;
        self.vouched = None;
        self.epoch
    }
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Tracking {
    /// Starts the connection and its heartbeat on the current runtime; they
    /// stop when the last clone is dropped. `client` is switched to RESP3.
    pub(crate) fn spawn(client: &redis::Client, keys: Keys, bound: Duration) -> Result<Self, ReadModelError> {
        let info = client.get_connection_info().clone();
        let resp3 = info.redis_settings().clone().set_protocol(redis::ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(resp3))?;
        let shared = Arc::new(Shared { client, keys, bound, state: Mutex::default() });
        tokio::spawn(heartbeat(Arc::downgrade(&shared)));
        Ok(Self { shared })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state()
    }

    /// Whether an answer kept at `label` may be reused with no round trip:
    /// the tenant's label is confirmed as `label`, and the latest
    /// heartbeat vouches for a moment no older than `not_before` and the
    /// bound.
    pub(crate) fn vouches(&self, tenant: TenantId, label: &Label, not_before: Instant) -> bool {
        let state = self.state();
        let Some(vouched) = state.vouched else { return false };
        vouched >= not_before
            && vouched.elapsed() <= self.shared.bound
            && state.confirmed.get(&tenant).is_some_and(|confirmed| confirmed == label)
    }

    /// The connection to read `tenant`'s label on, and the stamp to
    /// confirm it with; `None` while the connection is down.
    pub(crate) fn begin(&self, tenant: TenantId) -> Option<(MultiplexedConnection, Stamp)> {
        let state = self.state();
        Some((state.conn.clone()?, state.stamp(tenant)))
    }

    /// Confirms `label`, read over [`Self::begin`]'s connection, unless an
    /// invalidation (or the connection's loss) came since `stamp`.
    pub(crate) fn confirm(&self, tenant: TenantId, stamp: Stamp, label: &Label) {
        let mut state = self.state();
        if state.stamp(tenant) == stamp {
            state.confirmed.insert(tenant, label.clone());
        }
    }

    /// Voids `tenant`'s confirmation now, as its invalidation will: for a
    /// write this process made, so that its own next read cannot precede
    /// the push.
    pub(crate) fn void(&self, tenant: TenantId) {
        self.state().void(tenant);
    }

    /// Forgets the connection of `epoch` if it is still the current one.
    fn lost(shared: &Shared, epoch: u64) {
        let mut state = shared.state();
        if state.epoch == epoch {
            state.new_epoch();
            tracing::warn!("the response cache's tracking connection was lost; reconnecting");
        }
    }
}

/// Applies one push from the tracking connection: an invalidation voids
/// the confirmations of what it names; the connection's end voids all.
fn on_push(shared: &Shared, epoch: u64, push: PushInfo) {
    match push.kind {
        PushKind::Invalidate => {
            let mut state = shared.state();
            let keys = match push.data.into_iter().next() {
                Some(Value::Array(keys)) => keys,
                // `Nil`: a flush, everything.
                _ => Vec::new(),
            };
            let tenants: Option<Vec<TenantId>> = keys
                .iter()
                .map(|key| match key {
                    Value::BulkString(bytes) => std::str::from_utf8(bytes).ok().and_then(|k| shared.keys.tenant_of(k)),
                    _ => None,
                })
                .collect();
            match tenants.filter(|t| !t.is_empty()) {
                Some(tenants) => {
                    for tenant in tenants {
                        state.void(tenant);
                    }
                }
                None => state.void_all(),
            }
        }
        PushKind::Disconnection => Tracking::lost(shared, epoch),
        _ => {}
    }
}

/// How long to wait before connecting again after a failure.
const RETRY: Duration = Duration::from_millis(200);

/// Connects (again, after a loss) and sends the heartbeat, until the
/// tracking is dropped.
async fn heartbeat(shared: Weak<Shared>) {
    let mut failing = false;
    loop {
        let Some(strong) = shared.upgrade() else { return };
        let beat = (strong.bound / 2).max(Duration::from_millis(1));
        let current = {
            let state = strong.state();
            state.conn.clone().map(|c| (state.epoch, c))
        };
        let pause = match current {
            Some((epoch, mut conn)) => {
                let sent = Instant::now();
                let reply: Result<Value, _> = redis::cmd("PING").query_async(&mut conn).await;
                let mut state = strong.state();
                match reply {
                    Ok(_) => {
                        if state.epoch == epoch {
                            state.vouched = state.vouched.max(Some(sent));
                        }
                        beat
                    }
                    Err(e) => {
                        if !failing {
                            tracing::warn!(error = %e, "the response cache's tracking connection failed; reconnecting");
                        }
                        failing = true;
                        if state.epoch == epoch {
                            state.new_epoch();
                        }
                        RETRY
                    }
                }
            }
            None => match connect(&strong).await {
                Ok(()) => {
                    if failing {
                        tracing::info!("the response cache's tracking connection is back");
                    }
                    failing = false;
                    Duration::ZERO
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "no tracking connection for the response cache; every reuse reads the label");
                    }
                    failing = true;
                    RETRY
                }
            },
        };
        drop(strong);
        tokio::time::sleep(pause).await;
    }
}

/// A new connection of a new epoch, with tracking on.
async fn connect(shared: &Arc<Shared>) -> Result<(), ReadModelError> {
    let epoch = shared.state().new_epoch();
    let weak = Arc::downgrade(shared);
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(1)))
        .set_push_sender(move |push: PushInfo| {
            if let Some(shared) = weak.upgrade() {
                on_push(&shared, epoch, push);
            }
            Ok::<(), std::convert::Infallible>(())
        });
    let mut conn = shared.client.get_multiplexed_async_connection_with_config(&config).await?;
    let _: Value = redis::cmd("CLIENT").arg("SETNAME").arg(CLIENT_NAME).query_async(&mut conn).await?;
    let _: Value = redis::cmd("CLIENT").arg("TRACKING").arg("ON").query_async(&mut conn).await?;
    // A Redis still loading its data accepts the above but not a PING:
    // not up yet.
    let _: Value = redis::cmd("PING").query_async(&mut conn).await?;
    let mut state = shared.state();
    if state.epoch != epoch {
        // Lost while it was being set up.
        return Err(ReadModelError::Config("the tracking connection closed while it was set up".into()));
    }
    state.conn = Some(conn);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        Shared {
            client: redis::Client::open("redis://127.0.0.1:1").unwrap(),
            keys: Keys::new("cb"),
            bound: Duration::from_secs(60),
            state: Mutex::default(),
        }
    }

    fn invalidate(keys: &[String]) -> PushInfo {
        let keys = keys.iter().map(|k| Value::BulkString(k.clone().into_bytes())).collect();
        PushInfo { kind: PushKind::Invalidate, data: vec![Value::Array(keys)] }
    }

    fn label(version: &str) -> Label {
        let mut label = Label::default();
        label.tenant.version = Some(version.into());
        label
    }

    /// A heartbeat older than the bound vouches for nothing.
    #[test]
    fn only_a_recent_heartbeat_vouches() {
        let shared = Arc::new(Shared { bound: Duration::from_secs(1), ..shared() });
        let tracking = Tracking { shared: shared.clone() };
        let a = TenantId::new(1).unwrap();
        shared.state().new_epoch();
        let stamp = tracking.state().stamp(a);
        tracking.confirm(a, stamp, &label("1"));
        let long_ago = Instant::now().checked_sub(Duration::from_secs(2)).unwrap();
        shared.state().vouched = Some(long_ago);
        assert!(!tracking.vouches(a, &label("1"), long_ago), "2 s old, against a 1 s bound");
        shared.state().vouched = Some(Instant::now());
        assert!(tracking.vouches(a, &label("1"), long_ago));
    }

    /// What each push voids, and that a confirmation taken before an
    /// invalidation is not kept after it.
    #[test]
    fn invalidations_void_exactly_what_they_name() {
        let shared = Arc::new(shared());
        let tracking = Tracking { shared: shared.clone() };
        let (a, b) = (TenantId::new(1).unwrap(), TenantId::new(2).unwrap());
        let now = Instant::now();
        let epoch = shared.state().new_epoch();
        shared.state().vouched = Some(now);
        let confirm = |t, l: &Label| {
            let stamp = tracking.state().stamp(t);
            tracking.confirm(t, stamp, l);
        };
        confirm(a, &label("1"));
        confirm(b, &label("1"));
        assert!(tracking.vouches(a, &label("1"), now));
        assert!(!tracking.vouches(a, &label("2"), now), "another label");
        assert!(!tracking.vouches(a, &label("1"), now + Duration::from_millis(1)), "a heartbeat before the watermark");

        on_push(&shared, epoch, invalidate(&[shared.keys.version(a)]));
        assert!(!tracking.vouches(a, &label("1"), now), "a's key changed");
        assert!(tracking.vouches(b, &label("1"), now), "b's did not");

        // A read sent before an invalidation confirms nothing after it.
        let stamp = tracking.state().stamp(a);
        on_push(&shared, epoch, invalidate(&[shared.keys.state(a)]));
        tracking.confirm(a, stamp, &label("1"));
        assert!(!tracking.vouches(a, &label("1"), now));

        on_push(&shared, epoch, invalidate(&[shared.keys.users_stamp()]));
        assert!(!tracking.vouches(b, &label("1"), now), "a shared key voids every tenant");
        confirm(b, &label("1"));
        on_push(&shared, epoch, PushInfo { kind: PushKind::Invalidate, data: vec![Value::Nil] });
        assert!(!tracking.vouches(b, &label("1"), now), "a flush voids every tenant");

        confirm(b, &label("1"));
        on_push(&shared, epoch + 1, PushInfo { kind: PushKind::Disconnection, data: vec![] });
        assert!(tracking.vouches(b, &label("1"), now), "another connection's end changes nothing");
        on_push(&shared, epoch, PushInfo { kind: PushKind::Disconnection, data: vec![] });
        assert!(!tracking.vouches(b, &label("1"), now), "the connection's end voids everything");
        assert!(tracking.begin(b).is_none(), "and leaves no connection");
    }
}
