//! Snapshots: the shared users and statuses (at bootstrap), and one
//! tenant's calls (a warm).
//!
//! Consistency: a tenant's snapshot is loaded a chunk at a time between
//! the stream's batches ([`Load`]); a chunk skips the calls the events
//! applied meanwhile touched, and every other call's later events are
//! applied after its chunk, in order, so the state converges on MongoDB's.
//! A tenant is marked warm only once the stream has caught up past the
//! snapshot's end (docs/ARCHITECTURE.md, "Warm and cold").

use bson::{doc, Document};
use callboard_domain::render::UserFields;
use std::collections::HashMap;

use callboard_domain::{CallId, DocKey, StatusKey, StatusRecord, TenantId};
use callboard_readmodel::codec::{member_parts, user_entry, CallEntry, Place};
use callboard_readmodel::write::{status_place, GlobalOp, Plan, TenantOp, Writer};
use callboard_store::{CALLS, CALL_STATUS, USERS};
use futures::TryStreamExt;
use mongodb::Database;

use tracing::warn;

use crate::ProjectorError;

const CHUNK: usize = 1000;

/// Loads the users and statuses of the writer's partition into the read
/// model: the users and global statuses for partition 0, the tenants'
/// own statuses for the partition that owns each tenant.
pub async fn bootstrap_globals(
    db: &Database,
    writer: &Writer,
    fields: &UserFields,
) -> Result<(usize, usize), ProjectorError> {
    let scope = writer.scope();
    let mut plan = Plan::default();
    let n_users = if scope.owns_globals() { load_users(db, writer, fields, &mut plan).await? } else { 0 };
    let mut statuses = db.collection::<Document>(CALL_STATUS).find(doc! {}).batch_size(CHUNK as u32).await?;
    let mut n_statuses = 0;
    while let Some(status) = statuses.try_next().await? {
        let Some(record) = StatusRecord::from_document(&status) else { continue };
        if !scope.owns_status_place(&status_place(record.tenant)) {
            continue;
        }
        let json = serde_json::to_string(&record).unwrap_or_default();
        plan.global.push(GlobalOp::status_loc(record.doc.clone(), [&status_place(record.tenant)]));
        match record.tenant {
            Some(t) => plan.tenants.entry(t).or_default().push(TenantOp::PutStatus { doc: record.doc, json }),
            None => plan.global.push(GlobalOp::PutGlobalStatus(record.doc, json)),
        }
        n_statuses += 1;
    }
    writer.apply(&plan).await?;
    Ok((n_users, n_statuses))
}

/// Every user, into `plan` (applied every 1,000 users).
async fn load_users(
    db: &Database,
    writer: &Writer,
    fields: &UserFields,
    plan: &mut Plan,
) -> Result<usize, ProjectorError> {
    let mut users = db.collection::<Document>(USERS).find(doc! {}).batch_size(CHUNK as u32).await?;
    let mut n_users = 0;
    while let Some(user) = users.try_next().await? {
        let Some(key) = user.get("_id").map(callboard_domain::DocKey::from_bson) else { continue };
        if let Some((id, json)) = user_entry(&user, fields) {
            plan.global.push(GlobalOp::PutUser(id, json));
            plan.global.push(GlobalOp::user_loc(key, [id]));
            n_users += 1;
        }
        if plan.global.len() >= 2 * CHUNK {
            writer.apply(&std::mem::take(plan)).await?;
        }
    }
    Ok(n_users)
}

