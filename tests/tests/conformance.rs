//! Pins every MongoDB behaviour callboard relies on, so that a stand-in (or
//! a server upgrade) that answers differently fails here, loudly, instead of
//! silently shaping the design. Each assertion is documented MongoDB
//! behaviour; each passes against a real replica set too.

use bson::{doc, oid::ObjectId, Bson, DateTime, Document};
use callboard_testkit::{unique_db_name, Services};
use futures::TryStreamExt;
use mongodb::{Database, IndexModel};

async fn database(services: &Services) -> Database {
    let client = mongodb::Client::with_uri_str(services.mongo.uri()).await.unwrap();
    client.database(&unique_db_name("conformance"))
}

async fn ids(db: &Database, coll: &str, filter: Document) -> Vec<i64> {
    let docs: Vec<Document> =
        db.collection::<Document>(coll).find(filter).sort(doc! {"n": 1}).await.unwrap().try_collect().await.unwrap();
    docs.iter()
        .map(|d| d.get("n").and_then(Bson::as_i64).or_else(|| d.get_i32("n").ok().map(i64::from)).unwrap())
        .collect()
}

#[tokio::test]
async fn query_semantics_the_live_query_relies_on() {
    let services = Services::start().unwrap();
    let db = database(&services).await;
    let c = db.collection::<Document>("t");
    c.insert_many([
        doc! {"n": 1_i64, "deleted": 0, "tenant_id": 6},
        doc! {"n": 2_i64, "deleted": 1, "tenant_id": 6},
        doc! {"n": 3_i64, "tenant_id": Bson::Null},
        doc! {"n": 4_i64, "deleted": 1.0},
        doc! {"n": 5_i64, "deleted": "1", "tenant_id": 7},
        doc! {"n": 6_i64, "deleted": 0, "tenant_id": 6_i64},
    ])
    .await
    .unwrap();
    // `$ne: 1` keeps missing, 0 and "1"; drops 1 and 1.0.
    assert_eq!(ids(&db, "t", doc! {"deleted": {"$ne": 1}}).await, [1, 3, 5, 6]);
    // `$in: [T, null]` matches T (any integer type), null and missing.
    assert_eq!(ids(&db, "t", doc! {"tenant_id": {"$in": [6, Bson::Null]}}).await, [1, 2, 3, 4, 6]);
    // Both together, as the statuses query uses them.
    assert_eq!(ids(&db, "t", doc! {"deleted": {"$ne": 1}, "tenant_id": {"$in": [6, Bson::Null]}}).await, [1, 3, 6]);
    // `$in` over integers for the users fetch.
    assert_eq!(ids(&db, "t", doc! {"n": {"$in": [2_i64, 5, 9]}}).await, [2, 5]);
}

