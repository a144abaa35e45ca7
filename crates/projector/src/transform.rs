//! Change events plus the current read-model state in, read-model
//! operations out. No I/O.
//!
//! A batch is folded per document: only each document's last known state
//! matters, because every event of a call, user or status carries (or
//! implies) its whole state. Operations set values, never adjust them, so a
//! replayed batch plans the same final state. A document's old place is
//! looked up in its locator *and* in every tenant the batch's events name:
//! after a crash between a tenant's write and the locator's, the replay
//! still finds and cleans the entry.

use std::collections::{BTreeMap, BTreeSet};

use bson::Document;
use callboard_domain::render::UserFields;
use callboard_domain::{DocKey, StatusRecord, TenantId, UserId};
use callboard_readmodel::codec::{user_entry, CallEntry, Place};
use callboard_readmodel::write::{status_place, GlobalOp, Locator, Plan, StateView, StatusPlace, TenantOp};
use callboard_store::{CALLS, CALL_STATUS, USERS};
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType};

/// One event, reduced to what the read model needs.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// `Some(state)`: the call's state now (`None` inside: counted nowhere);
    /// `None`: deleted.
    Call {
        doc: DocKey,
        state: Option<Option<CallEntry>>,
    },
    User {
        doc: DocKey,
        state: Option<(UserId, String)>,
    },
    Status {
        doc: DocKey,
        state: Option<StatusRecord>,
    },
    /// A watched collection was dropped or renamed, or the stream was
    /// invalidated: the read model can no longer follow and must restart.
    Reset,
}

/// The change an event makes, or `None` when it makes none we can use (an
/// update whose document was deleted before it could be looked up: its
/// delete event follows).
pub fn change_of(event: &ChangeStreamEvent<Document>, fields: &UserFields) -> Option<Change> {
    let coll = event.ns.as_ref().and_then(|ns| ns.coll.as_deref());
    match event.operation_type {
        OperationType::Insert | OperationType::Update | OperationType::Replace => {
            let full = event.full_document.as_ref()?;
            let doc = DocKey::from_bson(full.get("_id")?);
            match coll? {
                CALLS => Some(Change::Call { doc, state: Some(CallEntry::from_document(full)) }),
                USERS => Some(Change::User { doc, state: user_entry(full, fields) }),
                CALL_STATUS => Some(Change::Status { doc, state: StatusRecord::from_document(full) }),
                _ => None,
            }
        }
        OperationType::Delete => {
            let doc = DocKey::from_bson(event.document_key.as_ref()?.get("_id")?);
            match coll? {
                CALLS => Some(Change::Call { doc, state: None }),
                USERS => Some(Change::User { doc, state: None }),
                CALL_STATUS => Some(Change::Status { doc, state: None }),
                _ => None,
            }
        }
        // A CRM collection dropped or renamed (the watermark collection's
        // fate changes nothing), the database dropped, the stream ended.
        OperationType::Drop | OperationType::Rename => {
            matches!(coll?, CALLS | USERS | CALL_STATUS).then_some(Change::Reset)
        }
        OperationType::DropDatabase | OperationType::Invalidate => Some(Change::Reset),
        _ => None,
    }
}

/// What must be read before planning: the documents whose locators matter.
#[derive(Debug, Default)]
pub struct Needs {
    pub calls: Vec<DocKey>,
    pub users: Vec<DocKey>,
    pub statuses: Vec<DocKey>,
    /// Tenants a call of the batch may be put in: their states decide
    /// whether it is.
    pub tenants: Vec<TenantId>,
}

pub fn needs(changes: &[Change]) -> Needs {
    let (mut calls, mut users, mut statuses) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    let mut tenants = BTreeSet::new();
    for c in changes {
        match c {
            Change::Call { doc, state } => {
                if let Some(Some(entry)) = state {
                    tenants.insert(entry.place.tenant);
                }
                calls.insert(doc.clone())
            }
            Change::User { doc, .. } => users.insert(doc.clone()),
            Change::Status { doc, .. } => statuses.insert(doc.clone()),
            Change::Reset => false,
        };
    }
    Needs {
        calls: calls.into_iter().collect(),
        users: users.into_iter().collect(),
        statuses: statuses.into_iter().collect(),
        tenants: tenants.into_iter().collect(),
    }
}

