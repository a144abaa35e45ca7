//! Deterministic demo and benchmark data: the same plan and seed give the
//! same documents, whatever the batch size or insert concurrency.
//!
//! The data exercises what real CRM data holds: `status_id` as an int or a
//! numeric string, `deleted` as 0, 1 or missing, calls without a start time,
//! without an owner or pointing at a user that does not exist, a soft-deleted
//! status, and users carrying secrets that must never be shown.

use bson::{doc, Bson, DateTime, Document};
use futures::{stream, StreamExt, TryStreamExt};
use mongodb::options::InsertManyOptions;
use mongodb::Database;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{StoreError, CALLS, CALL_STATUS, USERS};

/// What to generate.
#[derive(Debug, Clone, Copy)]
pub struct SeedPlan {
    pub tenants: u32,
    pub calls: u64,
    pub users: u32,
    pub statuses: u32,
    pub seed: u64,
}

/// Documents per `insert_many`.
pub const BATCH: u64 = 5_000;
/// `insert_many` calls in flight.
const CONCURRENCY: usize = 4;
/// 2025-10-13T10:00:00Z: the newest possible start time.
const NEWEST_START_MS: i64 = 1_760_349_600_000;
const NINETY_DAYS_S: i64 = 90 * 24 * 3600;

const STATUS_NAMES: &[(&str, &str, &str)] = &[
    ("Pending", "Calls that are pending", "#FFA500"),
    ("Scheduled", "Scheduled calls", "#00FF00"),
    ("In Progress", "Calls in progress", "#1E90FF"),
    ("Completed", "Completed calls", "#008000"),
    ("Cancelled", "Cancelled calls", "#FF0000"),
    ("No Answer", "Nobody picked up", "#808080"),
    ("Voicemail", "Left a voicemail", "#800080"),
    ("Follow-up", "Needs a follow-up", "#FFD700"),
];
const FIRST: &[&str] = &["John", "Jane", "Ana", "Luis", "Mei", "Omar", "Priya", "Sven", "Zoe", "Kofi"];
const LAST: &[&str] = &["Doe", "Smith", "Garcia", "Chen", "Haddad", "Patel", "Berg", "Okafor", "Novak", "Ito"];
const SUBJECTS: &[&str] =
    &["Follow-up call", "Demo", "Renewal", "Support", "Discovery", "Pricing", "Onboarding", "Check-in"];

impl SeedPlan {
    /// `call_status`: `statuses` global statuses with ids 1..=statuses, plus
    /// one soft-deleted status (id statuses+1) that some calls still use.
    pub fn status_documents(&self) -> Vec<Document> {
        let mut docs: Vec<Document> = (1..=self.statuses)
            .map(|id| {
                let (name, description, color) = STATUS_NAMES[(id as usize - 1) % STATUS_NAMES.len()];
                let name = if id as usize > STATUS_NAMES.len() { format!("{name} {id}") } else { name.to_string() };
                doc! {"id": id as i64, "name": name, "description": description, "color": color, "deleted": 0}
            })
            .collect();
        docs.push(doc! {"id": i64::from(self.statuses) + 1, "name": "Archived", "description": "No longer used", "color": "#000000", "deleted": 1});
        docs
    }