#[tokio::test]
async fn group_and_top_n_semantics() {
    let services = Services::start().unwrap();
    let db = database(&services).await;
    let calls = db.collection::<Document>("calls");
    let t = |ms: i64| DateTime::from_millis(1_760_000_000_000 + ms);
    let oid = ObjectId::new();
    calls
        .insert_many([
            doc! {"id": 1, "status_id": 1, "start_time": t(0)},
            doc! {"id": 2, "status_id": 1, "start_time": t(5_000), "ref": oid},
            doc! {"id": 3, "status_id": 1},
            doc! {"id": 4, "status_id": 1, "start_time": t(5_000)},
            doc! {"id": 5, "status_id": "1", "start_time": t(9_000)},
            doc! {"id": 6, "status_id": 1, "start_time": Bson::Null},
            doc! {"id": 7, "start_time": t(1)},
        ])
        .await
        .unwrap();
    let pipeline = vec![
        doc! {"$group": {"_id": "$status_id", "total": {"$sum": 1},
        "top": {"$topN": {"n": 10, "sortBy": {"start_time": -1, "id": -1}, "output": "$$ROOT"}}}},
        doc! {"$sort": {"total": -1}},
    ];
    let rows: Vec<Document> = calls.aggregate(pipeline).await.unwrap().try_collect().await.unwrap();
    // 1 and "1" are different group keys; a missing status_id groups as null.
    assert_eq!(rows.len(), 3, "{rows:?}");
    let row = |key: Bson| {
        rows.iter().find(|r| r.get("_id") == Some(&key)).unwrap_or_else(|| panic!("no group {key:?}: {rows:?}"))
    };
    let int_row = row(Bson::Int32(1));
    assert_eq!(int_row.get("total").and_then(|v| v.as_i32().map(i64::from).or(v.as_i64())), Some(5));
    let top = int_row.get_array("top").unwrap();
    let order: Vec<i32> = top.iter().map(|d| d.as_document().unwrap().get_i32("id").unwrap()).collect();
    // Newest first, ties by id descending, null and missing start_time last.
    assert_eq!(order, [4, 2, 1, 6, 3]);
    // $$ROOT keeps BSON types: dates, ObjectIds.
    let two = top.iter().map(|d| d.as_document().unwrap()).find(|d| d.get_i32("id") == Ok(2)).unwrap();
    assert_eq!(two.get("start_time"), Some(&Bson::DateTime(t(5_000))));
    assert_eq!(two.get("ref"), Some(&Bson::ObjectId(oid)));
    assert!(two.contains_key("_id"));
    assert_eq!(row(Bson::String("1".into())).get_array("top").unwrap().len(), 1);
    row(Bson::Null);
    // n bounds the output.
    let pipeline = vec![
        doc! {"$group": {"_id": "$status_id", "top": {"$topN": {"n": 2, "sortBy": {"start_time": -1, "id": -1}, "output": "$id"}}}},
    ];
    let rows: Vec<Document> = calls.aggregate(pipeline).await.unwrap().try_collect().await.unwrap();
    let int_row = rows.iter().find(|r| r.get("_id") == Some(&Bson::Int32(1))).unwrap();
    assert_eq!(int_row.get_array("top").unwrap(), &vec![Bson::Int32(4), Bson::Int32(2)]);
}

#[tokio::test]
async fn projection_dates_and_indexes() {
    let services = Services::start().unwrap();
    let db = database(&services).await;
    let users = db.collection::<Document>("users");
    users.insert_one(doc! {"id": 1, "name": "Ann", "email": "a@x", "password_hash": "secret"}).await.unwrap();
    let found: Vec<Document> = users
        .find(doc! {"id": {"$in": [1_i64]}})
        .projection(doc! {"id": 1, "name": 1})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    let keys: Vec<&String> = found[0].keys().collect();
    assert_eq!(keys, ["_id", "id", "name"]);
    // Millisecond dates survive a round trip.
    let when = DateTime::from_millis(1_760_349_600_123);
    users.insert_one(doc! {"id": 2, "seen": when}).await.unwrap();
    let back = users.find_one(doc! {"id": 2}).await.unwrap().unwrap();
    assert_eq!(back.get("seen"), Some(&Bson::DateTime(when)));
    // Indexes are listed with the keys they were created with, `id` too.
    users.create_index(IndexModel::builder().keys(doc! {"id": 1}).build()).await.unwrap();
    let calls = db.collection::<Document>("calls");
    calls
        .create_index(IndexModel::builder().keys(doc! {"tenant_id": 1, "deleted": 1, "start_time": -1}).build())
        .await
        .unwrap();
    let listed: Vec<IndexModel> = users.list_indexes().await.unwrap().try_collect().await.unwrap();
    assert!(listed.iter().any(|m| m.keys == doc! {"id": 1}), "{listed:?}");
    let listed: Vec<IndexModel> = calls.list_indexes().await.unwrap().try_collect().await.unwrap();
    let compound = listed.iter().find(|m| m.keys.len() == 3).expect("compound index listed");
    let dirs: Vec<(String, i64)> = compound
        .keys
        .iter()
        .map(|(k, v)| (k.clone(), v.as_i32().map(i64::from).or(v.as_i64()).unwrap_or(v.as_f64().unwrap_or(0.0) as i64)))
        .collect();
    assert_eq!(dirs, [("tenant_id".to_string(), 1), ("deleted".to_string(), 1), ("start_time".to_string(), -1)]);
    // A collection that does not exist lists no indexes or fails with
    // NamespaceNotFound (26); create-indexes handles both.
    match db.collection::<Document>("nope").list_indexes().await {
        Ok(cursor) => assert!(cursor.try_collect::<Vec<_>>().await.unwrap().is_empty()),
        Err(e) => assert!(matches!(*e.kind, mongodb::error::ErrorKind::Command(ref c) if c.code == 26), "{e}"),
    }
}