/// A tenant's snapshot loaded one chunk at a time, between the
/// partition's batches, so that other tenants' events do not wait for a
/// big tenant's warm (the leader loads one chunk per round).
///
/// The stream goes on meanwhile, and its events are applied to the
/// warming tenant as they come. A chunk may then hold a call older than an
/// event already applied (the cursor read it earlier, or the event came
/// late), so a chunk skips every call an event touched since the load
/// began ([`Load::touch`]): that call's state is the last applied event's,
/// and the events after it are still to come, in order. A call no event
/// touched is put from the chunk, and any event for it still to come is
/// applied over it, as after an inline snapshot. The tenant turns warm
/// once the stream is past the end of the load, as before.
///
/// Each chunk is put while the next one is read ([`Load::next_chunk`]), so
/// the source's scan and Redis's writes overlap. A chunk read ahead is
/// filtered when it is put, not when it is read: it skips every call an
/// event touched up to then, as a chunk read at that moment would.
///
/// `S` is where the documents come from: MongoDB's cursor, or any stream
/// of the snapshot's documents (the bench's, from memory).
pub struct Load<S = mongodb::Cursor<Document>> {
    tenant: TenantId,
    cursor: S,
    /// The chunk read while the last one was put.
    ahead: Option<Chunk>,
    touched: Touched,
    calls: u64,
    needy: Vec<(TenantId, StatusKey)>,
}

/// Up to [`CHUNK`] documents' entries, and whether the source ended after them.
struct Chunk {
    entries: Vec<CallEntry>,
    last: bool,
}

impl Load {
    /// Purges the tenant's calls and opens its cursor.
    pub async fn start(db: &Database, writer: &Writer, tenant: TenantId) -> Result<Self, ProjectorError> {
        writer.purge_tenant_calls(tenant).await?;
        let cursor = db
            .collection::<Document>(CALLS)
            .find(doc! {"tenant_id": tenant.get(), "deleted": {"$ne": 1}})
            .batch_size(CHUNK as u32)
            .await?;
        Ok(Self::from_source(tenant, cursor))
    }
}

impl<S> Load<S>
where
    S: futures::Stream<Item = Result<Document, mongodb::error::Error>> + Unpin,
{
    /// A load of `tenant` from `source`, whose calls were purged already.
    pub fn from_source(tenant: TenantId, source: S) -> Self {
        Self { tenant, cursor: source, ahead: None, touched: Default::default(), calls: 0, needy: Vec::new() }
    }

    pub fn tenant(&self) -> TenantId {
        self.tenant
    }

    /// The calls loaded so far.
    pub fn calls(&self) -> u64 {
        self.calls
    }

    /// An event about call `doc` is (being) applied: its chunk copy, if
    /// any, is older or the same, and is skipped.
    pub fn touch(&mut self, doc: DocKey) {
        self.touched.touch(doc);
    }

    /// How many (tenant, status) windows the puts left short so far,
    /// counted once each after the last chunk (whose refill fills them),
    /// possibly more than once before.
    pub fn short_windows(&self) -> usize {
        self.needy.len()
    }

    /// Puts the next chunk, reading the one after it meanwhile; `true`
    /// once the snapshot is complete (its windows refilled from `source`).
    /// After an error the load is abandoned (the leader redoes the warm).
    pub async fn next_chunk(&mut self, source: &impl CallSource, writer: &Writer) -> Result<bool, ProjectorError> {
        let tenant = self.tenant;
        let chunk = match self.ahead.take() {
            Some(chunk) => chunk,
            None => read_chunk(&mut self.cursor, tenant).await?,
        };
        let entries = self.touched.untouched(chunk.entries);
        self.calls += entries.len() as u64;
        if chunk.last {
            self.needy.extend(writer.put_snapshot(tenant, &entries).await?);
            self.needy.sort();
            self.needy.dedup();
            refill_windows(source, writer, &self.needy).await?;
            return Ok(true);
        }
        let (put, next) = futures::join!(writer.put_snapshot(tenant, &entries), read_chunk(&mut self.cursor, tenant));
        self.needy.extend(put?);
        self.ahead = Some(next?);
        Ok(false)
    }
}

/// The next [`CHUNK`] documents of `cursor`: the entries of those in
/// `tenant` (a document that moved out since the scan began is left to
/// its event).
async fn read_chunk<S>(cursor: &mut S, tenant: TenantId) -> Result<Chunk, ProjectorError>
where
    S: futures::Stream<Item = Result<Document, mongodb::error::Error>> + Unpin,
{
    let mut entries = Vec::with_capacity(CHUNK);
    for _ in 0..CHUNK {
        let Some(call) = cursor.try_next().await? else {
            return Ok(Chunk { entries, last: true });
        };
        if let Some(entry) = CallEntry::from_document(&call).filter(|e| e.place.tenant == tenant) {
            entries.push(entry);
        }
    }
    Ok(Chunk { entries, last: false })
}