/// A document's last state in the batch, and every place it may be in now.
type Folded<S, P> = (Option<S>, BTreeSet<P>);

/// Plans the writes that bring the read model to the state after
/// `changes`. `event_ms` stamps the tenants touched. Stops at a `Reset`
/// (callers split batches there).
pub fn plan(changes: &[Change], view: &StateView, event_ms: i64) -> Plan {
    let mut calls: BTreeMap<DocKey, Folded<CallEntry, Place>> = BTreeMap::new();
    let mut users: BTreeMap<DocKey, Folded<(UserId, String), UserId>> = BTreeMap::new();
    let mut statuses: BTreeMap<DocKey, Folded<StatusRecord, StatusPlace>> = BTreeMap::new();
    for change in changes {
        match change {
            Change::Call { doc, state } => {
                let slot = calls
                    .entry(doc.clone())
                    .or_insert_with(|| (None, view.call_loc.get(doc).cloned().unwrap_or_default()));
                let entry = state.clone().flatten();
                // A place the batch visits may have been written by a run
                // of this batch that crashed: it is cleaned too. Cold
                // tenants hold nothing.
                if let Some(e) = entry.as_ref().filter(|e| view.tenant_state(e.place.tenant).is_maintained()) {
                    slot.1.insert(e.place);
                }
                slot.0 = entry;
            }
            // Users belong to partition 0's scope.
            Change::User { .. } if !view.scope.owns_globals() => {}
            Change::User { doc, state } => {
                let slot = users
                    .entry(doc.clone())
                    .or_insert_with(|| (None, view.user_loc.get(doc).cloned().unwrap_or_default()));
                if let Some((id, _)) = state {
                    slot.1.insert(*id);
                }
                slot.0 = state.clone();
            }
            Change::Status { doc, state } => {
                let slot = statuses
                    .entry(doc.clone())
                    .or_insert_with(|| (None, view.status_loc.get(doc).cloned().unwrap_or_default()));
                // A status whose place another partition owns is, for
                // this one, gone.
                let state = state.clone().filter(|r| view.scope.owns_status_place(&status_place(r.tenant)));
                if let Some(r) = &state {
                    slot.1.insert(status_place(r.tenant));
                }
                slot.0 = state;
            }
            Change::Reset => break,
        }
    }

    let mut plan = Plan::default();
    let mut touched = BTreeSet::new();
    for (doc, (entry, places)) in calls {
        // Cold tenants are not maintained: a call moving into one leaves.
        let target = entry.filter(|e| view.tenant_state(e.place.tenant).is_maintained());
        let mut widened = places.clone();
        widened.extend(target.as_ref().map(|e| e.place));
        if !widened.is_empty() && Some(&widened) != view.call_loc.get(&doc) {
            plan.intents.push(GlobalOp::call_loc(doc.clone(), &widened));
        }
        // Every place but the final one is emptied; the final one is
        // rewritten (the Put replaces the call where it is).
        for place in places.iter().filter(|p| Some(**p) != target.as_ref().map(|e| e.place)) {
            plan.tenants.entry(place.tenant).or_default().push(TenantOp::Remove { doc: doc.clone(), place: *place });
            touched.insert(place.tenant);
        }
        match target {
            Some(e) => {
                touched.insert(e.place.tenant);
                // A locator that names only the final place already (an
                // insert's intent wrote it) is left as it is.
                if widened.len() > 1 || !widened.contains(&e.place) {
                    plan.global.push(GlobalOp::call_loc(doc, [&e.place]));
                }
                plan.tenants.entry(e.place.tenant).or_default().push(TenantOp::Put(e));
            }
            // Nothing names the call here (it is another partition's, or
            // a cold tenant's): no locator to drop.
            None if places.is_empty() => {}
            None => plan.global.push(GlobalOp::DelLoc(Locator::Call, doc)),
        }
    }
    for t in touched {
        plan.tenants.entry(t).or_default().push(TenantOp::Touch { last_event_ms: event_ms });
    }
    // Users are keyed by id, which several documents may pass between in
    // one batch (a delete and a re-insert): every removal before any put.
    let mut puts = Vec::new();
    for (doc, (state, ids)) in users {
        let keep = state.as_ref().map(|(id, _)| *id);
        for id in ids.into_iter().filter(|id| Some(*id) != keep) {
            plan.global.push(GlobalOp::DelUser(id));
        }
        match state {
            Some((id, json)) => {
                puts.push(GlobalOp::PutUser(id, json));
                puts.push(GlobalOp::user_loc(doc, [id]));
            }
            None => plan.global.push(GlobalOp::DelLoc(Locator::User, doc)),
        }
    }
    plan.global.extend(puts);
    for (doc, (state, places)) in statuses {
        let keep = state.as_ref().map(|r| status_place(r.tenant));
        let mut widened = places.clone();
        widened.extend(keep.clone());
        if !widened.is_empty() && Some(&widened) != view.status_loc.get(&doc) {
            plan.intents.push(GlobalOp::status_loc(doc.clone(), &widened));
        }
        for place in places.into_iter().filter(|p| Some(p) != keep.as_ref()) {
            match place.parse::<i64>().ok().and_then(|t| TenantId::new(t).ok()) {
                Some(t) => plan.tenants.entry(t).or_default().push(TenantOp::DelStatus { doc: doc.clone() }),
                None => plan.global.push(GlobalOp::DelGlobalStatus(doc.clone())),
            }
        }
        match state {
            Some(record) => {
                let json = serde_json::to_string(&record).unwrap_or_default();
                let place = status_place(record.tenant);
                match record.tenant {
                    Some(t) => plan.tenants.entry(t).or_default().push(TenantOp::PutStatus { doc: doc.clone(), json }),
                    None => plan.global.push(GlobalOp::PutGlobalStatus(doc.clone(), json)),
                }
                plan.global.push(GlobalOp::status_loc(doc, [&place]));
            }
            None => plan.global.push(GlobalOp::DelLoc(Locator::Status, doc)),
        }
    }
    plan
}

