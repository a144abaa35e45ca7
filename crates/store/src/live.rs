use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use bson::{doc, Bson, Document};
use callboard_domain::render::{self, GroupCalls, UserDirectory, UserFields};
use callboard_domain::{CallOrder, DocKey, GroupedBody, GroupedRequest, Status, StatusKey, TenantId};
use futures::TryStreamExt;
use mongodb::options::AggregateOptions;
use mongodb::Database;
use tracing::instrument;

use crate::{StoreError, CALLS, CALL_STATUS, USERS};

/// A query that takes longer than this fails rather than holding the
/// request open, unless [`LiveQuery::with_max_time`] says otherwise.
const MAX_TIME: Duration = Duration::from_secs(20);
/// Large enough that no query here needs a second batch in practice.
const BATCH: u32 = 16_384;

/// The grouped response computed from MongoDB on every call.
///
/// At most four round trips whatever the data size: the tenant's statuses
/// and the grouping aggregation run concurrently; then, for an enriched
/// response, the shown calls' documents by `_id`, then every user they
/// refer to with one `$in`. Users are joined here rather than with
/// `$lookup` (docs/adr/0001-live-query-joins-users-in-process.md).
#[derive(Clone)]
pub struct LiveQuery {
    db: Database,
    user_fields: UserFields,
    max_time: Duration,
}

/// One row of the grouping aggregation: a raw `status_id` value (1 and "1"
/// arrive as separate rows), its live call count and the sort fields and
/// `_id` of its first calls.
struct StatusRow {
    status_id: Bson,
    total: u64,
    top: Vec<Document>,
}

impl LiveQuery {
    pub fn new(db: Database, user_fields: UserFields) -> Self {
        Self { db, user_fields, max_time: MAX_TIME }
    }