/// The watermarks (`crates/projector/src/watermark.rs`) rely on: a change
/// stream on the database filtered by `ns.coll $in` delivers the events
/// of writes acknowledged one after another in that order, across
/// collections; an insert's event carries the inserted document as
/// `fullDocument` (also with `updateLookup`, and even once the document
/// has been deleted); cluster times do not decrease along the stream; and
/// a getMore after the stream has returned everything comes back empty.
#[tokio::test]
async fn change_stream_order_and_insert_documents_for_watermarks() {
    use mongodb::change_stream::event::OperationType;
    use mongodb::options::FullDocumentType;
    let services = Services::start().unwrap();
    let db = database(&services).await;
    let marks = db.collection::<Document>("marks");
    let calls = db.collection::<Document>("calls");
    // Create both collections before watching.
    marks.insert_one(doc! {"_id": 0_i64, "at_ms": 0_i64}).await.unwrap();
    calls.insert_one(doc! {"_id": 0_i64}).await.unwrap();
    let mut stream = db
        .watch()
        .pipeline([doc! {"$match": {"ns.coll": {"$in": ["marks", "calls"]}}}])
        .full_document(FullDocumentType::UpdateLookup)
        .max_await_time(std::time::Duration::from_millis(50))
        .await
        .unwrap();
    let mut written = Vec::new();
    for i in 1..=20_i64 {
        if i % 3 == 0 {
            marks.insert_one(doc! {"_id": 1000 + i, "at_ms": 1000 + i}).await.unwrap();
            written.push(("marks", 1000 + i));
        } else {
            calls.insert_one(doc! {"_id": i}).await.unwrap();
            written.push(("calls", i));
        }
    }
    // Deleted before its event is read: the event still has the document.
    marks.delete_one(doc! {"_id": 1003_i64}).await.unwrap();
    let mut seen = Vec::new();
    let mut last_time = None;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while seen.len() < written.len() + 1 && std::time::Instant::now() < deadline {
        let Some(event) = stream.next_if_any().await.unwrap() else { continue };
        let time = event.cluster_time.expect("a cluster time");
        assert!(last_time.is_none_or(|t: bson::Timestamp| (t.time, t.increment) <= (time.time, time.increment)));
        last_time = Some(time);
        let coll = event.ns.as_ref().and_then(|ns| ns.coll.clone()).unwrap();
        if event.operation_type == OperationType::Delete {
            seen.push((coll, -1));
            continue;
        }
        assert_eq!(event.operation_type, OperationType::Insert);
        let full = event.full_document.expect("an insert carries its document");
        let id = full.get("_id").and_then(Bson::as_i64).or_else(|| full.get_i32("_id").ok().map(i64::from)).unwrap();
        if coll == "marks" {
            let at = full.get("at_ms").and_then(Bson::as_i64).or_else(|| full.get_i32("at_ms").ok().map(i64::from));
            assert_eq!(at, Some(id), "the mark's own document");
        }
        seen.push((coll, id));
    }
    let mut expected: Vec<(String, i64)> = written.iter().map(|(c, i)| (c.to_string(), *i)).collect();
    expected.push(("marks".to_string(), -1));
    assert_eq!(seen, expected, "events in the order the writes were acknowledged");
    // Everything returned: the next getMore is empty.
    assert!(stream.next_if_any().await.unwrap().is_none());
}