/// The call an event of `calls` is about (its `documentKey._id`).
pub fn call_key(event: &ChangeStreamEvent<Document>) -> Option<DocKey> {
    let coll = event.ns.as_ref().and_then(|ns| ns.coll.as_deref());
    if coll != Some(CALLS) {
        return None;
    }
    let id =
        event.document_key.as_ref().and_then(|k| k.get("_id")).or_else(|| event.full_document.as_ref()?.get("_id"))?;
    Some(DocKey::from_bson(id))
}

/// The event's commit time in ms (MongoDB's cluster time has second
/// precision in its high word).
pub fn event_ms(event: &ChangeStreamEvent<Document>) -> Option<i64> {
    event.cluster_time.map(|ts| i64::from(ts.time) * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::{doc, Bson};
    use callboard_readmodel::TenantState;

    fn call(id: i64, tenant: i64, status: i64) -> Change {
        let d = doc! {"_id": id, "id": id, "tenant_id": tenant, "status_id": status};
        Change::Call { doc: DocKey::from_bson(&Bson::Int64(id)), state: Some(CallEntry::from_document(&d)) }
    }

    fn warm(view: &mut StateView, t: i64) {
        view.tenants.insert(TenantId::new(t).unwrap(), TenantState::Warm(1));
    }

    #[test]
    fn only_a_crm_collection_dropped_or_renamed_resets() {
        let event = |op: &str, coll: &str| -> ChangeStreamEvent<Document> {
            bson::from_document(doc! {"_id": {"_data": "00"}, "operationType": op, "ns": {"db": "crm", "coll": coll}})
                .expect("an event")
        };
        let fields = UserFields::default();
        for op in ["drop", "rename"] {
            for coll in [CALLS, USERS, CALL_STATUS] {
                assert!(matches!(change_of(&event(op, coll), &fields), Some(Change::Reset)), "{op} {coll}");
            }
            assert!(change_of(&event(op, "callboard_watermarks"), &fields).is_none(), "{op}");
        }
        assert!(matches!(change_of(&event("dropDatabase", ""), &fields), Some(Change::Reset)));
    }

    #[test]
    fn a_move_between_tenants_removes_from_the_old_one() {
        let mut view = StateView::default();
        warm(&mut view, 1);
        warm(&mut view, 2);
        let first = plan(&[call(5, 1, 3)], &view, 0);
        let TenantOp::Put(entry) = &first.tenants[&TenantId::new(1).unwrap()][0] else { panic!() };
        let d = DocKey::from_bson(&Bson::Int64(5));
        view.call_loc.insert(d.clone(), [entry.place].into());
        let moved = plan(&[call(5, 2, 3)], &view, 0);
        let new_place = Place { tenant: TenantId::new(2).unwrap(), ..entry.place };
        assert_eq!(
            moved.tenants[&TenantId::new(1).unwrap()][0],
            TenantOp::Remove { doc: d.clone(), place: entry.place }
        );
        assert!(matches!(&moved.tenants[&TenantId::new(2).unwrap()][0], TenantOp::Put(e) if e.place == new_place));
        assert!(moved.intents.contains(&GlobalOp::call_loc(d.clone(), &[entry.place, new_place])));
        assert!(moved.global.contains(&GlobalOp::call_loc(d, [&new_place])));
    }

    #[test]
    fn a_locator_is_written_once_when_its_intent_is_final() {
        let mut view = StateView::default();
        warm(&mut view, 1);
        let d = DocKey::from_bson(&Bson::Int64(5));
        let insert = plan(&[call(5, 1, 3)], &view, 0);
        let TenantOp::Put(entry) = &insert.tenants[&TenantId::new(1).unwrap()][0] else { panic!() };
        assert_eq!(insert.intents, vec![GlobalOp::call_loc(d.clone(), [&entry.place])]);
        assert!(insert.global.is_empty(), "{:?}", insert.global);
        // Replayed: the locator already names the place, nothing to write.
        view.call_loc.insert(d.clone(), [entry.place].into());
        let replay = plan(&[call(5, 1, 3)], &view, 0);
        assert!(replay.intents.is_empty() && replay.global.is_empty(), "{replay:?}");
        // A status move narrows it after the tenant's write.
        let moved = plan(&[call(5, 1, 4)], &view, 0);
        assert_eq!(moved.intents.len(), 1);
        assert!(matches!(&moved.global[..], [GlobalOp::PutLoc(Locator::Call, _, places)] if !places.contains(',')));
    }

    #[test]
    fn cold_tenants_get_nothing_and_deletes_clean_up() {
        let mut view = StateView::default();
        let p = plan(&[call(5, 1, 3)], &view, 0);
        assert!(p.tenants.is_empty());
        warm(&mut view, 1);
        let d = DocKey::from_bson(&Bson::Int64(5));
        let p = plan(&[call(5, 1, 3), Change::Call { doc: d.clone(), state: None }], &view, 0);
        let t1 = TenantId::new(1).unwrap();
        assert!(matches!(p.tenants[&t1][..], [TenantOp::Remove { .. }, TenantOp::Touch { .. }]), "{p:?}");
        assert_eq!(p.global, vec![GlobalOp::DelLoc(Locator::Call, d)]);
    }
}

/// Fuzzing of change-event decoding (`make fuzz` runs many more cases):
/// arbitrary BSON in every field the projector reads, through `change_of`,
/// `needs` and `plan`. Nothing panics, and a plan puts calls only in tenants
/// the batch's calls name.
#[cfg(test)]
mod fuzz {
    use super::*;
    use bson::{doc, Bson};
    use callboard_readmodel::TenantState;
    use proptest::prelude::*;

    fn config() -> ProptestConfig {
        let cases = std::env::var("CALLBOARD_FUZZ_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(500);
        ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
    }

    /// Any BSON value, nested a little.
    fn value() -> impl Strategy<Value = Bson> {
        let leaf = prop_oneof![
            any::<i32>().prop_map(Bson::Int32),
            any::<i64>().prop_map(Bson::Int64),
            (-3i64..12).prop_map(Bson::Int64),
            any::<f64>().prop_map(Bson::Double),
            "[ -~]{0,8}".prop_map(Bson::String),
            (-3i64..12).prop_map(|n| Bson::String(n.to_string())),
            any::<bool>().prop_map(Bson::Boolean),
            Just(Bson::Null),
            any::<i64>().prop_map(|ms| Bson::DateTime(bson::DateTime::from_millis(ms))),
            Just(Bson::ObjectId(bson::oid::ObjectId::new())),
            proptest::collection::vec(any::<u8>(), 0..8)
                .prop_map(|b| Bson::Binary(bson::Binary { subtype: bson::spec::BinarySubtype::Generic, bytes: b })),
            Just(Bson::Decimal128("1.5".parse().unwrap())),
        ];
        leaf.prop_recursive(2, 8, 3, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..3).prop_map(Bson::Array),
                proptest::collection::btree_map("[a-z_]{1,6}", inner, 0..3)
                    .prop_map(|m| Bson::Document(m.into_iter().collect())),
            ]
        })
    }

    /// A document with any of the fields calls, users and statuses have,
    /// each of any type.
    fn document() -> impl Strategy<Value = Document> {
        let fields = [
            "_id",
            "id",
            "tenant_id",
            "status_id",
            "start_time",
            "deleted",
            "owner_id",
            "user_id",
            "assigned_to_id",
            "name",
            "email",
            "color",
            "description",
            "subject",
        ];
        proptest::collection::vec(proptest::option::of(value()), fields.len()).prop_map(move |values| {
            let mut d = Document::new();
            for (name, v) in fields.iter().zip(values) {
                if let Some(v) = v {
                    d.insert(*name, v);
                }
            }
            d
        })
    }

    fn event() -> impl Strategy<Value = Document> {
        let op = prop_oneof![
            Just("insert"),
            Just("update"),
            Just("replace"),
            Just("delete"),
            Just("drop"),
            Just("rename"),
            Just("dropDatabase"),
            Just("invalidate"),
        ];
        let coll = prop_oneof![Just(CALLS), Just(USERS), Just(CALL_STATUS), Just("other")];
        (op, coll, proptest::option::of(document()), proptest::option::of(value())).prop_map(|(op, coll, full, key)| {
            let mut e = doc! {"_id": {"_data": "x"}, "operationType": op, "ns": {"db": "crm", "coll": coll}};
            if let Some(full) = full {
                e.insert("fullDocument", full);
            }
            if let Some(key) = key {
                e.insert("documentKey", doc! {"_id": key});
            }
            e
        })
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn arbitrary_events_plan_without_panicking(events in proptest::collection::vec(event(), 1..6)) {
            let fields = UserFields::new(vec!["id".into(), "name".into(), "email".into()]).unwrap();
            let n = events.len();
            let decoded: Vec<ChangeStreamEvent<Document>> =
                events.into_iter().filter_map(|e| bson::from_document(e).ok()).collect();
            // The driver decodes every one of them: the fuzzing reaches
            // the projector's own decoding.
            prop_assert_eq!(decoded.len(), n);
            let changes: Vec<Change> = decoded.iter().filter_map(|e| change_of(e, &fields)).collect();
            let needs = needs(&changes);
            let mut view = StateView::default();
            for t in &needs.tenants {
                view.tenants.insert(*t, TenantState::Warm(1));
            }
            let plan = plan(&changes, &view, 0);
            // Calls go only into tenants the batch's calls name (a tenant's
            // own status may be written whatever its state).
            for (tenant, ops) in &plan.tenants {
                if ops.iter().any(|op| matches!(op, TenantOp::Put(_))) {
                    prop_assert!(needs.tenants.contains(tenant), "{tenant:?} was not among {:?}", needs.tenants);
                }
            }
        }
    }
}