    /// Every query of this instance carries `maxTimeMS` = `max_time`.
    pub fn with_max_time(mut self, max_time: Duration) -> Self {
        self.max_time = max_time;
        self
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    pub fn user_fields(&self) -> &UserFields {
        &self.user_fields
    }

    #[instrument(name = "live_query", skip(self), fields(tenant = %tenant, limit = request.limit.get()))]
    pub async fn grouped(&self, tenant: TenantId, request: &GroupedRequest) -> Result<GroupedBody, StoreError> {
        let (statuses, rows) = tokio::try_join!(self.statuses(tenant), self.status_rows(tenant, request))?;
        let visible: BTreeSet<StatusKey> = statuses.iter().map(|s| s.key).collect();
        let mut merged: BTreeMap<StatusKey, (u64, Vec<Document>)> = BTreeMap::new();
        for row in rows {
            let Some(key) = StatusKey::from_bson(&row.status_id).filter(|k| visible.contains(k)) else { continue };
            let entry = merged.entry(key).or_default();
            entry.0 += row.total;
            entry.1.extend(row.top);
        }
        for (_, calls) in merged.values_mut() {
            calls.sort_by_cached_key(CallOrder::of);
            calls.truncate(request.limit.as_usize());
        }
        let enriched = request.include_calls && request.include_enrichment;
        let (documents, users) = if enriched {
            let ids: Vec<Bson> =
                merged.values().flat_map(|(_, calls)| calls.iter().filter_map(|c| c.get("_id").cloned())).collect();
            let documents = self.calls_by_id(tenant, ids).await?;
            let user_ids: BTreeSet<i64> =
                documents.values().flat_map(render::user_references).map(|u| u.get()).collect();
            (documents, self.users(tenant, user_ids).await?)
        } else {
            Default::default()
        };
        let groups = merged
            .into_iter()
            .map(|(key, (total, calls))| {
                let calls = calls
                    .iter()
                    .filter_map(|call| {
                        if !enriched {
                            return Some(call.get("id").map(render::bson_to_json).unwrap_or_default().to_string());
                        }
                        // A call deleted between the two queries is skipped.
                        let full = documents.get(&DocKey::from_bson(call.get("_id")?))?;
                        Some(serde_json::Value::Object(render::enriched_call(full, &users)).to_string())
                    })
                    .collect();
                (key, GroupCalls { total, calls })
            })
            .collect();
        Ok(render::assemble(&statuses, groups, request))
    }

    /// Every tenant that has calls.
    pub async fn tenants(&self) -> Result<Vec<TenantId>, StoreError> {
        let values = self.db.collection::<Document>(CALLS).distinct("tenant_id", doc! {}).max_time(MAX_TIME).await?;
        let mut tenants: Vec<TenantId> = values
            .iter()
            .filter_map(|v| callboard_domain::CallId::from_bson(v).and_then(|t| TenantId::new(t.get()).ok()))
            .collect();
        tenants.sort();
        tenants.dedup();
        Ok(tenants)
    }

    /// The live statuses `tenant` sees: its own and the global ones.
    async fn statuses(&self, tenant: TenantId) -> Result<Vec<Status>, StoreError> {
        // `{$in: [T, null]}` matches the tenant's, null and missing
        // `tenant_id`s in one clause (MongoDB's null-equality).
        let filter = doc! {"deleted": {"$ne": 1}, "tenant_id": {"$in": [Bson::Int64(tenant.get()), Bson::Null]}};
        let docs: Vec<Document> = self
            .db
            .collection::<Document>(CALL_STATUS)
            .find(filter)
            .max_time(self.max_time)
            .batch_size(BATCH)
            .await?
            .try_collect()
            .await?;
        Ok(Status::visible_to(&docs, tenant))
    }

    /// Counts per raw `status_id`, and with calls requested the `_id`, `id`
    /// and `start_time` of the first `limit` calls of each. Whole documents
    /// are fetched afterwards so that a group row stays far below MongoDB's
    /// 16 MB document limit whatever the calls hold.
    async fn status_rows(&self, tenant: TenantId, request: &GroupedRequest) -> Result<Vec<StatusRow>, StoreError> {
        let mut group = doc! {"_id": "$status_id", "total": {"$sum": 1}};
        if request.include_calls {
            group.insert(
                "top",
                doc! {"$topN": {
                    "n": i64::from(request.limit.get()),
                    "sortBy": {"start_time": -1, "id": -1},
                    "output": {"_id": "$_id", "id": "$id", "start_time": "$start_time"},
                }},
            );
        }
        let pipeline =
            vec![doc! {"$match": {"tenant_id": tenant.get(), "deleted": {"$ne": 1}}}, doc! {"$group": group}];
        let options =
            AggregateOptions::builder().allow_disk_use(true).max_time(self.max_time).batch_size(BATCH).build();
        let mut cursor = self.db.collection::<Document>(CALLS).aggregate(pipeline).with_options(options).await?;
        let mut rows = Vec::new();
        while let Some(mut row) = cursor.try_next().await? {
            let total = match row.get("total") {
                Some(Bson::Int32(n)) => *n as u64,
                Some(Bson::Int64(n)) => *n as u64,
                Some(Bson::Double(f)) => *f as u64,
                _ => 0,
            };
            let top = match row.remove("top") {
                Some(Bson::Array(items)) => {
                    items.into_iter().filter_map(|b| if let Bson::Document(d) = b { Some(d) } else { None }).collect()
                }
                _ => Vec::new(),
            };
            rows.push(StatusRow { status_id: row.remove("_id").unwrap_or(Bson::Null), total, top });
        }
        Ok(rows)
    }

    async fn calls_by_id(&self, tenant: TenantId, ids: Vec<Bson>) -> Result<HashMap<DocKey, Document>, StoreError> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let docs: Vec<Document> = self
            .db
            .collection::<Document>(CALLS)
            .find(doc! {"_id": {"$in": ids}, "tenant_id": tenant.get(), "deleted": {"$ne": 1}})
            .max_time(self.max_time)
            .batch_size(BATCH)
            .await?
            .try_collect()
            .await?;
        Ok(docs.into_iter().filter_map(|d| Some((DocKey::from_bson(d.get("_id")?), d))).collect())
    }

    /// The users the tenant may see among `ids`: those without a
    /// `tenant_id` (or a null one) and the tenant's own.
    async fn users(&self, tenant: TenantId, ids: BTreeSet<i64>) -> Result<UserDirectory, StoreError> {
        if ids.is_empty() {
            return Ok(UserDirectory::default());
        }
        let mut projection = doc! {"id": 1};
        for field in self.user_fields.names() {
            projection.insert(field.as_str(), 1);
        }
        let ids: Vec<i64> = ids.into_iter().collect();
        let docs: Vec<Document> = self
            .db
            .collection::<Document>(USERS)
            .find(doc! {"id": {"$in": ids}, "tenant_id": {"$in": [Bson::Int64(tenant.get()), Bson::Null]}})
            .projection(projection)
            .sort(doc! {"_id": 1})
            .max_time(self.max_time)
            .batch_size(BATCH)
            .await?
            .try_collect()
            .await?;
        Ok(UserDirectory::from_documents(&docs, &self.user_fields))
    }
}