/// The calls the stream's events changed since a load began: a chunk
/// read before such an event (or after it, but older than the events still
/// to come) must not be put over it ([`Load`]).
#[derive(Debug, Default)]
pub struct Touched(std::collections::HashSet<DocKey>);

impl Touched {
    /// An event about call `doc` is (being) applied.
    pub fn touch(&mut self, doc: DocKey) {
        self.0.insert(doc);
    }

    /// The entries no applied event touched: those a chunk puts.
    pub fn untouched(&self, entries: Vec<CallEntry>) -> Vec<CallEntry> {
        entries.into_iter().filter(|e| !self.0.contains(&e.doc)).collect()
    }
}

/// Where a window refill reads the calls it puts back: MongoDB's `calls`,
/// or any other store of the current documents (the replay tests').
pub trait CallSource: Sync {
    /// The calls among `ids` (`_id` values) that exist, in any order.
    fn calls(
        &self,
        ids: Vec<bson::Bson>,
    ) -> impl std::future::Future<Output = Result<Vec<CallEntry>, ProjectorError>> + Send;
}

impl CallSource for Database {
    async fn calls(&self, ids: Vec<bson::Bson>) -> Result<Vec<CallEntry>, ProjectorError> {
        let mut found = Vec::with_capacity(ids.len());
        let mut cursor =
            self.collection::<Document>(CALLS).find(doc! {"_id": {"$in": ids}}).batch_size(CHUNK as u32).await?;
        while let Some(call) = cursor.try_next().await? {
            found.extend(CallEntry::from_document(&call));
        }
        Ok(found)
    }
}

/// Refills the document windows that fell short (after removals near the
/// top of a status), with the documents as MongoDB has them now, if they
/// still put the call in the member's place. Like `updateLookup`, a
/// refilled document may be newer than the stream's position; the events
/// still to come bring it back in line. A member whose call has moved or
/// gone since stops the refill there: its event is on the way, and the
/// status is refilled again once it lands. Until then reads of the status
/// past that rank go live. Returns how many windows grew.
pub async fn refill_windows(
    source: &impl CallSource,
    writer: &Writer,
    needy: &[(TenantId, StatusKey)],
) -> Result<i64, ProjectorError> {
    let mut grown = 0;
    for (tenant, status) in needy {
        // One retry: the window can only move under a newer projector.
        for _ in 0..2 {
            let (d, members) = writer.window_gap(*tenant, *status).await?;
            if members.is_empty() {
                break;
            }
            let wanted = members.len();
            let parts: Vec<(Vec<u8>, CallId, DocKey)> =
                members.into_iter().map_while(|m| member_parts(&m).map(|(id, doc)| (m, id, doc))).collect();
            let ids: Vec<bson::Bson> = parts.iter().filter_map(|(_, _, doc)| doc.to_bson()).collect();
            // Only documents still in the member's place: one that moved
            // (or went) since the stream's position waits for its event,
            // which refills the window again.
            let found = source.calls(ids).await?;
            let mut found: HashMap<DocKey, CallEntry> = found.into_iter().map(|e| (e.doc.clone(), e)).collect();
            let mut docs = Vec::with_capacity(parts.len());
            for (member, id, key) in parts {
                let place = Place { tenant: *tenant, status: *status, id };
                match found.remove(&key) {
                    Some(entry) if entry.place == place => docs.push((member, entry.stored)),
                    _ => break,
                }
            }
            if docs.len() < wanted {
                warn!(tenant = %tenant, status = %status, rank = d + docs.len() as u64,
                    "document window refill stopped: the call there changed in MongoDB since the stream's position; \
                     reads past it go live until its event is applied");
            }
            let filled = writer.fill_window(*tenant, *status, d, &docs).await?;
            tracing::debug!(tenant = %tenant, status = %status, from = d, to = ?filled, "document window refilled");
            if let Some(now) = filled {
                grown += i64::from(now > d);
                break;
            }
        }
    }
    Ok(grown)
}