    pub fn user_documents(&self) -> Vec<Document> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x5EED_0000_0000_0001);
        (1..=self.users)
            .map(|id| {
                let first = FIRST[rng.gen_range(0..FIRST.len())];
                let last = LAST[rng.gen_range(0..LAST.len())];
                doc! {
                    "id": id as i64,
                    "name": format!("{first} {last}"),
                    "email": format!("{}.{}{id}@example.com", first.to_lowercase(), last.to_lowercase()),
                    "role": if id % 10 == 1 { "manager" } else { "agent" },
                    "phone": format!("+1-555-{:04}", rng.gen_range(0..10_000)),
                    "password_hash": format!("$2b$12${:032x}", rng.gen::<u128>()),
                    "api_token": format!("tok_{:032x}", rng.gen::<u128>()),
                }
            })
            .collect()
    }

    /// Calls `start..end` (ids start+1..=end). Each batch has its own random
    /// stream, so batches can be generated in any order.
    pub fn call_documents(&self, batch: u64) -> Vec<Document> {
        let start = batch * BATCH;
        let end = (start + BATCH).min(self.calls);
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ batch);
        (start..end).map(|i| self.call(&mut rng, i + 1)).collect()
    }

    fn call(&self, rng: &mut ChaCha8Rng, id: u64) -> Document {
        let tenant = rng.gen_range(1..=self.tenants) as i64;
        // Mostly live statuses; 1% on the soft-deleted one.
        let status = if rng.gen_bool(0.01) { self.statuses + 1 } else { rng.gen_range(1..=self.statuses) };
        let status_id: Bson =
            if rng.gen_bool(0.3) { Bson::String(status.to_string()) } else { Bson::Int64(status as i64) };
        let mut user_ref = |missing: f64| -> Option<i64> {
            let roll: f64 = rng.gen();
            if roll < missing {
                None
            } else if roll < missing + 0.01 {
                Some(i64::from(self.users) + 1_000 + rng.gen_range(0..100)) // dangling
            } else {
                Some(rng.gen_range(1..=self.users) as i64)
            }
        };
        let owner = user_ref(0.05);
        let user = user_ref(0.05);
        let assignee = user_ref(0.25);
        let mut call = doc! {
            "id": id as i64,
            "tenant_id": tenant,
            "subject": SUBJECTS[rng.gen_range(0..SUBJECTS.len())],
            "type": if rng.gen_bool(0.5) { "outbound" } else { "inbound" },
            "status_id": status_id,
            "duration_seconds": rng.gen_range(0..3_600) as i64,
        };
        if !rng.gen_bool(0.02) {
            // Whole seconds, as CRMs store them; many calls share a second.
            let start_s = NEWEST_START_MS / 1000 - rng.gen_range(0..NINETY_DAYS_S);
            call.insert("start_time", DateTime::from_millis(start_s * 1000));
        }
        for (field, value) in [("owner_id", owner), ("user_id", user), ("assigned_to_id", assignee)] {
            if let Some(v) = value {
                call.insert(field, v);
            }
        }
        let roll: f64 = rng.gen();
        if roll < 0.05 {
            call.insert("deleted", 1);
        } else if roll < 0.5 {
            call.insert("deleted", 0);
        }
        call
    }

    pub fn batches(&self) -> u64 {
        self.calls.div_ceil(BATCH)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct SeedReport {
    pub calls: u64,
    pub users: u64,
    pub statuses: u64,
}

/// Loads `plan` into `db`. Refuses to touch a database that already holds
/// any of the three collections' documents unless `drop` is set, in which
/// case those collections are dropped first.
///
/// `progress` is called with the number of calls inserted so far.
pub async fn load(
    db: &Database,
    plan: &SeedPlan,
    drop: bool,
    progress: impl Fn(u64),
) -> Result<SeedReport, StoreError> {
    if plan.tenants == 0 || plan.users == 0 || plan.statuses == 0 {
        return Err(StoreError::SeedRefused("--tenants, --users and --statuses must be at least 1".into()));
    }
    for name in [CALLS, USERS, CALL_STATUS] {
        let coll = db.collection::<Document>(name);
        if drop {
            coll.drop().await?;
        } else if coll.estimated_document_count().await? > 0 {
            return Err(StoreError::SeedRefused(format!(
                "collection {name} in database {} is not empty; pass --drop to replace its data",
                db.name()
            )));
        }
    }
    let statuses = plan.status_documents();
    let users = plan.user_documents();
    db.collection::<Document>(CALL_STATUS).insert_many(&statuses).await?;
    db.collection::<Document>(USERS).insert_many(&users).await?;
    let inserted = std::sync::atomic::AtomicU64::new(0);
    stream::iter(0..plan.batches())
        .map(|batch| {
            let calls = db.collection::<Document>(CALLS);
            let docs = plan.call_documents(batch);
            async move {
                let n = docs.len() as u64;
                calls.insert_many(docs).with_options(InsertManyOptions::builder().ordered(false).build()).await?;
                Ok::<u64, StoreError>(n)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_for_each(|n| {
            let total = inserted.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
            progress(total);
            async { Ok(()) }
        })
        .await?;
    Ok(SeedReport { calls: plan.calls, users: users.len() as u64, statuses: statuses.len() as u64 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic_and_covers_the_edge_cases() {
        let plan = SeedPlan { tenants: 3, calls: 12_000, users: 20, statuses: 5, seed: 7 };
        let a: Vec<Document> = (0..plan.batches()).flat_map(|b| plan.call_documents(b)).collect();
        let b: Vec<Document> = (0..plan.batches()).rev().flat_map(|b| plan.call_documents(b)).collect::<Vec<_>>();
        assert_eq!(a.len(), 12_000);
        let mut b_sorted = b.clone();
        b_sorted.sort_by_key(|d| d.get_i64("id").unwrap());
        assert_eq!(a, b_sorted);
        assert_eq!(plan.user_documents(), plan.user_documents());
        let ids: Vec<i64> = a.iter().map(|d| d.get_i64("id").unwrap()).collect();
        assert_eq!(ids, (1..=12_000).collect::<Vec<_>>());
        assert!(a.iter().any(|d| matches!(d.get("status_id"), Some(Bson::String(_)))));
        assert!(a.iter().any(|d| matches!(d.get("status_id"), Some(Bson::Int64(_)))));
        assert!(a.iter().any(|d| !d.contains_key("start_time")));
        assert!(a.iter().any(|d| !d.contains_key("deleted")));
        assert!(a.iter().any(|d| d.get_i32("deleted") == Ok(1)));
        assert!(a.iter().any(|d| d.get_i64("owner_id").is_ok_and(|o| o > 20)));
        let other = SeedPlan { seed: 8, ..plan };
        assert_ne!(a[..10], other.call_documents(0)[..10]);
    }
}
