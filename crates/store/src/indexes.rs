//! The indexes of the specification, created idempotently.

use bson::{doc, Document};
use futures::TryStreamExt;
use mongodb::{Database, IndexModel};

use crate::{StoreError, CALLS, CALL_STATUS, USERS};

/// Every index the specification lists, by collection.
pub fn wanted() -> Vec<(&'static str, Document)> {
    vec![
        (CALLS, doc! {"tenant_id": 1, "deleted": 1, "status_id": 1}),
        (CALLS, doc! {"tenant_id": 1, "deleted": 1, "start_time": -1}),
        (CALLS, doc! {"id": 1}),
        (CALLS, doc! {"owner_id": 1}),
        (CALLS, doc! {"user_id": 1}),
        (CALLS, doc! {"assigned_to_id": 1}),
        (USERS, doc! {"id": 1}),
        (CALL_STATUS, doc! {"id": 1}),
        (CALL_STATUS, doc! {"deleted": 1}),
    ]
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Existed,
}

#[derive(Debug, Clone)]
pub struct IndexResult {
    pub collection: &'static str,
    pub keys: Document,
    pub outcome: Outcome,
}

/// Creates each wanted index that no index with the same keys (in the same
/// order and directions) already provides.
pub async fn ensure(db: &Database) -> Result<Vec<IndexResult>, StoreError> {
    let mut results = Vec::new();
    for (collection, keys) in wanted() {
        let coll = db.collection::<Document>(collection);
        let existing: Vec<IndexModel> = match coll.list_indexes().await {
            Ok(cursor) => cursor.try_collect().await?,
            // A collection that does not exist yet has no indexes.
            Err(e) if is_namespace_not_found(&e) => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        let outcome = if existing.iter().any(|m| same_keys(&m.keys, &keys)) {
            Outcome::Existed
        } else {
            coll.create_index(IndexModel::builder().keys(keys.clone()).build()).await?;
            Outcome::Created
        };
        results.push(IndexResult { collection, keys, outcome });
    }
    Ok(results)
}

fn is_namespace_not_found(e: &mongodb::error::Error) -> bool {
    matches!(*e.kind, mongodb::error::ErrorKind::Command(ref c) if c.code == 26)
}

/// Key order matters; 1 and 1.0 (and -1, -1.0) are the same direction.
fn same_keys(a: &Document, b: &Document) -> bool {
    let direction = |v: &bson::Bson| match v {
        bson::Bson::Int32(n) => Some(f64::from(*n)),
        bson::Bson::Int64(n) => Some(*n as f64),
        bson::Bson::Double(f) => Some(*f),
        _ => None,
    };
    a.len() == b.len()
        && a.iter().zip(b.iter()).all(|((ka, va), (kb, vb))| {
            ka == kb && (va == vb || (direction(va).is_some() && direction(va) == direction(vb)))
        })
}

/// `tenant_id_1_deleted_1_status_id_1`: MongoDB's default index name.
pub fn index_name(keys: &Document) -> String {
    keys.iter().map(|(k, v)| format!("{k}_{v}")).collect::<Vec<_>>().join("_")
}
