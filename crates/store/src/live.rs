use std::collections::{BTreeMap, BTreeSet};

use bson::{doc, Bson, Document};
use callboard_domain::render::{self, GroupCalls, UserDirectory, UserFields};
use callboard_domain::{CallOrder, GroupedRequest, GroupedResponse, Status, StatusKey, TenantId};
use futures::TryStreamExt;
use mongodb::options::AggregateOptions;
use mongodb::Database;
use tracing::instrument;

use crate::{StoreError, CALLS, CALL_STATUS, USERS};

/// The grouped response computed from MongoDB on every call.
///
/// Three round trips whatever the data size: the tenant's statuses and the
/// calls aggregation run concurrently, then one `$in` query fetches every
/// user the shown calls refer to. Users are joined here rather than with
/// `$lookup` (docs/adr/0001-live-query-joins-users-in-process.md): one fetch
/// serves the three references of every call, the allowlist is applied by
/// the server's projection, and a missing `owner_id` cannot match users that
/// lack an `id` as `$lookup`'s null-equality would.
#[derive(Clone)]
pub struct LiveQuery {
    db: Database,
    user_fields: UserFields,
}

/// One row of the calls aggregation: a raw `status_id` value (1 and "1"
/// arrive as separate rows), its live call count and its first calls.
struct StatusRow {
    status_id: Bson,
    total: u64,
    top: Vec<Document>,
}

impl LiveQuery {
    pub fn new(db: Database, user_fields: UserFields) -> Self {
        Self { db, user_fields }
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    #[instrument(name = "live_query", skip(self), fields(tenant = %tenant, limit = request.limit.get()))]
    pub async fn grouped(&self, tenant: TenantId, request: &GroupedRequest) -> Result<GroupedResponse, StoreError> {
        let (statuses, rows) = tokio::try_join!(self.statuses(tenant), self.status_rows(tenant, request))?;
        let mut merged: BTreeMap<StatusKey, (u64, Vec<Document>)> = BTreeMap::new();
        for row in rows {
            let Some(key) = StatusKey::from_bson(&row.status_id) else { continue };
            let entry = merged.entry(key).or_default();
            entry.0 += row.total;
            entry.1.extend(row.top);
        }
        for (_, calls) in merged.values_mut() {
            calls.sort_by_cached_key(CallOrder::of);
            calls.truncate(request.limit.as_usize());
        }
        let users = if request.include_calls && request.include_enrichment {
            let ids: BTreeSet<i64> = merged
                .values()
                .flat_map(|(_, calls)| calls.iter().flat_map(render::user_references))
                .map(|u| u.get())
                .collect();
            self.users(ids).await?
        } else {
            UserDirectory::default()
        };
        let groups = merged
            .into_iter()
            .map(|(key, (total, calls))| {
                let calls = calls
                    .iter()
                    .map(|call| {
                        if request.include_enrichment {
                            render::raw(&serde_json::Value::Object(render::enriched_call(call, &users)))
                        } else {
                            render::raw(&call.get("id").map(render::bson_to_json).unwrap_or_default())
                        }
                    })
                    .collect();
                (key, GroupCalls { total, calls })
            })
            .collect();
        Ok(render::assemble(statuses, groups, request))
    }

    /// The live statuses `tenant` sees: its own and the global ones.
    async fn statuses(&self, tenant: TenantId) -> Result<Vec<Status>, StoreError> {
        // `{$in: [T, null]}` matches the tenant's, null and missing
        // `tenant_id`s in one clause (MongoDB's null-equality).
        let filter = doc! {"deleted": {"$ne": 1}, "tenant_id": {"$in": [Bson::Int64(tenant.get()), Bson::Null]}};
        let docs: Vec<Document> =
            self.db.collection::<Document>(CALL_STATUS).find(filter).sort(doc! {"_id": 1}).await?.try_collect().await?;
        Ok(Status::visible_to(&docs, tenant))
    }

    /// Counts per raw `status_id`, and with calls requested the first
    /// `limit` calls of each (whole documents, or just the sort fields).
    async fn status_rows(&self, tenant: TenantId, request: &GroupedRequest) -> Result<Vec<StatusRow>, StoreError> {
        let mut group = doc! {"_id": "$status_id", "total": {"$sum": 1}};
        if request.include_calls {
            let output: Bson = if request.include_enrichment {
                "$$ROOT".into()
            } else {
                doc! {"id": "$id", "start_time": "$start_time"}.into()
            };
            group.insert(
                "top",
                doc! {"$topN": {"n": i64::from(request.limit.get()), "sortBy": {"start_time": -1, "id": -1}, "output": output}},
            );
        }
        let pipeline =
            vec![doc! {"$match": {"tenant_id": tenant.get(), "deleted": {"$ne": 1}}}, doc! {"$group": group}];
        let options = AggregateOptions::builder().allow_disk_use(true).build();
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

    async fn users(&self, ids: BTreeSet<i64>) -> Result<UserDirectory, StoreError> {
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
            .find(doc! {"id": {"$in": ids}})
            .projection(projection)
            .sort(doc! {"_id": 1})
            .await?
            .try_collect()
            .await?;
        Ok(UserDirectory::from_documents(&docs, &self.user_fields))
    }
}
